"""Counter-based random numbers for tangents: cheap, elementwise, fusable, reproducible.

``jax.random`` (threefry-2x32, 20 rounds per 64 bits) costs about as much as a backprop
step when it draws one number per parameter (20M normals: ~230-275 ms on a 2-core CPU,
against ~7-13 ms for a 64x4096x4096 matmul). A forward gradient needs one number per
parameter per step, so the tangent generator must be cheap.

Here every number is a pure function of ``(seed words, counter)``: the two seed words are
hashed from the key (:func:`seed_words`), and the leaves of one step are consecutive
counter ranges of one stream (:func:`leaf_streams`: leaf ``i``'s ``(K, *leaf.shape)``
tangent array starts at ``K·off_i``), so leaves, steps and keys get independent numbers
and typed and legacy keys both work. The per-element hash is a keyed Weyl sequence ``c * (s1 | 1) + s0`` (a
different odd increment per stream, so two streams are never shifted copies of each
other) followed by Wellons' ``lowbias32`` finaliser (a bijection of uint32 with very low
avalanche bias). It is elementwise integer arithmetic (iota, multiply, xor, shift), so XLA
fuses it into its consumers and can recompute it where it is needed instead of storing
it (MeZO's regenerate-from-seed trick).

Draws (float32):

* :func:`rademacher_at` -- the top bit of the hash gives the sign.
* :func:`normal_at` -- Box-Muller with one radius and one angle per element:
  ``s · sqrt(-2 ln u) · cos(πv/2)``, ``u`` and ``v`` 23-bit uniforms on (0, 1) and the sign
  ``s`` from two independently seeded hash streams; a bit-trick ``log`` (XLA:CPU's own
  ``log`` took 1.8x as long), the native ``sqrt`` and a degree-5 polynomial for ``cos``.
  ``|z| <= sqrt(48 ln 2) = 5.77``; max abs error against the float64 transform of the
  same bits below 1e-6. It replaced an inverse CDF (Giles' ``erfinv`` polynomials, a
  central and a tail branch both evaluated for every element) that cost 1.8x as much,
  see docs/performance.md.

Statistical checks of these draws live in ``tests/test_tangent_quality.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_ONE = np.uint32(1)
f32 = np.float32


def mix32(x: Array) -> Array:
    """Wellons' lowbias32: a bijection of uint32 with very low avalanche bias."""
    x = x ^ (x >> np.uint32(16))
    x = x * _M1
    x = x ^ (x >> np.uint32(15))
    x = x * _M2
    return x ^ (x >> np.uint32(16))


# Domain constants keep the words derived for different purposes apart.
_PHI = np.uint32(0x9E3779B9)
_LEAF_SEEDS = np.uint32(0x2545F491)
_FOLD = np.uint32(0x68E31DA4)


def _derive(key: Array, tags: Array, n_words: int, domain: np.uint32) -> Array:
    """``(*tags.shape, n_words)`` uint32 words: a hash of ``key``'s data and each tag.

    Every data word is absorbed through :func:`mix32` (a bijection), so distinct keys or
    tags give unrelated words. Pure elementwise integer arithmetic, unlike
    ``jax.random.split``/``bits``/``fold_in`` (threefry: 20 rounds in an XLA while loop),
    which cost 5-40 µs per call on a CPU, more than a whole small training step.
    """
    data = jax.random.key_data(key).reshape(-1)
    base = tags.astype(jnp.uint32) * _PHI + domain
    words = []
    for w in range(n_words):
        h = mix32(base + np.uint32((w * int(_M2)) & 0xFFFFFFFF))
        for j in range(data.shape[0]):
            h = mix32(h ^ data[j]) + _PHI
        words.append(mix32(h))
    return jnp.stack(words, axis=-1)


def seed_words(key: Array, n: int) -> Array:
    """``(n, 2)`` uint32 seed words, one pair per leaf, hashed from ``key``."""
    return _derive(key, jnp.arange(n, dtype=jnp.uint32), 2, _LEAF_SEEDS)


def leaf_streams(key: Array, sizes: list[int], num_tangents: int) -> tuple[Array, list[int]]:
    """``(seeds (n, 2), bases)``: where the K tangents of each of ``n`` leaves are drawn.

    Leaf ``i``'s tangent ``k``, element ``j``, is the draw at counter ``bases[i] + k·n_i + j``
    with ``seeds[i]``. While all ``K·N`` counters fit in uint32 every leaf shares one seed
    and ``bases[i] = K·off_i`` (``off_i`` the leaf's offset in the flattened parameters):
    the leaves are consecutive ranges of one stream, so all of them can be drawn as one
    kernel and sliced (XLA compiles one kernel, not one per leaf). Beyond that each leaf
    gets its own hashed seed and base 0 (the counter range is then per leaf).
    """
    n = len(sizes)
    if num_tangents * sum(sizes) >= 2**32:
        return seed_words(key, n), [0] * n
    bases, start = [], 0
    for size in sizes:
        bases.append(num_tangents * start)
        start += size
    return jnp.broadcast_to(seed_words(key, 1), (n, 2)), bases


def fold_in(key: Array, tags: Array | int) -> Array:
    """Keys of ``key``'s implementation derived from ``key`` and ``tags`` by the hash.

    The counterpart of ``jax.random.fold_in`` (a scalar tag) and ``jax.random.split``
    (``tags = arange(n)``) for the per-step and per-site keys of the estimators.
    """
    tags = jnp.asarray(tags, jnp.uint32)
    data_shape = jax.random.key_data(key).shape
    words = _derive(key, tags, math.prod(data_shape), _FOLD)
    words = words.reshape(*tags.shape, *data_shape)
    return jax.random.wrap_key_data(words, impl=jax.random.key_impl(key))


def check_counter_range(shape: tuple[int, ...]) -> int:
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(
            f"A tangent array of {size} elements (num_tangents x parameter size) exceeds the "
            "2**32 counter range of the hashed tangent generator; split the parameter into "
            "smaller leaves or use fewer tangents."
        )
    return size


def counters(shape: tuple[int, ...], offset: Array | None = None) -> Array:
    """uint32 counters of ``shape``: each element's flat index, plus ``offset`` if given.

    Tangent ``k`` of a leaf of ``n`` elements is drawn with ``offset = k n``, bitwise equal
    to row ``k`` of the ``(K, n)`` draw.
    """
    size = check_counter_range(shape)
    c = (
        jax.lax.iota(jnp.uint32, size).reshape(shape)
        if len(shape) != 1
        else jax.lax.iota(jnp.uint32, size)
    )
    return c if offset is None else c + offset


def stacked_counters(shape: tuple[int, ...], axis: int, ks: Array) -> Array:
    """The counters of tangents ``ks`` (a uint32 vector) of a leaf, stacked at ``axis``.

    Computed in that layout (no transpose for XLA to materialise): element ``i`` along
    ``axis`` holds ``ks[i] * size + j`` for the leaf's flat index ``j``, so tangent ``k``
    is bitwise the one :func:`counters` gives with ``offset = k * size``.
    """
    size = max(math.prod(shape), 1)
    leaf = jnp.expand_dims(counters(shape), axis)
    k = jnp.expand_dims(ks, [d for d in range(len(shape) + 1) if d != axis])
    return leaf + k * np.uint32(size)


def hash_of(seed: Array, c: Array) -> Array:
    """32 random bits per counter: ``lowbias32(c * (s1 | 1) + s0)``."""
    return mix32(c * (seed[1] | _ONE) + seed[0])


def hash_bits(seed: Array, shape: tuple[int, ...], offset: Array | None = None) -> Array:
    """32 random bits per element of ``shape`` (see :func:`counters`)."""
    return hash_of(seed, counters(shape, offset))


def rademacher_at(seed: Array, c: Array) -> Array:
    """``±1`` float32 draws, one per counter (the hash's top bit)."""
    h = hash_of(seed, c)
    bits = (h & np.uint32(0x80000000)) | np.uint32(0x3F800000)  # ±1.0f: sign bit + exponent
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _horner(coeffs, x):
    acc = jnp.full_like(x, f32(coeffs[0]))
    for c in coeffs[1:]:
        acc = acc * x + f32(c)
    return acc


# log1p(x) = x * P(x) on [sqrt(1/2) - 1, sqrt(2) - 1]: a degree-8 least-squares fit on
# Chebyshev nodes (fitted here with numpy), max abs error 5e-8 in float32.
_LOG1P = (
    0.08743945356934806,
    -0.1437733056949039,
    0.14949095475599383,
    -0.1656069599179035,
    0.19956977483091615,
    -0.25002153460963117,
    0.3333418333852327,
    -0.4999998703228481,
    0.999999974267438,
)


def _fast_log(x: Array) -> Array:
    """Natural log of positive normal float32: exponent bits plus a polynomial, no division.

    (A division would make XLA:CPU split the draw into two loops with a stored intermediate.)
    """
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    e = (i >> np.int32(23)) - np.int32(127)
    m = jax.lax.bitcast_convert_type((i & np.int32(0x7FFFFF)) | np.int32(0x3F800000), jnp.float32)
    big = m > f32(1.4142135)
    m = jnp.where(big, m * f32(0.5), m)
    e = e + big.astype(jnp.int32)
    t = m - f32(1)
    return e.astype(jnp.float32) * f32(math.log(2)) + t * _horner(_LOG1P, t)


# cos(x) = C(x²) on [0, π/2]: a degree-5 least-squares fit in x² on Chebyshev nodes (fitted
# here with numpy), max abs error 2.5e-10.
_COS = (
    -2.6076732257393936e-07,
    2.476181007181717e-05,
    -0.0013888399923088445,
    0.0416666400793391,
    -0.49999999503407155,
    0.9999999999057397,
)

# Constants that turn a leaf's two seed words into the seed words of a second,
# independent stream (for the Gaussian's angle): odd 32-bit mixing constants.
_STREAM2 = (np.uint32(0x9E3779B9), np.uint32(0x85EBCA6B))


def _unit_open(bits: Array, nbits: int) -> Array:
    """``(2j + 1) 2**-(nbits+1)`` in (0, 1) from the top ``nbits`` bits (exact for nbits <= 23)."""
    j = (bits >> np.uint32(32 - nbits)) * np.uint32(2) + _ONE
    # int32 -> float32 converts faster than uint32 -> float32 on XLA:CPU; j < 2**25 fits.
    return j.astype(jnp.int32).astype(jnp.float32) * f32(2.0 ** -(nbits + 1))


def normal_at(seed: Array, c: Array) -> Array:
    """Standard normal float32 draws, one per counter, one Box-Muller radius and angle each.

    ``z = s · sqrt(-2 ln u) · cos(πv/2)`` with ``u`` (23 bits) from one hash stream, ``v``
    (23 bits) and the sign ``s`` from a second, independent stream. By Box-Muller
    ``sqrt(-2 ln u) cos θ`` with θ uniform on the circle is exactly N(0, 1), and
    ``cos θ`` has the distribution of ``s cos(πv/2)`` (|cos θ| and its sign are
    independent, and |cos θ| ~ cos of a uniform angle on [0, π/2]). Each element has its
    own ``(u, v, s)``, so elements are independent. Cheaper than an inverse CDF: one log,
    one sqrt and one short polynomial, no tail branch.
    """
    h1 = hash_of(seed, c)
    seed2 = jnp.stack([mix32(seed[0] ^ _STREAM2[0]), mix32(seed[1] ^ _STREAM2[1])])
    h2 = hash_of(seed2, c)
    radius = jnp.sqrt(f32(-2) * _fast_log(_unit_open(h1, 23)))
    phi = _unit_open(h2, 23) * f32(math.pi / 2)
    z = radius * _horner(_COS, phi * phi)
    sign = (h2 & _ONE) << np.uint32(31)
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(z, jnp.uint32) ^ sign, jnp.float32
    )


def normal(seed: Array, shape: tuple[int, ...], offset: Array | None = None) -> Array:
    """Standard normal float32 draws of ``shape`` (see :func:`normal_at`)."""
    return normal_at(seed, counters(shape, offset))

"""Counter-based random numbers for tangents: cheap, elementwise, fusable, reproducible.

``jax.random`` (threefry-2x32, 20 rounds per 64 bits) costs about as much as a backprop
step when it draws one number per parameter (20M normals: ~230-275 ms on a 2-core CPU,
against ~7-13 ms for a 64x4096x4096 matmul). A forward gradient needs one number per
parameter per step, so the tangent generator must be cheap.

Here every number is a pure function of ``(seed words, counter)``: the counter is the
element's flat index in the ``(K, *leaf.shape)`` tangent array and the two seed words of
each leaf come from ``jax.random.bits(key, (n_leaves, 2))`` (threefry, a handful of
numbers), so leaves, steps and keys get independent streams and typed and legacy keys
both work. The per-element hash is a keyed Weyl sequence ``c * (s1 | 1) + s0`` (a
different odd increment per stream, so two streams are never shifted copies of each
other) followed by Wellons' ``lowbias32`` finaliser (a bijection of uint32 with very low
avalanche bias). It is elementwise integer arithmetic (iota, multiply, xor, shift), so XLA
fuses it into its consumers and can recompute it where it is needed instead of storing
it (MeZO's regenerate-from-seed trick).

Draws (float32):

* :func:`rademacher` -- the top bit of the hash gives the sign.
* :func:`normal` -- inverse CDF of a 23-bit uniform on (0, 1/2) (Giles' single-precision
  ``erfinv`` polynomials, with a bit-trick log and sqrt because XLA:CPU's ``log``/``sqrt``
  are slow) times a random sign from another bit of the same hash. The uniform grid is
  ``(2j + 1) 2**-25``, symmetric, so odd moments are exactly 0; ``|z| <= 5.42`` (the same
  tail cut as ``jax.random.normal``'s 23-bit uniforms); max abs error of the inverse CDF
  on the grid about 1e-6.

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


def seed_words(key: Array, n: int) -> Array:
    """``(n, 2)`` uint32 seed words, one pair per leaf, drawn from ``key`` by jax.random."""
    return jax.random.bits(key, (n, 2), jnp.uint32)


def check_counter_range(shape: tuple[int, ...]) -> int:
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(
            f"A tangent array of {size} elements (num_tangents x parameter size) exceeds the "
            "2**32 counter range of the hashed tangent generator; split the parameter into "
            "smaller leaves or use fewer tangents."
        )
    return size


def hash_bits(seed: Array, shape: tuple[int, ...], offset: Array | None = None) -> Array:
    """32 random bits per element of ``shape``: ``lowbias32(c * (s1 | 1) + s0)``.

    ``c`` is the element's flat index plus ``offset`` (a uint32 scalar): tangent ``k`` of a
    leaf of ``n`` elements is drawn with ``offset = k n``, bitwise equal to row ``k`` of the
    ``(K, n)`` draw.
    """
    size = check_counter_range(shape)
    c = (
        jax.lax.iota(jnp.uint32, size).reshape(shape)
        if len(shape) != 1
        else jax.lax.iota(jnp.uint32, size)
    )
    if offset is not None:
        c = c + offset
    return mix32(c * (seed[1] | _ONE) + seed[0])


def rademacher(seed: Array, shape: tuple[int, ...], offset: Array | None = None) -> Array:
    """``±1`` float32 draws of ``shape`` (the hash's top bit)."""
    h = hash_bits(seed, shape, offset)
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


def _fast_sqrt(w: Array) -> Array:
    """sqrt of positive float32 by the rsqrt bit trick and three Newton steps."""
    i = jax.lax.bitcast_convert_type(w, jnp.int32)
    y = jax.lax.bitcast_convert_type(np.int32(0x5F3759DF) - (i >> np.int32(1)), jnp.float32)
    for _ in range(3):
        y = y * (f32(1.5) - f32(0.5) * w * y * y)
    return w * y


# Giles (2010), "Approximating the erfinv function", single-precision coefficients.
_G_CENTRAL = (
    2.81022636e-08,
    3.43273939e-07,
    -3.5233877e-06,
    -4.39150654e-06,
    0.00021858087,
    -0.00125372503,
    -0.00417768164,
    0.246640727,
    1.50140941,
)
_G_TAIL = (
    -0.000200214257,
    0.000100950558,
    0.00134934322,
    -0.00367342844,
    0.00573950773,
    -0.0076224613,
    0.00943887047,
    1.00167406,
    2.83297682,
)


def neg_ndtri_lower(p: Array) -> Array:
    """``-Φ⁻¹(p)`` for ``p`` in (0, 1/2] (so the result is >= 0)."""
    w = -_fast_log(f32(4) * p * (f32(1) - p))  # = -log(1 - x²), x = 1 - 2p
    central = _horner(_G_CENTRAL, w - f32(2.5))
    tail = _horner(_G_TAIL, _fast_sqrt(w) - f32(3))
    x = f32(1) - f32(2) * p
    return f32(math.sqrt(2)) * x * jnp.where(w < f32(5), central, tail)


def fake_zero(anchor: Array | None) -> Array:
    """A uint32 zero that XLA cannot prove is zero, computed from ``anchor``'s first element.

    Adding it to a seed makes a draw depend on ``anchor``: XLA then neither merges the draw
    with an identical one elsewhere (CSE) nor schedules it before ``anchor`` exists.
    """
    if anchor is None or anchor.size == 0:
        return np.uint32(0)
    a = jnp.ravel(anchor)[0].astype(jnp.float32)
    bit = jax.lax.bitcast_convert_type(a, jnp.uint32) >> np.uint32(31)
    return bit & (bit ^ _ONE)


def materialize(x: Array, seed: Array) -> Array:
    """Returns ``x`` unchanged, through one floating divide so that XLA stores it.

    XLA:CPU removes ``optimization_barrier`` before fusion and happily duplicates cheap
    elementwise producers into every consumer; for an expensive draw (the Gaussian) that
    means recomputing it per use, and for low-rank factors recomputing each factor entry
    for every kernel element. A divide is an "expensive" op that XLA does not duplicate
    into a broadcasting consumer, so the draw is computed once into a buffer. Scaling by a
    power of two and back is exact: the values are bitwise unchanged.
    """
    two = (np.uint32(1) << (seed[0] & np.uint32(1))).astype(jnp.float32)  # 1.0 or 2.0
    return (x * two) / two


def normal(seed: Array, shape: tuple[int, ...], offset: Array | None = None) -> Array:
    """Standard normal float32 draws of ``shape``: inverse CDF of hashed bits."""
    h = hash_bits(seed, shape, offset)
    # 23 high bits -> p = (2j + 1) 2**-25 in (0, 1/2), exactly representable.
    p = ((h >> np.uint32(9)) * np.uint32(2) + _ONE).astype(jnp.float32) * f32(2.0**-25)
    z = neg_ndtri_lower(p)
    sign = (h & _ONE) << np.uint32(31)
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(z, jnp.uint32) ^ sign, jnp.float32
    )

"""Statistical quality and reproducibility of the hashed tangent generators (fgrad_jax._random).

Tolerances are stated per test. With n draws, a sample mean of unit-variance draws has
standard deviation 1/sqrt(n) and a sample correlation of independent draws about 1/sqrt(n);
every bound below is at least 5 of those standard deviations, so a correct generator fails
with probability < 1e-6 per check (and the keys are fixed, so the tests are deterministic).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

import fgrad_jax
from fgrad_jax import _random
from fgrad_jax._tangents import HASHED, TANGENTS

N = 1 << 20  # draws per moment check
SD = 1 / math.sqrt(N)


def _draw(name, key, shape):
    seeds = _random.seed_words(key, 1)
    return np.asarray(HASHED[name].draw(seeds[0], shape), np.float64)


@pytest.mark.parametrize("name", ["rademacher", "normal"])
def test_moments(name):
    z = _draw(name, jax.random.key(0), (N,))
    assert abs(z.mean()) < 6 * SD
    if name == "rademacher":
        assert set(np.unique(z)) == {-1.0, 1.0}
        assert z.var() == pytest.approx(1.0, abs=1e-12 + 36 * SD**2)
        assert np.mean(z**4) == 1.0
    else:
        # sd of the sample variance sqrt(2/n), of the 4th moment sqrt(96/n), of the 3rd sqrt(15/n).
        assert np.mean(z**2) == pytest.approx(1.0, abs=6 * math.sqrt(2) * SD)
        assert np.mean(z**3) == pytest.approx(0.0, abs=6 * math.sqrt(15) * SD)
        assert np.mean(z**4) == pytest.approx(3.0, abs=6 * math.sqrt(96) * SD)
        # |z| <= sqrt(-2 ln 2**-24) = 5.768: the smallest 23-bit uniform is 2**-24.
        assert np.abs(z).max() <= math.sqrt(48 * math.log(2))


def test_normal_distribution_ks():
    """Kolmogorov-Smirnov distance to N(0,1) below the 1e-6 critical value (~2.6/sqrt(n))."""
    z = np.sort(_draw("normal", jax.random.key(1), (N,)))
    cdf = special.ndtr(z)
    emp_hi = np.arange(1, N + 1) / N
    d = max(np.max(emp_hi - cdf), np.max(cdf - (emp_hi - 1 / N)))
    assert d < 2.6 * SD


def test_normal_is_box_muller_of_its_bits_to_1e_6():
    """The float32 draw equals the float64 Box-Muller transform of the same hash bits.

    Catches errors in the log/cos polynomials and in the bit handling that the moment and
    KS tests are too coarse to see.
    """
    seed = jnp.array([5, 7], jnp.uint32)
    z = np.asarray(_random.normal(seed, (N,)), np.float64)
    h1 = np.asarray(_random.hash_bits(seed, (N,))).astype(np.uint64)
    seed2 = jnp.stack([_random.mix32(seed[i] ^ _random._STREAM2[i]) for i in range(2)])
    h2 = np.asarray(_random.hash_bits(seed2, (N,))).astype(np.uint64)
    u = ((h1 >> 9) * 2 + 1) * 2.0**-24
    v = ((h2 >> 9) * 2 + 1) * 2.0**-24
    want = np.sqrt(-2 * np.log(u)) * np.cos(np.pi / 2 * v) * np.where(h2 & 1, -1.0, 1.0)
    assert np.max(np.abs(z - want)) < 1.5e-6


def test_normal_independent_radius_and_angle_streams():
    """Radius and angle come from different streams: a shared stream would correlate |z|
    with the sign or the angle; check |z| is uncorrelated with neighbours' |z| and signs."""
    z = _draw("normal", jax.random.key(4), (N,))
    a = np.abs(z)
    lim = 6 * SD
    assert abs(_corr(a, np.sign(z))) < lim
    assert abs(_corr(a[:-1], a[1:])) < lim
    # P(|z| < 1) = 0.6827, sd sqrt(p(1-p)/n)
    assert np.mean(a < 1) == pytest.approx(0.682689, abs=6 * math.sqrt(0.6827 * 0.3173) * SD)


def _corr(a, b):
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    return float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)))


@pytest.mark.parametrize("name", ["rademacher", "normal"])
def test_no_correlation_across_leaves_tangents_steps_neighbours(name):
    n = 1 << 18
    lim = 6 / math.sqrt(n)
    key = jax.random.key(3)
    leaves = [jnp.zeros((n,)), jnp.zeros((n // 512, 512))]
    a, b = (np.asarray(t, np.float64) for t in TANGENTS[name](key, leaves, 4))
    # across leaves (same tangent index), across the K tangents of one leaf
    for k in range(4):
        assert abs(_corr(a[k], b[k])) < lim
    for k in range(3):
        assert abs(_corr(a[k], a[k + 1])) < lim
        assert abs(_corr(b[k], b[k + 1])) < lim
    # across steps (the transform's key of step t is step_key(key, t)) and across
    # neighbouring integer seeds
    steps = [fgrad_jax.step_key(key, t) for t in range(3)] + [jax.random.key(4)]
    later = [np.asarray(TANGENTS[name](k, leaves, 1)[0][0], np.float64) for k in steps]
    for x, y in zip([a[0], *later], later):
        assert abs(_corr(x, y)) < lim
    # neighbouring elements (lag 1 and lag 32) and squared values (dependence beyond linear)
    flat = a.ravel()
    for lag in (1, 2, 32):
        assert abs(_corr(flat[:-lag], flat[lag:])) < lim / 2
    if name == "normal":
        assert abs(_corr(flat[:-1] ** 2, flat[1:] ** 2)) < lim / 2


def test_same_key_same_bits_and_legacy_key():
    leaves = [jnp.zeros((300, 7)), jnp.zeros((5,))]
    for name in ("rademacher", "normal"):
        x = TANGENTS[name](jax.random.key(7), leaves, 3)
        y = TANGENTS[name](jax.random.key(7), leaves, 3)
        z = TANGENTS[name](jax.random.PRNGKey(7), leaves, 3)
        for u, v, w in zip(x, y, z):
            np.testing.assert_array_equal(u, v)
            np.testing.assert_array_equal(u, w)
        other = TANGENTS[name](jax.random.key(8), leaves, 3)
        assert not np.array_equal(x[0], other[0])


def test_derived_seed_words_pass_a_chi_square_byte_test():
    """The words hashed from a key (per leaf, and per step through step_key) are uniform in
    every byte (chi-square, 255 dof, p > 1e-6), for a key whose data is mostly zero bits."""
    n = 1 << 16
    key = jax.random.PRNGKey(0)  # data [0, 0]
    per_leaf = np.asarray(_random.seed_words(key, n)).ravel()
    per_step = np.asarray(
        jax.random.key_data(_random.fold_in(key, jnp.arange(n, dtype=jnp.uint32)))
    ).ravel()
    for words in (per_leaf, per_step):
        assert len(np.unique(words)) > 0.99 * len(words)
        for shift in (0, 8, 16, 24):
            counts = np.bincount((words >> shift) & 0xFF, minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-6, shift


def test_bits_pass_a_chi_square_byte_test():
    """Every byte of the 32-bit hash output is uniform (chi-square, 255 dof, p > 1e-6)."""
    h = np.asarray(_random.hash_bits(jnp.array([11, 22], jnp.uint32), (N // 4,)))
    for shift in (0, 8, 16, 24):
        counts = np.bincount((h >> shift) & 0xFF, minlength=256)
        p = stats.chisquare(counts).pvalue
        assert p > 1e-6, (shift, p)


@pytest.mark.parametrize("name", ["rademacher", "normal"])
def test_regenerated_tangents_equal_the_jvp_tangents(name):
    """f(p) = a·p: the estimate must be exactly (a·v) v for the tangents v of the key."""
    a = jax.random.normal(jax.random.key(0), (1000,))
    f = lambda p: jnp.dot(a, p)
    key = jax.random.key(5)
    g = jax.jit(fgrad_jax.forward_grad(f, tangent=name, num_tangents=2))(key, jnp.zeros(1000))
    (v,) = TANGENTS[name](key, [jnp.zeros(1000)], 2)
    want = (jnp.dot(v, a)[:, None] * v).mean(0)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rademacher", "normal"])
def test_unbiased_and_second_moment(name):
    """Mean of M estimates vs jax.grad; E|g|² = n|∇f|² (Rademacher) or (n+2)|∇f|² (normal)."""
    n, m = 16, 20000
    w = jnp.linspace(-1.0, 1.0, n)
    f = lambda p: jnp.sum(w * p) + 0.5 * jnp.sum(p**2)
    p0 = jnp.linspace(0.5, -0.3, n)
    true = np.asarray(jax.grad(f)(p0), np.float64)
    est = jax.jit(jax.vmap(fgrad_jax.forward_grad(f, tangent=name), in_axes=(0, None)))
    g = np.asarray(est(jax.random.split(jax.random.key(9), m), p0), np.float64)
    sq = float(np.dot(true, true))
    # Var(g_i) = sq - true_i² (+ 2 true_i² for normal): tolerance 6 standard errors.
    var = sq + (true**2 if name == "normal" else -(true**2))
    np.testing.assert_array_less(np.abs(g.mean(0) - true), 6 * np.sqrt(var / m))
    second = np.mean(np.sum(g**2, axis=1))
    want = (n if name == "rademacher" else n + 2) * sq
    assert second == pytest.approx(want, rel=0.05)


def test_rademacher_has_lower_variance_than_normal():
    n, m = 32, 4000
    true = jnp.arange(1.0, n + 1)
    f = lambda p: jnp.dot(true, p)
    out = {}
    for name in ("rademacher", "normal"):
        est = jax.vmap(fgrad_jax.forward_grad(f, tangent=name), in_axes=(0, None))
        g = np.asarray(est(jax.random.split(jax.random.key(2), m), jnp.zeros(n)), np.float64)
        out[name] = np.mean(np.sum((g - np.asarray(true)) ** 2, axis=1))
    # Expected ratio of total variances (n-1)/(n+1) ≈ 0.94; with m = 4000 the noise is ~3%.
    assert out["rademacher"] < out["normal"]


def test_bf16_leaves_and_counter_range_error():
    p = {"w": jnp.ones((8, 4), jnp.bfloat16), "b": jnp.ones((4,), jnp.float32)}
    f = lambda q: jnp.sum(q["w"].astype(jnp.float32) ** 2) + jnp.sum(q["b"])
    for name in ("rademacher", "normal"):
        g = fgrad_jax.forward_grad(f, tangent=name)(jax.random.key(0), p)
        assert g["w"].dtype == jnp.bfloat16 and g["b"].dtype == jnp.float32
    with pytest.raises(ValueError, match="2\\*\\*32"):
        _random.hash_bits(jnp.array([1, 2], jnp.uint32), (1 << 16, 1 << 16))


@pytest.mark.parametrize("name", ["rademacher", "normal"])
def test_lazy_per_leaf_draws_equal_the_one_flat_draw(name):
    """Issue 20: the leaves are consecutive ranges of one stream, so the lazy per-leaf draws
    (each leaf's seed and counter base) and the single stored draw give bitwise the same
    tangents, one seed for all leaves, a leaf's K tangents at ``K·offset``."""
    leaves = [jnp.zeros((3, 5)), jnp.zeros((7,), jnp.bfloat16), jnp.zeros((2, 2, 4))]
    key, k = jax.random.key(9), 3
    strategy = HASHED[name]
    flat = strategy(key, leaves, k)
    seeds, bases = _random.leaf_streams(key, [leaf.size for leaf in leaves], k)
    assert bases == [0, 3 * 15, 3 * 22]
    assert (np.asarray(seeds) == np.asarray(seeds[0])).all()
    for i, leaf in enumerate(leaves):
        draw = strategy.lazy_draw(leaf, False, bases[i])
        lazy = jax.vmap(lambda kk, i=i, draw=draw: draw(seeds[i], kk))(
            jnp.arange(k, dtype=jnp.uint32)
        )
        np.testing.assert_array_equal(lazy, flat[i].astype(leaf.dtype))


def test_leaf_streams_past_the_counter_range_give_each_leaf_its_own_seed():
    """Where ``K·N`` counters overflow uint32 one stream would repeat: each leaf then gets
    its own hashed seed and its own counter range (no array of that size is built here)."""
    seeds, bases = _random.leaf_streams(jax.random.key(0), [2**31, 2**31], 1)
    assert bases == [0, 0]
    np.testing.assert_array_equal(seeds, _random.seed_words(jax.random.key(0), 2))
    assert not (np.asarray(seeds[0]) == np.asarray(seeds[1])).all()

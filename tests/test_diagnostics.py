"""Tests of fgrad_jax.diagnostics against closed forms.

Statistical tolerance: a sample variance over S independent estimates is the mean of the S
squared deviations, so its standard error is estimated from their empirical spread, and
|z| < 5 is required (false failure probability ~6e-7 per check).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad_jax
from fgrad_jax import diagnostics

Z_MAX = 5.0
D = 10
A = {"u": jnp.linspace(-1.0, 2.0, 6, dtype=jnp.float32), "v": jnp.array([0.5, -1.5, 1.0, 0.25])}
THETA = jax.tree_util.tree_map(jnp.zeros_like, A)


def linear(theta):
    return sum(jnp.dot(A[k], theta[k]) for k in A)


def flat(tree):
    return np.concatenate(
        [np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)]
    )


def squared_deviations(estimator, key, n):
    keys = jax.random.split(key, n)
    est = np.asarray(
        jax.jit(
            jax.vmap(
                lambda k: jnp.concatenate(
                    [jnp.ravel(x) for x in jax.tree_util.tree_leaves(estimator(k, THETA))]
                )
            )
        )(keys),
        np.float64,
    )
    dev = est - est.mean(0)
    return (dev**2).sum(1) * n / (n - 1)


@pytest.mark.parametrize(
    ("tangent", "num_tangents", "per_coordinate"),
    [
        # Var(g_i) = Σ_{j≠i} a_j² (Rademacher), |a|² + a_i² (Gaussian), divided by K.
        ("rademacher", 1, lambda a2, ai2: a2 - ai2),
        ("rademacher", 4, lambda a2, ai2: (a2 - ai2) / 4),
        ("normal", 1, lambda a2, ai2: a2 + ai2),
    ],
)
def test_estimator_variance_closed_forms(tangent, num_tangents, per_coordinate):
    """Total: (d − 1)|a|²/K (Rademacher), (d + 1)|a|² (Gaussian), and per leaf."""
    estimator = fgrad_jax.forward_grad(linear, num_tangents=num_tangents, tangent=tangent)
    key, n = jax.random.key(4), 20_000
    report = diagnostics.estimator_variance(estimator, key, n, THETA)
    a = flat(A)
    a2 = (a**2).sum()
    expected_leaf = {k: per_coordinate(a2, np.asarray(A[k], np.float64) ** 2).sum() for k in A}
    expected_total = sum(expected_leaf.values())
    factor = {"rademacher": (D - 1) / num_tangents, "normal": D + 1}[tangent]
    np.testing.assert_allclose(expected_total, factor * a2, rtol=1e-12)  # the stated form
    sq = squared_deviations(estimator, key, n)
    se = sq.std(ddof=1) / np.sqrt(n)
    np.testing.assert_allclose(float(report.total), sq.mean(), rtol=1e-4)  # same keys
    assert abs(float(report.total) - expected_total) / se < Z_MAX
    for k in A:  # per-leaf: same test with the leaf's share of the spread
        assert abs(float(report.per_leaf[k]) - expected_leaf[k]) < Z_MAX * se
    np.testing.assert_allclose(
        float(report.total), sum(float(v) for v in report.per_leaf.values()), rtol=1e-5
    )
    assert report.num_samples == n
    mean_se = np.sqrt(factor * a2 / n)
    assert np.abs(flat(report.mean) - a).max() < Z_MAX * mean_se


def test_chunked_accumulation_matches_one_pass():
    estimator = fgrad_jax.forward_grad(linear, num_tangents=2, tangent="normal")
    key = jax.random.key(9)
    one = diagnostics.estimator_variance(estimator, key, 300, THETA, batch_size=300)
    chunked = diagnostics.estimator_variance(estimator, key, 300, THETA, batch_size=7)
    np.testing.assert_allclose(float(one.total), float(chunked.total), rtol=1e-5)
    np.testing.assert_allclose(flat(one.mean), flat(chunked.mean), rtol=1e-5, atol=1e-6)


def test_spsa_second_moment_is_mezo_lemma_2():
    """Rademacher SPSA on a quadratic: E|g|² = (d + n − 1)/n |∇f|², variance (d − 1)/n |∇f|²."""
    c = jnp.arange(1.0, D + 1.0)
    f = lambda t: 0.5 * jnp.sum(c * t["x"] ** 2)
    theta = {"x": jnp.linspace(-1.0, 1.0, D)}
    grad2 = float(jnp.sum((c * theta["x"]) ** 2))
    n = 3
    estimator = fgrad_jax.forward_grad(f, num_tangents=n, tangent=fgrad_jax.spsa(1e-2))
    key, s = jax.random.key(2), 20_000
    report = diagnostics.estimator_variance(estimator, key, s, theta)
    keys = jax.random.split(key, s)
    est = np.asarray(jax.jit(jax.vmap(lambda k: estimator(k, theta)["x"]))(keys), np.float64)
    sq = ((est - est.mean(0)) ** 2).sum(1)
    z = abs(float(report.total) - (D - 1) / n * grad2) / (sq.std(ddof=1) / np.sqrt(s))
    assert z < Z_MAX


def test_snr_per_leaf_closed_form():
    """Rademacher FG on f = aᵀθ: SNR_L = |a_L|² / Σ_{i∈L} (|a|² − a_i²)."""
    estimator = fgrad_jax.forward_grad(linear, tangent="rademacher")
    keys = jax.random.split(jax.random.key(6), 20_000)
    est = jax.jit(jax.vmap(lambda k: estimator(k, THETA)))(keys)
    a2 = float(flat(A) @ flat(A))
    with_ref = diagnostics.snr_per_leaf(est, diagnostics.true_gradient(linear, THETA))
    from_samples = diagnostics.snr_per_leaf(est)
    for k in A:
        ak = np.asarray(A[k], np.float64)
        expected = (ak**2).sum() / (a2 - ak**2).sum()
        # Relative error of a variance from 20 000 draws: a few percent at most.
        np.testing.assert_allclose(float(with_ref[k]), expected, rtol=0.05)
        np.testing.assert_allclose(float(from_samples[k]), expected, rtol=0.05)


def test_cosine_similarity():
    est = {"a": jnp.array([1.0, 2.0]), "n": jnp.array(3), "b": jnp.array([[0.5, -1.0]])}
    ref = {"a": jnp.array([0.0, 1.0]), "n": jnp.array(7), "b": jnp.array([[2.0, 2.0]])}
    e, r = np.array([1.0, 2.0, 0.5, -1.0]), np.array([0.0, 1.0, 2.0, 2.0])
    want = e @ r / np.linalg.norm(e) / np.linalg.norm(r)  # the int leaf is ignored
    np.testing.assert_allclose(float(diagnostics.cosine_similarity(est, ref)), want, rtol=1e-6)
    np.testing.assert_allclose(
        float(jax.jit(diagnostics.cosine_similarity)(est, est)), 1.0, rtol=1e-6
    )
    zero = jax.tree_util.tree_map(jnp.zeros_like, est)
    assert np.isnan(float(diagnostics.cosine_similarity(zero, ref)))
    with pytest.raises(ValueError, match="same pytree structure"):
        diagnostics.cosine_similarity(est, {"a": ref["a"]})


def test_isotropic_cosine_is_about_sqrt_k_over_d():
    """E cos² = E (a·v)²/(|a|²|v|²) = 1/d for one Rademacher tangent (|v|² = d)."""
    d = 400
    a = jnp.linspace(-1.0, 1.0, d)
    estimator = fgrad_jax.forward_grad(lambda t: jnp.dot(a, t), tangent="rademacher")
    keys = jax.random.split(jax.random.key(1), 4000)
    cos = np.asarray(
        jax.jit(jax.vmap(lambda k: diagnostics.cosine_similarity(estimator(k, jnp.zeros(d)), a)))(
            keys
        ),
        np.float64,
    )
    z = abs((cos**2).mean() - 1 / d) / ((cos**2).std(ddof=1) / np.sqrt(len(cos)))
    assert z < Z_MAX


def test_true_gradient_and_errors():
    g = diagnostics.true_gradient(
        lambda x, y: jnp.sum(x * y), jnp.ones(3), jnp.arange(3.0), argnums=1
    )
    np.testing.assert_array_equal(g, jnp.ones(3))
    estimator = fgrad_jax.forward_grad(linear)
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        diagnostics.estimator_variance(estimator, jax.random.key(0), 1, THETA)
    with pytest.raises(TypeError, match="PRNG key"):
        diagnostics.estimator_variance(estimator, 0, 10, THETA)

"""Tests of guided tangents (fgrad_jax.guided, guided_forward_gradient).

Statistical tolerance as in test_estimator.py: z-tests on the mean of N = 20 000
independent estimates with the empirical standard error, |z| < 5 per component.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad_jax

Z_MAX = 5.0


def loss(params, x):
    h = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.sum(h**2) + jnp.sin(params["c"])


PARAMS = {
    "w": jnp.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6]], jnp.float32),
    "b": jnp.array([0.05, -0.1, 0.2], jnp.float32),
    "c": jnp.array(0.7, jnp.float32),
}
GUESS = {
    "w": jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], jnp.float32),
    "b": jnp.array([0.0, 2.0, 0.0], jnp.float32),
    "c": jnp.array(1.0, jnp.float32),
}
X = jnp.array([[1.0, -2.0], [0.5, 0.25]], jnp.float32)


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def samples(residual_scale, num_tangents=2, n=20_000, distribution="rademacher"):
    estimator = fgrad_jax.forward_grad(
        loss,
        num_tangents=num_tangents,
        tangent=fgrad_jax.guided(GUESS, residual_scale=residual_scale, distribution=distribution),
    )
    keys = jax.random.split(jax.random.key(0), n)
    est = jax.jit(jax.vmap(lambda k: flat(estimator(k, PARAMS, X))))(keys)
    return np.asarray(est, np.float64)


def max_z(s, expected):
    se = s.std(0, ddof=1) / np.sqrt(len(s))
    return float((np.abs(s.mean(0) - expected) / np.maximum(se, 1e-12)).max())


def expected_mean(residual_scale):
    grad = np.asarray(flat(jax.grad(loss)(PARAMS, X)), np.float64)
    u = np.asarray(flat(GUESS), np.float64)
    u = u / np.linalg.norm(u)
    orth = grad - (grad @ u) * u
    return grad - (1 - residual_scale) * orth, grad


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_bias_is_the_stated_formula(distribution):
    """E[g] = ∇f − (1 − λ)(I − ĝĝᵀ)∇f, measured; and that differs from ∇f detectably."""
    s = samples(0.3, distribution=distribution)
    formula, grad = expected_mean(0.3)
    assert max_z(s, formula) < Z_MAX
    assert max_z(s, grad) > 4 * Z_MAX


def test_unbiased_with_residual_scale_one():
    s = samples(1.0)
    _, grad = expected_mean(1.0)
    assert max_z(s, grad) < Z_MAX
    assert np.abs(s[0] - grad).max() > 1e-3


def test_projection_is_exact_and_noise_free():
    """λ = 0: g = (∇f·ĝ)ĝ for every key (Fournier et al.'s projection on the guess)."""
    s = samples(0.0, n=8)
    formula, _ = expected_mean(0.0)
    np.testing.assert_allclose(s, np.broadcast_to(formula, s.shape), atol=1e-5)


def test_zero_guess_is_the_plain_forward_gradient():
    zero = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
    key = jax.random.key(3)
    got = fgrad_jax.forward_grad(
        loss, num_tangents=3, tangent=fgrad_jax.guided(zero, residual_scale=0.2)
    )(key, PARAMS, X)
    want = fgrad_jax.forward_grad(loss, num_tangents=3, tangent="rademacher")(key, PARAMS, X)
    np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-6)


def _mean_cosine(tx, steps=600, last=200, n=1000):
    """SGD on f = ½ Σ a_i θ_i² (n dims); mean cosine(update, ∇f) over the last steps."""
    a = jnp.exp(jnp.linspace(jnp.log(0.1), 0.0, n))
    f = lambda t: 0.5 * jnp.sum(a * t * t)
    theta = jax.random.normal(jax.random.key(5), (n,))

    def step(carry, _):
        theta, state = carry
        updates, state = tx.update(None, state, theta, value_fn=f)
        cos = fgrad_jax.diagnostics.cosine_similarity(updates, a * theta)
        return (theta - 0.05 / n * updates, state), cos

    _, cos = jax.lax.scan(step, (theta, tx.init(theta)), None, length=steps)
    return float(jnp.mean(cos[-last:]))


def test_guided_tangents_align_better_than_isotropic_after_warm_up():
    """1000 dims, the same K + 1 = 2 tangents per step: isotropic estimates have cosine
    ≈ sqrt(2/1000) ≈ 0.045 to the gradient; guided ones, once the guess has averaged a
    few hundred steps, several times that."""
    iso = _mean_cosine(fgrad_jax.forward_gradient(0, num_tangents=2, tangent="rademacher"))
    guided = _mean_cosine(
        fgrad_jax.guided_forward_gradient(0, num_tangents=1, residual_scale=0.1, beta=0.99)
    )
    assert iso < 0.08, iso
    assert guided > 0.15 and guided > 3 * iso, (guided, iso)


def test_errors():
    with pytest.raises(ValueError, match="residual_scale must be in"):
        fgrad_jax.guided(GUESS, residual_scale=1.5)
    with pytest.raises(ValueError, match="beta must be in"):
        fgrad_jax.guided_forward_gradient(beta=1.0)
    with pytest.raises(ValueError, match="num_tangents must be >= 1"):
        fgrad_jax.guided_forward_gradient(num_tangents=0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        fgrad_jax.guided(GUESS, distribution="sphere")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="structure of the differentiated argument"):
        fgrad_jax.forward_grad(loss, tangent=fgrad_jax.guided(GUESS["w"]))(key, PARAMS, X)
    bad = dict(GUESS, b=jnp.zeros(4))
    with pytest.raises(ValueError, match="guess leaf has shape"):
        fgrad_jax.forward_grad(loss, tangent=fgrad_jax.guided(bad))(key, PARAMS, X)
    tx = fgrad_jax.guided_forward_gradient()
    with pytest.raises(ValueError, match="guided_forward_gradient needs the loss"):
        tx.update(None, tx.init(PARAMS), PARAMS)


def test_nonfinite_step_keeps_the_guess():
    tx = fgrad_jax.guided_forward_gradient(0, num_tangents=2)
    f = lambda p: jnp.where(p[0] > 5.0, jnp.nan, jnp.sum((p - 1.0) ** 2))
    step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=f))
    good, bad = jnp.zeros(3), jnp.array([6.0, 0.0, 0.0])
    _, state = step(good, tx.init(good))
    updates, state2 = step(bad, state)
    assert np.all(np.asarray(updates) == 0.0)
    assert int(state2.inner.num_nonfinite) == 1
    np.testing.assert_array_equal(state2.guess, state.guess)
    assert np.abs(np.asarray(state.guess)).max() > 0

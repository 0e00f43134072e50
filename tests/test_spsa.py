"""Tests of the SPSA (central-difference, MeZO) estimator and spsa_gradient.

Statistical tolerance as in test_estimator.py: z-tests on the mean of N independent
estimates with the empirical standard error, |z| < 5 per component (a false failure has
probability < 1e-3 over the components tested here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgrad_jax
from fgrad_jax._tangents import HASHED

Z_MAX = 5.0
A = jnp.asarray(np.random.default_rng(0).normal(size=(12, 12)), jnp.float32)
A = A @ A.T / 12 + jnp.eye(12)  # symmetric positive definite
B = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32)


def quadratic(p):
    theta = jnp.concatenate([p["w"].ravel(), p["b"]])
    return 0.5 * theta @ A @ theta + B @ theta


PARAMS = {"w": jnp.linspace(-0.5, 0.7, 9, dtype=jnp.float32).reshape(3, 3), "b": jnp.ones(3)}


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("epsilon", [0.5, 1e-2])
def test_exact_on_quadratics(distribution, num_samples, epsilon):
    """For a quadratic the central difference is ∇f·z exactly: g = mean_k (∇f·z_k) z_k."""
    key = jax.random.key(7)
    est = fgrad_jax.forward_grad(
        quadratic,
        num_tangents=num_samples,
        tangent=fgrad_jax.spsa(epsilon, distribution=distribution),
    )(key, PARAMS)
    leaves = jax.tree_util.tree_leaves(PARAMS)
    z = HASHED[distribution](key, leaves, num_samples)  # the same z, drawn independently
    zflat = jnp.concatenate([t.reshape(num_samples, -1) for t in z], axis=1)
    grad = flat(jax.grad(quadratic)(PARAMS))
    expected = jnp.mean((zflat @ grad)[:, None] * zflat, axis=0)
    # float32 cancellation in f(θ+εz) − f(θ−εz): error ~ |f| 2^-24 / ε per sample.
    tol = 1e-5 * float(jnp.linalg.norm(expected)) * max(1.0, 0.5 / epsilon) * 10
    np.testing.assert_allclose(flat(est), expected, atol=tol)


def _samples(fun, params, epsilon, n=20_000, num_samples=1, distribution="rademacher"):
    estimator = fgrad_jax.forward_grad(
        fun, num_tangents=num_samples, tangent=fgrad_jax.spsa(epsilon, distribution=distribution)
    )
    keys = jax.random.split(jax.random.key(1), n)
    est = jax.jit(jax.vmap(lambda k: flat(estimator(k, params))))(keys)
    return np.asarray(est, np.float64)


def _max_z(samples, expected):
    se = samples.std(0, ddof=1) / np.sqrt(len(samples))
    return float((np.abs(samples.mean(0) - expected) / np.maximum(se, 1e-12)).max())


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_unbiased_on_quadratic(distribution):
    samples = _samples(quadratic, PARAMS, 1e-2, num_samples=2, distribution=distribution)
    grad = np.asarray(flat(jax.grad(quadratic)(PARAMS)), np.float64)
    assert _max_z(samples, grad) < Z_MAX
    assert np.abs(samples[0] - grad).max() > 1e-2  # single estimates do vary


def test_bias_on_a_non_quadratic_matches_the_closed_form():
    """For f = Σ sin θ_i and z = ±1, f(θ+εz) − f(θ−εz) = 2 sin ε (∇f·z): E g = (sin ε/ε) ∇f.

    With ε = 1 that is a 16 % bias, which the z-test must see (it can fail) and which
    the closed form must explain."""
    theta = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32)
    fun = lambda t: jnp.sum(jnp.sin(t))
    samples = _samples(fun, theta, 1.0, n=40_000)
    grad = np.cos(np.asarray(theta, np.float64))
    assert _max_z(samples, np.sin(1.0) * grad) < Z_MAX
    assert _max_z(samples, grad) > Z_MAX


def test_value_is_the_mean_of_the_two_perturbed_losses():
    """With Rademacher z and diagonal A: (f(θ+εz) + f(θ−εz))/2 = f(θ) + ε² tr(A)/2."""
    a = jnp.arange(1.0, 5.0)
    fun = lambda t: 0.5 * jnp.sum(a * t**2) + jnp.sum(t)
    theta = jnp.array([0.3, -0.2, 0.1, 0.5])
    eps = 0.25
    value, _ = fgrad_jax.value_and_forward_grad(fun, num_tangents=3, tangent=fgrad_jax.spsa(eps))(
        jax.random.key(0), theta
    )
    np.testing.assert_allclose(value, fun(theta) + eps**2 * jnp.sum(a) / 2, rtol=1e-6)


def _temp_bytes(loss, params, num_samples):
    tx = fgrad_jax.spsa_gradient(0, num_samples=num_samples)
    step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))
    compiled = step.lower(params, tx.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_does_not_grow_with_num_samples():
    """MeZO's property: the step holds at most one perturbation-sized buffer, for any n.

    On a 1M-parameter quadratic (a diagonal one and a matmul one) the compiled temp memory
    is the same for n = 2, 4, 8 and below one parameter copy plus 64 KiB; n stored
    perturbations would take n copies. And the loop over samples adds at most 64 KiB to
    n = 1 (which needs no loop): the two evaluations of a sample run one after the other,
    each perturbed copy consumed as it is formed (with f(θ+εz) and f(θ−εz) interleaved,
    n = 4 held a parameter-sized buffer, 4 MB, against n = 1's few bytes)."""
    n = 1000
    w = jnp.zeros((n, n), jnp.float32)
    param_bytes = 4 * n * n
    a = jnp.linspace(0.5, 2.0, n * n, dtype=jnp.float32).reshape(n, n)
    x = jax.random.normal(jax.random.key(1), (8, n))
    y = jax.random.normal(jax.random.key(2), (8, n))
    diagonal = lambda w: 0.5 * jnp.sum(a * w * w) + jnp.sum(w)
    matmul = lambda w: 0.5 * jnp.sum((x @ w - y) ** 2)
    for loss in (diagonal, matmul):
        temps = [_temp_bytes(loss, w, k) for k in (2, 4, 8)]
        assert max(temps) - min(temps) <= 4096, temps
        assert max(temps) < param_bytes + (64 << 10), temps
        assert _temp_bytes(loss, w, 4) <= _temp_bytes(loss, w, 1) + (64 << 10)


def test_errors():
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"epsilon must be a finite float > 0.*epsilon=1e-3"):
            fgrad_jax.spsa_gradient(epsilon=bad)
    with pytest.raises(TypeError, match="epsilon"):
        fgrad_jax.spsa("small")
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        fgrad_jax.spsa_gradient(num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        fgrad_jax.spsa_gradient(num_samples=1.5)
    with pytest.raises(ValueError, match="distribution must be one of"):
        fgrad_jax.spsa_gradient(distribution="sphere")
    tx = fgrad_jax.spsa_gradient()
    params = jnp.zeros(3)
    with pytest.raises(ValueError, match="spsa_gradient needs the loss"):
        tx.update(None, tx.init(params), params)
    with pytest.raises(ValueError, match="spsa_gradient needs params"):
        tx.update(None, tx.init(params), value_fn=jnp.sum)


def test_nonfinite_loss_skips_the_step():
    tx = fgrad_jax.spsa_gradient(0, num_samples=2)
    loss = lambda p: jnp.where(p[0] > 5.0, jnp.nan, jnp.sum((p - 1.0) ** 2))
    step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))
    bad = jnp.array([6.0, 0.0, 0.0])
    updates, state = step(bad, tx.init(bad))
    assert np.all(np.asarray(updates) == 0.0)
    assert int(state.num_nonfinite) == 1 and int(state.count) == 1
    good = jnp.zeros(3)
    updates, state = step(good, state)
    assert np.all(np.isfinite(np.asarray(updates))) and np.abs(np.asarray(updates)).max() > 0
    assert int(state.num_nonfinite) == 1
    assert fgrad_jax.forward_gradient_state(state).count == 2


def test_jit_chain_with_adam_trains(standard_promotion):
    target = jnp.linspace(-1.0, 1.0, 20)
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)
    tx = optax.chain(fgrad_jax.spsa_gradient(3, num_samples=4), optax.adam(0.05))
    params = {"w": jnp.zeros(20)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(None, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    for _ in range(400):
        params, state = step(params, state)
    assert float(loss(params)) < 0.05 * float(loss({"w": jnp.zeros(20)}))
    fg_state = fgrad_jax.forward_gradient_state(state)
    assert int(fg_state.count) == 400
    # The reported value is (f₊ + f₋)/2 = f(θ) + ε²·(d/2)·... close to f(θ) for ε = 1e-3.
    np.testing.assert_allclose(fg_state.value, loss(params), rtol=0.2, atol=1e-3)


def test_mask_freezes_leaves_exactly():
    params = {"base": jnp.ones(3), "adapter": jnp.zeros(2)}
    loss = lambda p: jnp.sum((p["base"] - 2.0) ** 2) + jnp.sum((p["adapter"] - 1.0) ** 2)
    tx = fgrad_jax.spsa_gradient(key=0, num_samples=2, mask={"base": False, "adapter": True})
    updates, _ = tx.update(None, tx.init(params), params, value_fn=loss)
    assert bool(jnp.all(updates["base"] == 0))
    assert float(jnp.abs(updates["adapter"]).max()) > 0
    # The unmasked leaves get the estimate of the smaller problem: exact on a quadratic,
    # with Rademacher z, (z zᵀ) g averaged over the samples.
    full = fgrad_jax.forward_grad(
        lambda a: loss({**params, "adapter": a}),
        num_tangents=2,
        tangent=fgrad_jax.spsa(1e-3),
    )(fgrad_jax.step_key(0, 0), params["adapter"])
    assert bool(jnp.allclose(updates["adapter"], full, atol=1e-3))

"""Statistical and structural tests of forward_grad / value_and_forward_grad.

Statistical tolerance: every unbiasedness/moment check is a z-test on the mean of N
independent estimates, using the empirical standard error, and requires |z| < 5 for every
component. Under the null hypothesis P(|z| > 5) ≈ 6e-7 per component, so with the few
hundred components tested here a false failure has probability < 1e-3; a bias of a few
standard errors fails reliably. Keys are fixed, so the tests are deterministic.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad_jax

N_SAMPLES = 20_000
Z_MAX = 5.0
TANGENTS = ["normal", "rademacher", "sphere", "orthogonal"]


def loss(params, x):
    h = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.sum(h**2) + jnp.sum(jnp.sin(params["c"][0]) * params["c"][1])


def make_params():
    return {
        "w": jnp.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6]], jnp.float32),
        "b": jnp.array([0.05, -0.1, 0.2], jnp.float32),
        "c": (jnp.array(0.7, jnp.float32), jnp.array(-1.3, jnp.float32)),
    }


X = jnp.array([[1.0, -2.0], [0.5, 0.25]], jnp.float32)


def flat(tree):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def sample_estimates(estimator, n=N_SAMPLES, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    est = jax.jit(jax.vmap(lambda k: flat(estimator(k, make_params(), X))))(keys)
    return np.asarray(est, np.float64)


def assert_unbiased(samples, expected):
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(len(samples))
    z = np.abs(mean - expected) / np.maximum(se, 1e-12)
    assert z.max() < Z_MAX, f"max |z| = {z.max():.2f} (mean {mean}, expected {expected})"


@pytest.mark.parametrize("tangent", TANGENTS)
@pytest.mark.parametrize("num_tangents", [1, 3])
def test_unbiased(tangent, num_tangents):
    true = np.asarray(flat(jax.grad(loss)(make_params(), X)), np.float64)
    estimator = fgrad_jax.forward_grad(loss, num_tangents=num_tangents, tangent=tangent)
    samples = sample_estimates(estimator)
    assert_unbiased(samples, true)
    # Not trivially unbiased: single estimates do differ from the gradient.
    assert np.abs(samples[0] - true).max() > 1e-3


def test_detects_bias():
    """The z-test is able to fail: a 10% scaled estimator is flagged."""
    true = np.asarray(flat(jax.grad(loss)(make_params(), X)), np.float64)
    estimator = fgrad_jax.forward_grad(loss, tangent="rademacher")
    samples = sample_estimates(estimator) * 1.1
    with pytest.raises(AssertionError):
        assert_unbiased(samples, true)


@pytest.mark.parametrize(
    ("tangent", "factor"),
    # E|g|² = E[(∇f·v)² |v|²]: (n + 2)|∇f|² for Gaussian v, n|∇f|² when |v|² = n.
    [("normal", lambda n: n + 2), ("rademacher", lambda n: n), ("sphere", lambda n: n)],
)
def test_second_moment(tangent, factor):
    grad = np.asarray(flat(jax.grad(loss)(make_params(), X)), np.float64)
    n = grad.size
    samples = sample_estimates(fgrad_jax.forward_grad(loss, tangent=tangent), n=40_000, seed=1)
    sq = (samples**2).sum(1)
    expected = factor(n) * (grad**2).sum()
    z = abs(sq.mean() - expected) / (sq.std(ddof=1) / np.sqrt(len(sq)))
    assert z < Z_MAX, (sq.mean(), expected)


def test_k_tangents_divide_variance():
    """Mean of K independent estimates: the covariance trace drops by K (within 10%)."""
    one = sample_estimates(fgrad_jax.forward_grad(loss, num_tangents=1), seed=2)
    four = sample_estimates(fgrad_jax.forward_grad(loss, num_tangents=4), seed=3)
    ratio = one.var(0).sum() / four.var(0).sum()
    assert 3.6 < ratio < 4.4, ratio


def test_orthogonal_full_rank_is_exact(getkey):
    params = make_params()
    n = flat(params).size
    g = fgrad_jax.forward_grad(loss, num_tangents=n, tangent="orthogonal")(getkey(), params, X)
    true = jax.grad(loss)(params, X)
    np.testing.assert_allclose(flat(g), flat(true), rtol=1e-4, atol=1e-5)


def test_orthogonal_tangents_are_orthogonal():
    from fgrad_jax._tangents import TANGENTS as SAMPLERS

    leaves = [jnp.zeros((3, 4)), jnp.zeros(5)]
    vs = SAMPLERS["orthogonal"](jax.random.key(0), leaves, 6)
    mat = jnp.concatenate([v.reshape(6, -1) for v in vs], axis=1)
    np.testing.assert_allclose(mat @ mat.T, 17.0 * jnp.eye(6), atol=1e-3)


def test_value_is_the_loss_and_structure_matches(getkey):
    params = make_params()
    value, g = fgrad_jax.value_and_forward_grad(loss)(getkey(), params, X)
    np.testing.assert_allclose(value, loss(params, X), rtol=1e-6)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_has_aux_and_kwargs(getkey):
    def f(w, *, scale):
        return jnp.sum(w**2) * scale, {"norm": jnp.linalg.norm(w)}

    w = jnp.arange(3.0)
    (value, aux), g = fgrad_jax.value_and_forward_grad(f, has_aux=True)(getkey(), w, scale=2.0)
    assert float(value) == pytest.approx(10.0)
    assert float(aux["norm"]) == pytest.approx(float(jnp.linalg.norm(w)))
    g2, aux2 = fgrad_jax.forward_grad(f, has_aux=True)(getkey(), w, scale=2.0)
    assert g.shape == g2.shape == (3,) and set(aux2) == {"norm"}


def test_argnums_tuple(getkey):
    def f(a, x, b):
        return jnp.sum(a * x) + jnp.sum(b**2)

    a, x, b = jnp.ones(2), jnp.array([1.0, 2.0]), jnp.array([3.0])
    g = fgrad_jax.forward_grad(f, argnums=(0, 2), num_tangents=3, tangent="orthogonal")(
        getkey(), a, x, b
    )
    assert isinstance(g, tuple) and len(g) == 2
    np.testing.assert_allclose(g[0], x, atol=1e-5)
    np.testing.assert_allclose(g[1], 2 * b, atol=1e-5)


def test_int_bool_and_bf16_leaves(getkey):
    params = {
        "w": jnp.ones(3, jnp.float32),
        "h": jnp.ones(2, jnp.bfloat16),
        "step": jnp.array(7, jnp.int32),
        "mask": jnp.array([True, False]),
    }

    def f(p):
        m = p["mask"].astype(jnp.float32)
        return jnp.sum(p["w"] ** 2) + jnp.sum(p["h"].astype(jnp.float32) * m) * p["step"].astype(
            jnp.float32
        )

    g = fgrad_jax.forward_grad(f, num_tangents=2)(getkey(), params)
    assert g["step"].dtype == jnp.int32 and int(g["step"]) == 0
    assert g["mask"].dtype == jnp.bool_ and not bool(g["mask"].any())
    assert g["h"].dtype == jnp.bfloat16 and g["w"].dtype == jnp.float32
    # The bf16 leaf's estimate is unbiased too (accumulated in float32).
    keys = jax.random.split(jax.random.key(5), N_SAMPLES)
    hs = jax.jit(jax.vmap(lambda k: fgrad_jax.forward_grad(f)(k, params)["h"]))(keys)
    samples = np.asarray(hs.astype(jnp.float32), np.float64)
    assert_unbiased(samples, np.array([7.0, 0.0]))


def test_nnx_state_params(getkey):
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.ones((4, 3))

    def f(p):
        return jnp.sum(nnx.merge(graphdef, p)(x) ** 2)

    g = fgrad_jax.forward_grad(f, num_tangents=6 * 1 + 2, tangent="orthogonal")(getkey(), params)
    true = jax.grad(f)(params)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(true)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(true)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_deterministic_and_key_kinds():
    params = make_params()
    est = fgrad_jax.forward_grad(loss, num_tangents=2)
    a = est(jax.random.key(3), params, X)
    b = est(jax.random.key(3), params, X)
    legacy = est(jax.random.PRNGKey(3), params, X)
    for x, y, z in zip(*(jax.tree_util.tree_leaves(t) for t in (a, b, legacy))):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    c = est(jax.random.key(4), params, X)
    assert not np.array_equal(flat(a), flat(c))


def test_jit_compiles_once(getkey):
    traces = []

    def f(w, x):
        traces.append(1)
        return jnp.sum((w * x) ** 2)

    step = jax.jit(fgrad_jax.value_and_forward_grad(f, num_tangents=2))
    w = jnp.ones(4)
    for i in range(5):
        step(getkey(), w, jnp.full(4, float(i)))
    assert len(traces) == 1


def test_vmap_over_keys_matches_loop():
    keys = jax.random.split(jax.random.key(0), 4)
    est = fgrad_jax.forward_grad(loss, tangent="rademacher", num_tangents=2)
    batched = jax.vmap(lambda k: est(k, make_params(), X))(keys)
    for i in range(4):
        single = est(keys[i], make_params(), X)
        for a, b in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(single)):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7)


def test_user_tangent_callable():
    def scaled_rademacher(key, tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(
            treedef,
            [jax.random.rademacher(k, leaf.shape, jnp.float32) for k, leaf in zip(keys, leaves)],
        )

    true = np.asarray(flat(jax.grad(loss)(make_params(), X)), np.float64)
    samples = sample_estimates(
        fgrad_jax.forward_grad(loss, tangent=scaled_rademacher, num_tangents=2)
    )
    assert_unbiased(samples, true)


def test_primal_runs_once_for_k_tangents():
    """K tangents share one primal: the jaxpr has one primal sin, batched tangent work."""

    def f(w):
        return jnp.sum(jnp.sin(w))

    def eqns(jaxpr):
        for e in jaxpr.eqns:
            yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from eqns(sub)

    closed = jax.make_jaxpr(fgrad_jax.forward_grad(f, num_tangents=8))(
        jax.random.key(0), jnp.ones(5)
    )
    sins = [e for e in eqns(closed.jaxpr) if e.primitive.name == "sin"]
    assert len(sins) == 1 and sins[0].outvars[0].aval.shape == (5,)

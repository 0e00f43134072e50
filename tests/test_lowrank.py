"""Low-rank tangents: E[v vᵀ] = I, unbiasedness, the structured JVP equals the dense one,
and the dense fallback for every primitive without a structured rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fgrad_jax
from fgrad_jax import _interpreter
from fgrad_jax._tangents import _sample_lowrank, resolve_tangent


@pytest.mark.parametrize("rank", [1, 3])
def test_second_moment_is_identity(rank):
    """Empirical E[v vᵀ] over the flattened leaves: |entry - δ| < 0.1 with M = 20000.

    Each entry's sample sd is at most sqrt(E v_i² v_j²)/sqrt(M) <= 3/141 = 0.021 (E V⁴ = 9
    for rank 1), so 0.1 is about 5 sd.
    """
    leaves = [jnp.zeros((3, 4)), jnp.zeros((2,)), jnp.zeros((2, 1, 3))]
    m = 20000
    vs = _sample_lowrank(jax.random.key(0), leaves, m, rank)
    flat = np.concatenate([np.asarray(v).reshape(m, -1) for v in vs], axis=1).astype(np.float64)
    cov = flat.T @ flat / m
    assert np.max(np.abs(cov - np.eye(flat.shape[1]))) < 0.1
    assert np.max(np.abs(flat.mean(0))) < 0.1
    # Fourth moment of a rank-r kernel entry: E V⁴ = 3 + 6/r (9 for r = 1, 3 as r → ∞).
    kernel = flat[:, :12]
    assert np.mean(kernel**4) == pytest.approx(3 + 6 / rank, rel=0.15)


def _mlp_loss(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"]) ** 2)


def _mlp_params():
    k1, k2 = jax.random.split(jax.random.key(1))
    return {
        "w1": 0.5 * jax.random.normal(k1, (5, 4)),
        "b1": jnp.full((4,), 0.1),
        "w2": 0.5 * jax.random.normal(k2, (4, 3)),
        "b2": jnp.zeros((3,)),
    }


@pytest.mark.parametrize("tangent", ["lowrank", fgrad_jax.lowrank(rank=2)])
def test_unbiased(tangent):
    """Mean of M = 20000 estimates within 6 standard errors of jax.grad, per component."""
    p, x = _mlp_params(), jax.random.normal(jax.random.key(2), (7, 5))
    est = jax.jit(
        jax.vmap(fgrad_jax.forward_grad(_mlp_loss, tangent=tangent), in_axes=(0, None, None))
    )
    m = 20000
    g = est(jax.random.split(jax.random.key(3), m), p, x)
    true = jax.grad(_mlp_loss)(p, x)
    for k in p:
        gk = np.asarray(g[k], np.float64)
        se = gk.std(0) / np.sqrt(m)
        np.testing.assert_array_less(np.abs(gk.mean(0) - np.asarray(true[k])), 6 * se + 1e-6)


def _dense_reference(f, key, p, rank, k, *args):
    """(1/K) Σ d_k v_k with the same tangents materialised and an ordinary jax.jvp."""
    leaves, treedef = jax.tree_util.tree_flatten(p)
    vs = _sample_lowrank(key, leaves, k, rank)
    g = [jnp.zeros_like(leaf) for leaf in leaves]
    for i in range(k):
        _, d = jax.jvp(
            lambda *ls: f(jax.tree_util.tree_unflatten(treedef, ls), *args),
            leaves,
            [v[i] for v in vs],
        )
        g = [a + d * v[i] / k for a, v in zip(g, vs)]
    return jax.tree_util.tree_unflatten(treedef, g)


@pytest.mark.parametrize(("rank", "k"), [(1, 1), (2, 3)])
def test_structured_jvp_equals_dense_jvp(rank, k):
    p, x = _mlp_params(), jax.random.normal(jax.random.key(2), (7, 5))
    key = jax.random.key(4)
    with _interpreter.recording() as seen:
        g = fgrad_jax.forward_grad(_mlp_loss, tangent=fgrad_jax.lowrank(rank), num_tangents=k)(
            key, p, x
        )
    assert seen["rule"] > 0
    assert seen["densified"] == 0
    want = _dense_reference(_mlp_loss, key, p, rank, k, x)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fallback_for_unhandled_uses_of_a_kernel():
    """x @ w.T, w², an einsum with a batch dim, and a scan: densified, still exact."""

    def f(p, x):
        y = jnp.tanh(x @ p["w"].T)  # transpose first: no structured rule
        y = y + jnp.einsum("bi,bij->bj", y, jnp.broadcast_to(p["v"], (x.shape[0], 4, 4)))
        carry, _ = jax.lax.scan(lambda c, _: (c @ p["v"], None), y, None, length=2)
        return jnp.sum(carry) + jnp.sum(p["w"] ** 2)

    p = {"w": jax.random.normal(jax.random.key(0), (4, 5)), "v": 0.3 * jnp.eye(4)}
    x = jax.random.normal(jax.random.key(1), (3, 5))
    key = jax.random.key(6)
    with _interpreter.recording() as seen:
        g = fgrad_jax.forward_grad(f, tangent="lowrank")(key, p, x)
    assert seen["densified"] > 0
    want = _dense_reference(f, key, p, 1, 1, x)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_inside_jit_and_conv_and_flax():
    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
            self.dense = nnx.Linear(3 * 4 * 4, 2, rngs=rngs)

        def __call__(self, x):
            y = nnx.relu(self.conv(x))
            return self.dense(y.reshape(y.shape[0], -1))

    model = CNN(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))

    @jax.jit
    def inner(s, x):  # a jit inside the differentiated function is interpreted inline
        return nnx.merge(graphdef, s)(x)

    def loss(s, x):
        return jnp.mean(inner(s, x) ** 2)

    key = jax.random.key(2)
    with _interpreter.recording() as seen:
        g = jax.jit(fgrad_jax.forward_grad(loss, tangent="lowrank"))(key, state, x)
    assert seen["rule"] >= 2  # conv and dense
    assert seen["densified"] == 0
    want = _dense_reference(loss, key, state, 1, 1, x)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_optax_transform_aux_and_errors():
    p, x = _mlp_params(), jax.random.normal(jax.random.key(2), (7, 5))
    tx = fgrad_jax.fgd(0.05, key=0, tangent=fgrad_jax.lowrank(2), num_tangents=2)
    state = tx.init(p)

    @jax.jit
    def step(p, state):
        updates, state = tx.update(None, state, p, value_fn=lambda q: _mlp_loss(q, x))
        return optax.apply_updates(p, updates), state

    first = _mlp_loss(p, x)
    for _ in range(200):
        p, state = step(p, state)
    assert _mlp_loss(p, x) < first
    (_val, aux), g = fgrad_jax.value_and_forward_grad(
        lambda q: (_mlp_loss(q, x), 3), tangent="lowrank", has_aux=True
    )(jax.random.key(0), p)
    assert aux == 3 and g["w1"].shape == (5, 4)
    assert resolve_tangent(fgrad_jax.lowrank(4)) == fgrad_jax.lowrank(4)
    assert "lowrank" in fgrad_jax.TANGENT_NAMES
    with pytest.raises(ValueError, match="rank"):
        fgrad_jax.lowrank(0)

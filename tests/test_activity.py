"""Activity perturbation (perturb="activations"): unbiasedness, variance, errors, plumbing.

Statistical tolerance: z-tests on the mean of N independent estimates with the empirical
standard error, |z| < 6 for every coordinate (a false failure per coordinate has
probability ~2e-9; a few hundred coordinates are tested). Keys are fixed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fgrad_jax

Z_MAX = 6.0


def assert_unbiased(samples, true):
    for name in true:
        s = np.asarray(samples[name], np.float64).reshape(len(samples[name]), -1)
        t = np.asarray(true[name], np.float64).reshape(-1)
        se = s.std(0, ddof=1) / np.sqrt(len(s))
        z = np.abs(s.mean(0) - t) / np.maximum(se, 1e-9)
        assert z.max() < Z_MAX, (name, z.max())
        assert np.abs(s[0] - t).max() > 1e-4  # single estimates are noisy, not exact


def mlp_losses(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    out = (h @ p["w2"] + p["b2"]) * p["scale"]  # scale: not a kernel, weight-perturbed
    return jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, y[:, None], 1)[:, 0]


def mlp_params(key, n_in=4, n_hidden=6, n_out=3):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (n_in, n_hidden)) / np.sqrt(n_in),
        "b1": jnp.full((n_hidden,), 0.1),
        "w2": jax.random.normal(k2, (n_hidden, n_out)) / np.sqrt(n_hidden),
        "b2": jnp.zeros((n_out,)),
        "scale": jnp.float32(1.3),
    }


def data(key, batch=5, n_in=4, n_out=3):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (batch, n_in)), jax.random.randint(ky, (batch,), 0, n_out)


def sample(estimator, args, n, seed=1):
    keys = jax.random.split(jax.random.key(seed), n)
    return jax.jit(jax.vmap(lambda k: estimator(k, *args)))(keys)


@pytest.mark.parametrize("tangent", ["rademacher", "normal"])
def test_mlp_unbiased(tangent):
    p = mlp_params(jax.random.key(0))
    x, y = data(jax.random.key(1))
    true = jax.grad(lambda p: mlp_losses(p, x, y).mean())(p)
    est = fgrad_jax.forward_grad(mlp_losses, perturb="activations", tangent=tangent)
    assert_unbiased(sample(est, (p, x, y), 20_000), true)


class TinyCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
        self.norm = nnx.LayerNorm(3, rngs=rngs)  # scale/bias: no dense op, weight-perturbed
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.norm(self.conv(x)))
        return self.head(h.mean(axis=(1, 2)))


def test_cnn_unbiased():
    model = TinyCNN(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(2), (4, 5, 5, 2))
    y = jnp.array([0, 1, 1, 0])

    def losses(p):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    true = jax.grad(lambda p: losses(p).mean())(params)
    est = fgrad_jax.forward_grad(losses, perturb="activations", tangent="rademacher")
    samples = sample(est, (params,), 20_000)
    flat_s = dict(enumerate(jax.tree_util.tree_leaves(samples)))
    flat_t = dict(enumerate(jax.tree_util.tree_leaves(true)))
    assert_unbiased(flat_s, flat_t)


def test_bias_shares_the_op_tangent():
    """A bias added to a perturbed output is estimated from that output's tangent: with an
    all-ones input the kernel row and the bias get the same estimate, bit for bit."""
    p = mlp_params(jax.random.key(0), n_in=1)
    x, y = jnp.ones((5, 1)), jnp.array([0, 1, 2, 1, 0])
    g = fgrad_jax.forward_grad(mlp_losses, perturb="activations")(jax.random.key(3), p, x, y)
    np.testing.assert_allclose(g["w1"][0], g["b1"], rtol=1e-6)
    g_w = fgrad_jax.forward_grad(lambda p: mlp_losses(p, x, y).mean())(jax.random.key(3), p)
    assert np.abs(g_w["w1"][0] - g_w["b1"]).max() > 1e-3  # not so with weight tangents


def test_variance_lower_than_weight_perturbation():
    """Wide MLP: total variance (sum over coordinates) of the activity-perturbed estimate is
    far below the weight-perturbed one (Ren et al.: fan-out instead of fan-in x fan-out).
    Measured ratio 75 and 86 (seeds 1, 2; 32-256-10, 8 examples, 2000 estimates each);
    asserted > 30."""
    p = mlp_params(jax.random.key(0), n_in=32, n_hidden=256, n_out=10)
    x, y = data(jax.random.key(1), batch=8, n_in=32, n_out=10)
    act = fgrad_jax.forward_grad(mlp_losses, perturb="activations", tangent="rademacher")
    wgt = fgrad_jax.forward_grad(lambda p, x, y: mlp_losses(p, x, y).mean(), tangent="rademacher")

    def total_var(est):
        s = sample(est, (p, x, y), 2000)
        return sum(float(np.asarray(v, np.float64).var(0).sum()) for v in s.values())

    ratio = total_var(wgt) / total_var(act)
    assert ratio > 30.0, ratio


def test_value_and_aux_and_mask():
    p = mlp_params(jax.random.key(0))
    x, y = data(jax.random.key(1))

    def with_aux(p):
        losses = mlp_losses(p, x, y)
        return losses, {"max": losses.max()}

    mask = {"w1": True, "b1": True, "w2": False, "b2": False, "scale": True}
    vg = fgrad_jax.value_and_forward_grad(
        with_aux, has_aux=True, perturb="activations", num_tangents=3, mask=mask
    )
    (value, aux), g = vg(jax.random.key(0), p)
    np.testing.assert_allclose(value, mlp_losses(p, x, y).mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["max"], mlp_losses(p, x, y).max(), rtol=1e-6)
    assert not np.any(g["w2"]) and not np.any(g["b2"]) and np.any(g["w1"])


def test_optax_training_and_nonfinite_skip():
    p = mlp_params(jax.random.key(0))
    x, y = data(jax.random.key(1), batch=32)
    tx = optax.chain(
        fgrad_jax.forward_gradient(key=0, num_tangents=4, perturb="activations"), optax.sgd(0.1)
    )
    state = tx.init(p)
    step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=lambda q: mlp_losses(q, x, y)))
    first = float(mlp_losses(p, x, y).mean())
    for _ in range(200):
        updates, state = step(p, state)
        p = optax.apply_updates(p, updates)
    assert float(mlp_losses(p, x, y).mean()) < 0.7 * first
    bad = lambda q: mlp_losses(q, x, y).at[0].set(jnp.nan)
    updates, state = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=bad))(p, state)
    assert all(not np.any(u) for u in jax.tree_util.tree_leaves(updates))
    assert int(fgrad_jax.forward_gradient_state(state).num_nonfinite) == 1


def test_errors():
    p = mlp_params(jax.random.key(0))
    x, y = data(jax.random.key(1))
    scalar = fgrad_jax.forward_grad(lambda p: mlp_losses(p, x, y).mean(), perturb="activations")
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        scalar(jax.random.key(0), p)
    with pytest.raises(ValueError, match="perturb must be one of"):
        fgrad_jax.forward_grad(mlp_losses, perturb="activity")
    with pytest.raises(ValueError, match="tangent='rademacher'"):
        fgrad_jax.forward_grad(mlp_losses, perturb="activations", tangent="sphere")
    with pytest.raises(ValueError, match="tangent='rademacher'"):
        fgrad_jax.forward_gradient(perturb="activations", tangent="lowrank")

    def not_batch_first(p):  # the kernel meets a constant matrix: output (4, 6), B = 5
        return jnp.sum(x @ (jnp.ones((4, 4)) @ p["w1"]), axis=-1)

    with pytest.raises(ValueError, match=r"`dot_general`.*batch axis first"):
        fgrad_jax.forward_grad(not_batch_first, perturb="activations")(jax.random.key(0), p)


# --- no silent fallback to weight perturbation ---------------------------------------------


def test_sharding_constraints_and_barriers_keep_activity_perturbation():
    """The FSDP recipe constrains the parameters inside the loss: the kernels still reach
    their ops as views, so the estimate is the activity-perturbed one, equal (same key) to
    the estimate without the constraint."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    shardings = {
        "w1": P(None, "fsdp"), "b1": P("fsdp"), "w2": P("fsdp", None), "b2": P(), "scale": P()
    }  # fmt: skip

    def constrained(p, x, y):
        p = jax.lax.with_sharding_constraint(
            p, {k: NamedSharding(mesh, s) for k, s in shardings.items()}
        )
        p = jax.lax.optimization_barrier(p)
        return mlp_losses(p, x, y)

    params, (x, y) = mlp_params(jax.random.key(0)), data(jax.random.key(1), batch=6)
    report = fgrad_jax.diagnostics.perturbation_report(constrained, params, x, y)
    assert report["['w1']"].startswith("activations") and report["['w2']"].startswith("activations")
    assert report["['scale']"].startswith("weights: not a dense/conv kernel")
    key = jax.random.key(3)
    plain = fgrad_jax.forward_grad(mlp_losses, perturb="activations", num_tangents=4)
    fsdp = fgrad_jax.forward_grad(constrained, perturb="activations", num_tangents=4)
    want, got = plain(key, params, x, y), jax.jit(fsdp)(key, params, x, y)
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_kernels_that_cannot_be_activity_perturbed_raise_or_fall_back_explicitly():
    def scanned(stack, x, y):  # layers as a scan: the kernel is a slice of a scanned input
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, stack["w"])
        return jnp.sum((h - y) ** 2, axis=1)

    def rescaled(p, x, y):  # arithmetic on the weights before the op
        return jnp.sum((jnp.tanh(x @ (2.0 * p["w"])) - y) ** 2, axis=1)

    x, y = jax.random.normal(jax.random.key(0), (6, 3)), jnp.zeros((6, 3))
    stack = {"w": jax.random.normal(jax.random.key(1), (2, 3, 3)) / 3}
    with pytest.raises(ValueError, match=r"\['w'\] \(kernel of `dot_general` inside `scan`\)"):
        fgrad_jax.forward_grad(scanned, perturb="activations")(jax.random.key(0), stack, x, y)
    with pytest.raises(ValueError, match="fallback='weights'"):
        fgrad_jax.forward_grad(rescaled, perturb="activations")(
            jax.random.key(0), {"w": stack["w"][0]}, x, y
        )
    report = fgrad_jax.diagnostics.perturbation_report(scanned, stack, x, y)
    assert "fallback" in report["['w']"]

    # Explicitly accepted: the weight-perturbed estimate, unbiased (mean of 4,000 estimates).
    strategy = fgrad_jax.activity_perturbation(fallback="weights")
    est = fgrad_jax.forward_grad(scanned, tangent=strategy)
    samples = sample(est, (stack, x, y), 4000)
    true = jax.grad(lambda s: jnp.mean(scanned(s, x, y)))(stack)
    assert_unbiased(samples, true)
    with pytest.raises(ValueError, match="fallback must be one of"):
        fgrad_jax.activity_perturbation(fallback="warn")

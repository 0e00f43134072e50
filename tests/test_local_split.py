"""Patch-wise and group-wise local losses (Ren et al. 2023): layout, unbiasedness, variance,
errors, training.

Statistical tolerance as in test_local.py: |z| < 6 per coordinate for the mean of 20 000
estimates against jax.grad of the local objective. The split columns' objective is the
block-wise one (the columns of a block sum to its loss, and so do their gradients), so the
same jax.grad is the target with and without patches/groups.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fgrad_jax
from fgrad_jax._activity import Columns

Z_MAX = 6.0
X = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
Y = jnp.array([0, 1, 2, 0])


def pool2(h):
    """2 x 2 average pooling, stride 2 (nn.avg_pool divides by an int: strict promotion)."""
    b, hh, ww, c = h.shape
    return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean((2, 4))


def conv_blocks():
    return nnx.Sequential(
        nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)),
        nnx.relu,
        nnx.Conv(4, 8, (3, 3), rngs=nnx.Rngs(1)),
        nnx.relu,
        pool2,  # aligned with the 2 x 2 patches
    )


def samples(local, params, perturb, n=20_000):
    est = fgrad_jax.forward_grad(local.value_fn(X, Y), tangent=local.tangent(perturb))
    keys = jax.random.split(jax.random.key(1), n)
    return jax.jit(jax.vmap(lambda k: est(k, params)))(keys)


def check_unbiased(local, params, draws, n=20_000):
    true = jax.jit(jax.grad(lambda p: local.losses(p, X, Y).mean(0).sum()))(params)
    for s, t in zip(jax.tree_util.tree_leaves(draws), jax.tree_util.tree_leaves(true)):
        s = np.asarray(s, np.float64).reshape(n, -1)
        t = np.asarray(t, np.float64).reshape(-1)
        z = np.abs(s.mean(0) - t) / np.maximum(s.std(0, ddof=1) / np.sqrt(n), 1e-9)
        assert z.max() < Z_MAX, (t.shape, z.max())


def test_layout_and_columns_sum_to_the_block_losses():
    local = fgrad_jax.local_losses(conv_blocks(), num_classes=3, patches=2, groups=2)
    params, local = local.init(jax.random.key(0), X)
    assert local.layout == [((2, 2), 2), ((2, 2), 2)]
    cols = jax.jit(local.losses)(params, X, Y)
    assert cols.shape == (4, 16)  # 2 blocks x 4 patches x 2 groups
    plain = fgrad_jax.local_losses(conv_blocks(), num_classes=3)
    plain = plain.init(jax.random.key(0), X)[1]
    blockwise = jax.jit(plain.losses)(params, X, Y)
    assert blockwise.shape == (4, 2)
    np.testing.assert_allclose(cols.reshape(4, 2, 8).sum(-1), blockwise, rtol=1e-5)
    g1 = jax.jit(jax.grad(lambda p: local.losses(p, X, Y).mean(0).sum()))(params)
    g2 = jax.jit(jax.grad(lambda p: plain.losses(p, X, Y).mean(0).sum()))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(local.predict(params, X), plain.predict(params, X))
    # patches on the spatial block only; groups per block; 1-D patches on (B, L, C).
    mixed = fgrad_jax.local_losses(
        [nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.relu, nnx.Conv(4, 4, (3, 3),
         rngs=nnx.Rngs(1)), lambda h: h.reshape(h.shape[0], -1),
         nnx.Linear(256, 6, rngs=nnx.Rngs(2)), nnx.Linear(6, 3, rngs=nnx.Rngs(3))],
        num_classes=3, patches=4, groups=[1, 1, 3, 1],
    )  # fmt: skip
    p, mixed = mixed.init(jax.random.key(0), X)
    assert mixed.layout == [((4, 4), 1), ((), 1), ((), 3), ((), 1)]
    assert jax.eval_shape(mixed.losses, p, X, Y).shape == (4, 16 + 1 + 3 + 1)
    mixed.tangent("activations")  # every split block passes the separability check
    seq = fgrad_jax.local_losses([nnx.Linear(1, 6, rngs=nnx.Rngs(0))], 3, patches=2, groups=3)
    p, seq = seq.init(jax.random.key(0), X[:, :, 0])  # (B, 8, 1): one spatial axis
    assert seq.layout == [((2,), 3)]
    assert jax.eval_shape(seq.losses, p, X[:, :, 0], Y).shape == (4, 6)


@pytest.mark.parametrize("split", [dict(patches=2), dict(groups=4), dict(patches=2, groups=4)])
def test_activity_estimates_unbiased_and_less_noisy(split):
    """Unbiased for the block-wise objective; the block kernels' summed variance drops.
    Measured (keys fixed): 15.5x with 4 patches, 15.5x with 4 groups, 220x with both
    (every unit scored against its own column, whose derivative carries the noise of that
    patch/group only, and 1/(P G) of the head's). Asserted: more than 4x."""
    plain = fgrad_jax.local_losses(conv_blocks(), num_classes=3)
    params, plain = plain.init(jax.random.key(0), X)
    local = fgrad_jax.local_losses(conv_blocks(), num_classes=3, **split)
    local = local.init(jax.random.key(0), X)[1]
    draws = samples(local, params, "activations")
    check_unbiased(local, params, draws)
    base = samples(plain, params, "activations")
    for b in range(2):
        var = [float(np.asarray(s["blocks"][b]["kernel"]).var(0).sum()) for s in (base, draws)]
        assert var[0] > 4 * var[1], (b, var)


class TwoConvs(nnx.Module):
    def __init__(self):
        self.first = nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))
        self.second = nnx.Conv(4, 4, (3, 3), rngs=nnx.Rngs(1))

    def __call__(self, h):
        return self.second(nnx.relu(self.first(h)))


def test_a_block_of_several_layers_splits_where_it_can():
    """Groups on a block holding two convs: nothing mixes channels after the second conv, so
    its outputs are scored per group; the second conv mixes the first's channels, so the
    first is scored by the block's whole loss. Both unbiased (20,000 estimates, 6 standard
    errors)."""
    local = fgrad_jax.local_losses([TwoConvs(), nnx.relu, pool2], num_classes=3, groups=2)
    params, local = local.init(jax.random.key(0), X)
    (path,) = local.split_params
    assert "second" in path and "kernel" in path, local.split_params
    columns = jax.tree_util.tree_leaves(
        local.columns(params)["blocks"][0], is_leaf=lambda c: isinstance(c, Columns)
    )
    assert sum(c.split for c in columns) == 1
    check_unbiased(local, params, samples(local, params, "activations"))


def test_weight_estimates_unbiased():
    local = fgrad_jax.local_losses(conv_blocks(), num_classes=3, patches=2, groups=2)
    params, local = local.init(jax.random.key(0), X)
    check_unbiased(local, params, samples(local, params, "weights"))


def test_errors():
    make = lambda **kw: fgrad_jax.local_losses(conv_blocks(), num_classes=3, **kw)
    with pytest.raises(
        ValueError, match=r"size 8, not divisible into 3 patches; use a divisor of 8"
    ):
        make(patches=3).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"4 channels .* divisor of 4: \[1, 2, 4\]"):
        make(groups=3).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="positive integer"):
        make(groups=0)
    with pytest.raises(ValueError, match="one entry per block"):
        make(groups=[2])
    with pytest.raises(ValueError, match="one count per spatial axis"):
        make(patches=(2, 2, 2)).init(jax.random.key(0), X)
    mlp = [nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1))]
    x2 = jnp.ones((4, 4))
    with pytest.raises(ValueError, match="Use patches=None"):
        fgrad_jax.local_losses(mlp, 3, patches=2).init(jax.random.key(0), x2)
    with pytest.raises(ValueError, match=r"no spatial axes.*Give None for block 0"):
        fgrad_jax.local_losses(mlp, 3, patches=[2, None]).init(jax.random.key(0), x2)
    with pytest.raises(ValueError, match=r"no head .* per-block lists"):
        fgrad_jax.local_losses(mlp, 3, groups=[1, 3]).init(jax.random.key(0), x2)
    with pytest.raises(ValueError, match="custom head"):
        make(groups=2, head=nn.Dense(3)).init(jax.random.key(0), X)
    # Overlapping pooling moves a patch's values into its neighbours: activations refuse,
    # weights (which do not split the estimate) still work.
    overlap = fgrad_jax.local_losses(
        [nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
         lambda h: nn.max_pool(h, (3, 3), (2, 2), padding="SAME")],
        num_classes=3, patches=2,
    )  # fmt: skip
    params, overlap = overlap.init(jax.random.key(0), X)
    with pytest.raises(
        ValueError,
        match=r"mixes patches or groups after its dense/conv ops.*do not cross patch borders",
    ):
        overlap.tangent("activations")
    overlap.tangent("weights")
    keys = jax.random.split(jax.random.key(0), 2)
    traced = {}

    def init(k):  # the check also runs when init is traced
        p, traced["local"] = overlap.init(k, X)
        return p

    jax.jit(jax.vmap(init))(keys)
    with pytest.raises(ValueError, match="do not cross patch borders"):
        traced["local"].tangent("activations")
    norm = fgrad_jax.local_losses(
        [nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(1))],
        num_classes=3, groups=[2, 1],
    )  # fmt: skip
    norm = norm.init(jax.random.key(0), X)[1]
    norm.tangent("activations")  # the LayerNorm block is not split
    norm_split = fgrad_jax.local_losses(
        [nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(1))],
        num_classes=3, groups=2,
    )  # fmt: skip
    norm_split = norm_split.init(jax.random.key(0), X)[1]
    with pytest.raises(ValueError, match=r"block 1 .* no dense/conv operation"):
        norm_split.tangent("activations")
    assert params["heads"][0]["kernel"].shape == (4, 3)


def test_split_local_losses_train_on_digits(standard_promotion):
    """Conv 16 - conv 32 (stride 2) on sklearn's 8x8 digits, 300 steps of batch 64, Adam
    1e-2, one tangent, activity perturbation. Measured on held-out digits with patches=2,
    groups=4: summed local loss 4.67 -> 3.78, accuracy 0.564; block-wise losses 0.118.
    Asserted: the loss falls by more than 0.3, accuracy above 0.4 and 0.2 above
    block-wise."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.RandomState(0).permutation(len(d.data))
    x = jnp.asarray(d.data[perm] / 16.0, jnp.float32).reshape(-1, 8, 8, 1)
    y = jnp.asarray(d.target[perm])
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]

    def run(**split):
        blocks = nnx.Sequential(
            nnx.Conv(1, 16, (3, 3), rngs=nnx.Rngs(0)),
            nnx.relu,
            nnx.Conv(16, 32, (3, 3), strides=2, rngs=nnx.Rngs(1)),
            nnx.relu,
        )
        local = fgrad_jax.local_losses(blocks, num_classes=10, **split)
        params, local = local.init(jax.random.key(0), xtr[:2])
        tx = optax.chain(local.forward_gradient(key=0), optax.adam(1e-2))

        @jax.jit
        def step(params, state, i):
            idx = jax.random.randint(jax.random.fold_in(jax.random.key(5), i), (64,), 0, 1400)
            vf = local.value_fn(xtr[idx], ytr[idx])
            updates, state = tx.update(None, state, params, value_fn=vf)
            return optax.apply_updates(params, updates), state

        held_out = jax.jit(lambda p: local.losses(p, xte, yte).sum(1).mean())
        before, state = float(held_out(params)), tx.init(params)
        for i in range(300):
            params, state = step(params, state, i)
        acc = float((local.predict(params, xte).argmax(-1) == yte).mean())
        return before, float(held_out(params)), acc

    before, after, acc = run(patches=2, groups=4)
    _, _, acc_plain = run()
    msg = (before, after, acc, acc_plain)
    assert before - after > 0.3 and acc > 0.4 and acc > acc_plain + 0.2, msg


def flatten(h):
    return h.reshape(h.shape[0], -1)


def explicit_blocks(dense_in=16 * 8):
    """A conv net whose flatten sits in the dense block (explicit boundaries), so the second
    conv block keeps its (4, 4, 8) spatial output and can be split into patches."""
    return [
        [nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.relu, pool2],
        [nnx.Conv(4, 8, (3, 3), rngs=nnx.Rngs(1)), nnx.relu],
        [flatten, nnx.Linear(dense_in, 3, rngs=nnx.Rngs(2))],
    ]


def test_explicit_blocks_match_the_automatic_grouping():
    flat = [nn.Dense(8), nn.relu, nn.Dense(8), jnp.tanh, nn.Dense(3)]
    auto = fgrad_jax.local_losses(flat, num_classes=3)
    explicit = fgrad_jax.local_losses([flat[:2], flat[2:4], flat[4:]], num_classes=3)
    x = X.reshape(4, -1)
    params, auto = auto.init(jax.random.key(0), x)
    same, explicit = explicit.init(jax.random.key(0), x)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(same)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(auto.losses(params, x, Y), explicit.losses(params, x, Y))


def test_explicit_boundary_lets_the_second_conv_block_split():
    """With the flatten in the next block, patches=2 reaches the second conv block: its
    column count grows 4x, and the activity estimates stay unbiased."""
    local = fgrad_jax.local_losses(explicit_blocks(), num_classes=3, patches=[2, 2, None])
    params, local = local.init(jax.random.key(0), X)
    assert [grid for grid, _ in local.layout[:2]] == [(2, 2), (2, 2)]
    assert local.losses(params, X, Y).shape == (4, 4 + 4 + 1)
    check_unbiased(local, params, samples(local, params, "activations"))
    # The block after the flatten takes the flat features: 4 x 4 x 8 = 128.
    assert params["blocks"][2]["kernel"].shape == (128, 3)


def test_explicit_block_errors():
    conv = nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Block 1 holds 0 modules with parameters"):
        fgrad_jax.local_losses([[conv, nnx.relu], [flatten]], num_classes=3)
    two = [nn.Dense(4), nn.relu, nn.Dense(3)]
    with pytest.raises(ValueError, match="Block 0 holds 2 modules with parameters"):
        fgrad_jax.local_losses([two], num_classes=3)
    with pytest.raises(TypeError, match="mixes lists and single layers"):
        fgrad_jax.local_losses([[conv, nnx.relu], nn.Dense(3)], num_classes=3)
    with pytest.raises(TypeError, match="modules or callables; got 3"):
        fgrad_jax.local_losses([[conv, 3]], num_classes=3)


@pytest.mark.parametrize("patches,groups", [(None, 2), (2, 2), (2, 1)])
def test_compiled_split_estimates_match_eager_with_several_tangents(patches, groups):
    """The K tangents' cotangents are summed before the conv's kernel contraction; one form
    of the per-column scaling miscompiled under jit on XLA:CPU (NaNs, later a segfault)."""
    local = fgrad_jax.local_losses(
        [nn.Conv(8, (3, 3)), nn.relu], 10, patches=patches, groups=groups
    )
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    params, local = local.init(jax.random.key(0), x)
    f = fgrad_jax.forward_grad(
        local.value_fn(x, jnp.arange(4) % 10), num_tangents=3, tangent=local.tangent()
    )
    compiled, eager = jax.jit(f)(jax.random.key(1), params), f(jax.random.key(1), params)
    for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

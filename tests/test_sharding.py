"""Data-parallel forward gradients under jax.sharding on 8 host CPU devices.

The batch is sharded over a 1-D mesh and the parameters are replicated, or FSDP-sharded
over the same axis (then the forward pass all-gathers them, as backprop's does). Every device draws
the same tangents from the same key (they depend on the key only), so the only
communication a forward-gradient step needs is the all-reduce of the loss and of the K
directional derivatives: K+1 scalars. Backprop all-reduces the whole gradient. Collective
bytes are counted from the compiled HLO text.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fgrad_jax
from fgrad_jax._sharding import collective_bytes


def _mlp(key, sizes):
    ks = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros((n,))}
        for k, m, n in zip(ks, sizes[:-1], sizes[1:])
    ]


def _loss(params, batch):
    x, y = batch
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    logits = x @ params[-1]["w"] + params[-1]["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _setup():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    params = _mlp(jax.random.key(0), [32, 64, 64, 10])
    kx, ky = jax.random.split(jax.random.key(1))
    batch = (jax.random.normal(kx, (64, 32)), jax.random.randint(ky, (64,), 0, 10))
    return mesh, params, batch


def _shard(mesh, params, batch):
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    return jax.device_put(params, rep), jax.device_put(batch, data)


def _fg_step(tx):
    def step(params, state, batch):
        updates, state = tx.update(None, state, params, value_fn=lambda p: _loss(p, batch))
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def _bp_step(tx):
    def step(params, state, batch):
        grads = jax.grad(_loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def assert_same_update_as_one_device(step, state, params, batch, sharded_params, sharded_batch):
    """The sharded step gives the one-device update (up to the order of the batch reduction)."""
    p1, _ = step(params, state, batch)
    p8, _ = step(sharded_params, state, sharded_batch)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    ("tangent", "k"),
    [("rademacher", 1), ("rademacher", 4), ("normal", 2), ("lowrank", 1), ("sphere", 1)],
)
def test_forward_gradient_step_communicates_only_k_plus_one_scalars(tangent, k):
    mesh, params, batch = _setup()
    sp, sb = _shard(mesh, params, batch)
    tx = fgrad_jax.fgd(0.1, key=3, tangent=tangent, num_tangents=k)
    state = tx.init(params)
    step = _fg_step(tx)
    hlo = step.lower(sp, state, sb).compile().as_text()
    coll = collective_bytes(hlo)
    # K directional derivatives + the loss, float32; the sphere tangent needs no collective
    # either (its norm is computed redundantly on every device from the same draws).
    assert coll["all-reduce"] <= 4 * (k + 1), coll
    assert sum(v for op, v in coll.items() if op != "all-reduce") == 0, coll

    # The same update as on one device (up to the order of the batch reduction).
    assert_same_update_as_one_device(step, state, params, batch, sp, sb)


def test_backprop_all_reduces_the_whole_gradient():
    mesh, params, batch = _setup()
    sp, sb = _shard(mesh, params, batch)
    tx = optax.sgd(0.1)
    hlo = _bp_step(tx).lower(sp, tx.init(params), sb).compile().as_text()
    coll = collective_bytes(hlo)
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    assert coll["all-reduce"] >= param_bytes


def _fsdp_spec(mesh, x):
    """FSDP: shard the largest axis that the mesh divides; replicate leaves with none."""
    n = mesh.shape["data"]
    axes = [a for a in np.argsort(x.shape)[::-1] if x.shape[a] % n == 0]
    spec = [None] * x.ndim
    if axes:
        spec[int(axes[0])] = "data"
    return NamedSharding(mesh, P(*spec))


def _shard_fsdp(mesh, params, batch):
    sp = jax.tree_util.tree_map(lambda x: jax.device_put(x, _fsdp_spec(mesh, x)), params)
    sharded_bytes = sum(
        x.nbytes for x in jax.tree_util.tree_leaves(params) if _fsdp_spec(mesh, x).spec != P()
    )
    return sp, jax.device_put(batch, NamedSharding(mesh, P("data"))), sharded_bytes


@pytest.mark.parametrize(
    ("tangent", "k"),
    [
        ("rademacher", 1),
        ("rademacher", 4),
        ("normal", 1),
        ("normal", 4),
        ("lowrank", 1),
        ("sphere", 2),
    ],
)
def test_fsdp_forward_gradient_step_reduces_only_k_plus_one_scalars(tangent, k):
    """FSDP-sharded parameters (largest axis over the same mesh axis as the batch).

    The forward pass needs the parameters gathered, for backprop and the forward gradient
    alike: those all-gathers are allowed, and nothing more. Every device draws the full
    tangents from the key (no all-gather of tangent-sized buffers) and updates its own
    parameter shard, so the only reduction is that of the loss and the K directional
    derivatives.
    """
    mesh, params, batch = _setup()
    sp, sb, sharded_bytes = _shard_fsdp(mesh, params, batch)
    assert sharded_bytes > 0.9 * sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    tx = fgrad_jax.fgd(0.1, key=3, tangent=tangent, num_tangents=k)
    state = tx.init(params)
    step = _fg_step(tx)
    coll = collective_bytes(step.lower(sp, state, sb).compile().as_text())
    assert coll["all-reduce"] + coll["reduce-scatter"] <= 4 * (k + 1), coll
    # At most the parameters' own all-gathers (the forward pass's), no tangent-sized ones.
    assert coll["all-gather"] <= sharded_bytes, (coll, sharded_bytes)
    assert coll["all-to-all"] == coll["collective-permute"] == 0, coll

    assert_same_update_as_one_device(step, state, params, batch, sp, sb)


def test_fsdp_backprop_reduces_the_whole_gradient():
    mesh, params, batch = _setup()
    sp, sb, sharded_bytes = _shard_fsdp(mesh, params, batch)
    tx = optax.sgd(0.1)
    step = _bp_step(tx)
    coll = collective_bytes(step.lower(sp, tx.init(params), sb).compile().as_text())
    # XLA may all-reduce the whole gradient or reduce-scatter it (then a reduce-scatter's
    # result is the 1/8 shard per device); either way the reduction is parameter-sized.
    reduced = coll["all-reduce"] + coll["reduce-scatter"] * mesh.shape["data"]
    assert reduced >= sharded_bytes, (coll, sharded_bytes)
    p1, _ = step(params, tx.init(params), batch)
    p8, _ = step(sp, tx.init(params), sb)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_replicated_like_without_a_mesh_is_the_identity():
    from fgrad_jax._sharding import replicated_like

    x = jnp.arange(4.0)
    assert replicated_like(x, x) is x
    assert jax.jit(lambda a: replicated_like(a * 2, a))(x).sharding.is_fully_replicated


def test_collective_parser():
    text = """
  %all-reduce.1 = f32[] all-reduce(f32[] %x), replica_groups={}
  %ar = (f32[], f32[4]{0}) all-reduce-start(f32[] %a, f32[4]{0} %b)
  ROOT %ag = bf16[8,2]{1,0} all-gather(bf16[1,2]{1,0} %c), dimensions={0}
  %add = f32[] add(f32[] %x, f32[] %y)
"""
    got = collective_bytes(text)
    assert got["all-reduce"] == 4 + 4 + 16
    assert got["all-gather"] == 32

"""Structural checks of the optimised paths (no timing: speed is measured in experiments/).

* ``measure_ratios`` (experiments/toolkit/ratios.py, what experiments/benchmarks/ times) runs
  and returns the documented keys;
* the working memory (XLA temp bytes) of the Rademacher, normal and low-rank steps is flat
  in depth and at most 25 % of backprop's at depth 32 on one device (the lazy draws and the
  primal-tangent tie are only used there, see ``_interpreter.schedule_for``), and neither
  the schedule nor keeping the tangents changes the estimate;
* the hashed K-tangent path gives the mean of the single-tangent estimates.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import fgrad_jax
from fgrad_jax import _interpreter
from fgrad_jax._tangents import HASHED, resolve_tangent


def test_measure_ratios_smoke():
    from experiments import toolkit as runtime

    kp, kb = jax.random.split(jax.random.key(0))
    params = runtime.init_mlp(kp, [16, 32, 10])
    batch = runtime.synthetic_batch(kb, 8, (16,))
    res = runtime.measure_ratios(
        runtime.mlp_loss,
        params,
        batch,
        variants=[("rademacher", 1), ("lowrank", 2)],
        reps=2,
        warmup=1,
    )
    for key in (
        "t_forward_s",
        "t_backprop_s",
        "R_b",
        "R_f",
        "fg_over_bp",
        "paired_ratio",
        "memory",
    ):
        assert key in res
    assert res["R_f"] > 0 and res["R_b"] > 0
    assert [v["tangent"] for v in res["variants"]] == ["rademacher", "lowrank"]
    assert res["variants"][0]["memory"]["temp_bytes"] >= 0


def _mlp(depth, width, key=0):
    ks = jax.random.split(jax.random.key(key), depth + 2)
    sizes = [784] + [width] * depth + [10]
    return [
        {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros((n,))}
        for k, m, n in zip(ks, sizes[:-1], sizes[1:])
    ]


def _mlp_loss(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return jnp.mean((x @ params[-1]["w"] + params[-1]["b"]) ** 2)


def _temp_bytes(step, *args):
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def _fg_temp(params, x, tangent):
    tx = fgrad_jax.fgd(1e-4, tangent=tangent)

    def step(p, s):
        u, s = tx.update(None, s, p, value_fn=lambda q: _mlp_loss(q, x))
        return optax.apply_updates(p, u), s

    return _temp_bytes(jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params))


def _bp_temp(params, x):
    step = lambda p: jax.tree.map(lambda a, g: a - 1e-4 * g, p, jax.grad(_mlp_loss)(p, x))
    return _temp_bytes(jax.jit(step, donate_argnums=0), params)


# The Gaussian as for a model of more than 16 MiB: drawn again in the update, not kept.
NORMAL_DRAWN_AGAIN = dataclasses.replace(HASHED["normal"], keep_below_bytes=0)


def test_single_device_step_memory_is_flat_in_depth():
    """XLA temp bytes of the step (width 256, batch 256), depth 2 vs 32, on one device.

    Target (issue 4): the working memory must not grow with depth, and at depth 32 be at
    most 25 % of the backprop step's. One device is declared with ``jax.set_mesh`` (the
    suite sees eight): the estimator then anchors its lazy draws and ties each primal to
    its tangent, which is what keeps the memory flat.
    """
    x = jax.random.normal(jax.random.key(1), (256, 784))
    tangents = {"rademacher": "rademacher", "lowrank": "lowrank", "normal": NORMAL_DRAWN_AGAIN}
    mem = {}
    with jax.set_mesh(Mesh(np.array(jax.devices()[:1]), ("d",))):
        for depth in (2, 32):
            params = _mlp(depth, 256)
            mem[depth] = {"backprop": _bp_temp(params, x)}
            for name, tangent in tangents.items():
                mem[depth][name] = _fg_temp(params, x, tangent)
    d2, d32 = mem[2], mem[32]
    assert d32["backprop"] > 5 * d2["backprop"]  # backprop stores activations per layer
    assert d32["rademacher"] <= 1.05 * d2["rademacher"]
    assert d32["lowrank"] <= 1.25 * d2["lowrank"]  # its factors grow with depth, slowly
    assert d32["rademacher"] <= 0.25 * d32["backprop"]
    assert d32["lowrank"] <= 0.25 * d32["backprop"]
    assert d32["normal"] <= 1.05 * d2["normal"]
    assert d32["normal"] <= 0.25 * d32["backprop"]


@pytest.mark.parametrize("tangent", ["rademacher", "normal", "lowrank"])
@pytest.mark.parametrize("k", [1, 3])
def test_schedule_and_keeping_change_no_value(tangent, k):
    """The one-device schedule (lazy draws anchored, primal tied to its tangent) and keeping
    the Gaussian tangents for the update instead of drawing them again only order XLA's
    work: the same estimate up to the last bit of float32 rounding (XLA fuses the sums
    differently when a draw is kept)."""
    params, x = _mlp(2, 32), jax.random.normal(jax.random.key(1), (8, 784))
    strategy = resolve_tangent(tangent)
    variants = [
        dataclasses.replace(strategy, schedule=schedule)
        for schedule in (_interpreter.SINGLE_DEVICE, _interpreter.MULTI_DEVICE)
    ]
    if tangent == "normal":
        variants.append(
            dataclasses.replace(NORMAL_DRAWN_AGAIN, schedule=_interpreter.SINGLE_DEVICE)
        )
        assert variants[0].keeps(jax.tree_util.tree_leaves(params), _interpreter.SINGLE_DEVICE)
    est = [
        jax.jit(fgrad_jax.forward_grad(_mlp_loss, num_tangents=k, tangent=v))(
            jax.random.key(2), params, x
        )
        for v in variants
    ]
    for other in est[1:]:
        for a, b in zip(jax.tree_util.tree_leaves(est[0]), jax.tree_util.tree_leaves(other)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_tie_to_tangent_keeps_the_primal_unbatched_and_differentiates_as_identity():
    from fgrad_jax._interpreter import tie_to_tangent

    p = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    t = jnp.ones((4, 2, 3))
    # out_axes=None fails if the output were batched over the 4 tangents.
    out = jax.vmap(lambda ti: tie_to_tangent(p, ti), out_axes=None)(t)
    np.testing.assert_array_equal(out, p)
    primal_out, tangent_out = jax.jvp(lambda q: tie_to_tangent(q, t[0]) ** 2, (p,), (t[0],))
    np.testing.assert_allclose(primal_out, p**2)
    np.testing.assert_allclose(tangent_out, 2 * p)
    g = jax.grad(lambda q: jnp.sum(tie_to_tangent(q, t[0]) ** 2))(p)
    np.testing.assert_allclose(g, 2 * p)
    # A NaN or negative tangent element must not leak into the primal.
    bad = jnp.full((2, 3), -jnp.nan)
    np.testing.assert_array_equal(tie_to_tangent(p, bad), p)


def test_k_tangents_are_the_mean_of_single_tangent_estimates():
    """Tangent k of a K-tangent draw is bitwise row k of the (K, n) draw."""
    a = jax.random.normal(jax.random.key(0), (50,))
    f = lambda p: jnp.sum(jnp.sin(p) * a)
    key = jax.random.key(1)
    from fgrad_jax._tangents import TANGENTS

    p0 = jnp.linspace(-1, 1, 50)
    for name in ("rademacher", "normal"):
        g = fgrad_jax.forward_grad(f, tangent=name, num_tangents=3)(key, p0)
        (v,) = TANGENTS[name](key, [p0], 3)
        d = jnp.stack([jax.jvp(f, (p0,), (v[k],))[1] for k in range(3)])
        np.testing.assert_allclose(g, (d[:, None] * v).mean(0), rtol=1e-5, atol=1e-6)


def test_the_optimised_paths_can_be_differentiated():
    """The K-tangent draw (a custom_vmap) must not block jax.grad or jax.jvp of a function of
    the estimate: with f = Σ a·sin(p) and g = (∇f·v) v, ∇_p Σ g = (Σ v) H v with
    H = diag(-a·sin(p)). (The tie is off with 8 devices; its own rules are tested above.)"""
    from fgrad_jax._tangents import TANGENTS

    a = jax.random.normal(jax.random.key(0), (6, 5))
    f = lambda p: jnp.sum(jnp.sin(p) * a)
    p0 = jnp.linspace(-1.0, 1.0, 30).reshape(6, 5)
    key = jax.random.key(1)
    for name in ("rademacher", "normal"):
        total = lambda p, name=name: jnp.sum(fgrad_jax.forward_grad(f, tangent=name)(key, p))
        (v,) = TANGENTS[name](key, [p0], 1)
        want = jnp.sum(v[0]) * (-a * jnp.sin(p0) * v[0])
        np.testing.assert_allclose(jax.jit(jax.grad(total))(p0), want, rtol=1e-4, atol=1e-4)
        _, tangent_out = jax.jvp(total, (p0,), (jnp.ones_like(p0),))
        np.testing.assert_allclose(tangent_out, jnp.sum(want), rtol=1e-4, atol=1e-4)

"""Structural checks of the optimised paths (no timing: speed is measured in experiments/).

* ``measure_ratios`` (experiments/runtime.py) runs and returns the documented keys;
* the working memory (XLA temp bytes) of the Rademacher and low-rank steps is flat in depth
  and at most 25 % of backprop's at depth 32 (in a subprocess with one device: the lazy
  draws and the primal-tangent tie are only used when one device is visible, see
  ``_lowrank.anchor_lazy_draws``), and the tie does not change the estimate;
* the hashed K-tangent path gives the mean of the single-tangent estimates.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fgrad_jax

ROOT = Path(__file__).resolve().parent.parent


def test_measure_ratios_smoke():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import runtime
    finally:
        sys.path.remove(str(ROOT / "experiments"))
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


_MEMORY_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
import runtime, fgrad_jax
from fgrad_jax import _lowrank
assert jax.device_count() == 1
from fgrad_jax._tangents import HASHED
limit = HASHED["normal"].store_limit_bytes
HASHED["normal"].store_limit_bytes = 0  # as for a model of more than 16 MiB
rows = runtime.memory_sweep(depths=(2, 32), width=256, batch_size=256, tangents=["rademacher", "lowrank", "normal"])
mem = [{k: row[k]["temp_bytes"] for k in ("backprop", "rademacher", "lowrank", "normal")} for row in rows]
HASHED["normal"].store_limit_bytes = limit
# The same estimates with and without the primal-tangent tie (it only orders the work).
kp, kb = jax.random.split(jax.random.key(0))
params = runtime.init_mlp(kp, [16, 32, 32, 10])
batch = runtime.synthetic_batch(kb, 8, (16,))
diff = {}
for tangent in ("rademacher", "normal", "lowrank"):
    est = []
    for tie in (True, False):
        _lowrank.TIE_PRIMAL = tie
        g = fgrad_jax.forward_grad(runtime.mlp_loss, num_tangents=2, tangent=tangent)
        est.append(jax.jit(g)(jax.random.key(1), params, batch))
    diff[tangent] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*map(jax.tree_util.tree_leaves, est)))
# Gaussian tangents kept for the update (small models) or drawn again (large ones).
assert HASHED["normal"].stores(jax.tree_util.tree_leaves(params))
kept_diff = {}
for k in (1, 3):
    est = []
    for lim in (limit, 0):
        HASHED["normal"].store_limit_bytes = lim
        g = fgrad_jax.forward_grad(runtime.mlp_loss, num_tangents=k, tangent="normal")
        est.append(jax.jit(g)(jax.random.key(2), params, batch))
    HASHED["normal"].store_limit_bytes = limit
    kept_diff[k] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*map(jax.tree_util.tree_leaves, est)))
print(json.dumps({"memory": mem, "tie_diff": diff, "kept_vs_again_diff": kept_diff}))
"""


def test_single_device_step_memory_is_flat_in_depth_and_tie_changes_nothing():
    """XLA temp bytes of the step (width 256, batch 256), depth 2 vs 32, one device.

    Target (issue 4): the working memory must not grow with depth, and at depth 32 be at
    most 25 % of the backprop step's. The primal-tangent tie (_lowrank.tie_to_tangent)
    that achieves it must not change the estimate, nor must keeping the Gaussian tangents
    for the update instead of drawing them again (both only happen on one device).
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(ROOT / "experiments")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    d2, d32 = res["memory"]
    assert d32["backprop"] > 5 * d2["backprop"]  # backprop stores activations per layer
    assert d32["rademacher"] <= 1.05 * d2["rademacher"]
    assert d32["lowrank"] <= 1.25 * d2["lowrank"]  # its factors grow with depth, slowly
    assert d32["rademacher"] <= 0.25 * d32["backprop"]
    assert d32["lowrank"] <= 0.25 * d32["backprop"]
    # Gaussian tangents drawn again in the update (models above 16 MiB): flat as well.
    assert d32["normal"] <= 1.05 * d2["normal"]
    assert d32["normal"] <= 0.25 * d32["backprop"]
    for tangent, diff in res["tie_diff"].items():
        assert diff < 1e-6, (tangent, diff)
    # Gaussian tangents kept or drawn again in the update: the same estimate, K = 1 and 3.
    for k, diff in res["kept_vs_again_diff"].items():
        assert diff < 1e-5, (k, diff)


def test_tie_to_tangent_keeps_the_primal_unbatched_and_differentiates_as_identity():
    from fgrad_jax._lowrank import tie_to_tangent

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

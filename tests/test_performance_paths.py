"""Structural checks of the optimised paths (no timing: speed is measured in experiments/).

* ``measure_ratios`` (experiments/runtime.py) runs and returns the documented keys;
* the working memory (XLA temp bytes) of the Rademacher and low-rank steps is flat in depth
  while backprop's grows (in a subprocess with one device: the lazy tangent draws are only
  anchored when one device is visible, see ``_lowrank.anchor_lazy_draws``);
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
sys.path.insert(0, sys.argv[1])
import runtime
rows = runtime.memory_sweep(depths=(16, 32), width=256, batch_size=256, tangents=["rademacher", "lowrank"])
print(json.dumps([{k: row[k]["temp_bytes"] for k in ("backprop", "rademacher", "lowrank")} for row in rows]))
"""


def test_step_working_memory_is_flat_in_depth():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(ROOT / "experiments")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    d16, d32 = json.loads(out.stdout.strip().splitlines()[-1])
    assert d32["backprop"] > 1.5 * d16["backprop"]  # backprop stores activations per layer
    assert d32["rademacher"] <= 1.05 * d16["rademacher"]
    assert d32["lowrank"] <= 1.05 * d16["lowrank"]
    assert d32["rademacher"] < 0.5 * d32["backprop"] and d32["lowrank"] < 0.5 * d32["backprop"]


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

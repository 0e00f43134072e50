"""Depth scaling (paper Fig. 6): R_f, R_b, R_f/R_b and memory of an MLP vs its depth.

An MLP of ``depth`` hidden ReLU layers of ``width`` units, batch 64, on random inputs of
``in_dim`` features (the cost does not depend on the data). For each depth the three
programs (f, one FGD iteration, one backprop iteration) are timed side by side with
:func:`toolkit.measure_runtime`, and their memory is read from XLA's compiled memory
analysis.

Usage: ``python experiments/depth.py --preset quick --out out/depth``
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from toolkit import (
    MLP,
    add_overrides,
    apply_overrides,
    classifier_loss,
    environment,
    measure_runtime,
    num_params,
    to_jsonable,
    write_json,
)


@dataclasses.dataclass
class DepthConfig:
    """Configuration of the depth-scaling experiment.

    Attributes:
        width: Hidden width (paper: 1024).
        depths: Numbers of hidden layers (paper: 1 to 100).
        batch: Batch size.
        in_dim: Input features (784 = MNIST).
        num_classes: Output classes.
        lr: Learning rate of the timed steps (irrelevant to the timing).
        runtime_rounds: Rounds per measurement.
        tangent: FGD's tangent distribution (``"normal"``: the paper's; see
            ``fgrad_jax.TANGENT_NAMES``).
        seed: Seed.
    """

    width: int = 1024
    depths: tuple[int, ...] = (1, 2, 5, 10, 20, 40, 60, 80, 100)
    batch: int = 64
    in_dim: int = 784
    num_classes: int = 10
    lr: float = 2e-5
    runtime_rounds: int = 15
    tangent: str = "normal"
    seed: int = 0


PRESETS = {
    "paper": DepthConfig(),
    "quick": DepthConfig(width=256, depths=(1, 2, 4, 8, 16), in_dim=64, runtime_rounds=9),
    "test": DepthConfig(width=32, depths=(1, 3), in_dim=16, runtime_rounds=3),
}


def run(cfg: DepthConfig, progress: bool = True) -> dict:
    """Measures every depth; returns ``{"rows": [...], "config": ...}``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    key = jax.random.key(cfg.seed)
    kx, ky, kp = jax.random.split(key, 3)
    x = jax.random.uniform(kx, (cfg.batch, cfg.in_dim), jnp.float32)
    y = jax.random.randint(ky, (cfg.batch,), 0, cfg.num_classes)
    rows = []
    for depth in tqdm(cfg.depths, desc="depth", disable=not progress, leave=False):
        model = MLP((cfg.width,) * depth, cfg.num_classes)
        params = model.init(kp, x)
        rt = measure_runtime(
            classifier_loss(model),
            params,
            (x, y),
            lr=cfg.lr,
            rounds=cfg.runtime_rounds,
            seed=cfg.seed,
            tangent=cfg.tangent,
        )
        rows.append({"depth": depth, "num_params": num_params(params), **rt})
    return {"rows": rows, "config": to_jsonable(cfg), "wall_time_s": time.perf_counter() - t0}


def main(argv=None) -> dict:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--out", default="out/depth")
    add_overrides(p, DepthConfig, ["width", "depths", "tangent"])
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = apply_overrides(PRESETS[a.preset], a)
    res = run(cfg, progress=not a.no_progress)
    out = Path(a.out)
    write_json(out / "depth.json", {"depth": res, "environment": environment(cfg)})
    from toolkit.plots import plot_depth

    plot_depth(out, res)
    for r in res["rows"]:
        print(
            f"depth {r['depth']:3d}: R_f={r['R_f']:.3f} R_b={r['R_b']:.3f} "
            f"R_f/R_b={r['fg_over_bp']:.3f} (paired {r['paired_ratio']:.3f})"
        )
    return res


if __name__ == "__main__":
    main()

"""Beale and Rosenbrock (paper Fig. 2): forward gradient descent vs gradient descent.

The paper states the learning rates and iteration counts (Beale: lr 0.01, 1,000
iterations; Rosenbrock: lr 5e-4, 25,000 iterations; 10 runs). It does not state the
starting points; ours (Beale ``(1, 1)``, Rosenbrock ``(-1.5, 2)``, see :data:`PRESETS`) are
assumptions, fixed so that every run starts from the same point and the runs differ only
in their tangents.
Both methods use a constant learning rate (``decay_k = 0``) as in the paper's Fig. 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from toolkit import (
    FUNCTIONS,
    MINIMA,
    Arm,
    add_estimates,
    add_overrides,
    apply_overrides,
    environment,
    format_entry,
    landscape,
    measure_runtime,
    pick_tuned,
    summarise_pair,
    time_per_iter,
    to_jsonable,
    train_arms,
    write_json,
)


@dataclasses.dataclass
class FunctionConfig:
    """Configuration of a Beale or Rosenbrock experiment.

    Attributes:
        name: ``"beale"`` or ``"rosenbrock"``.
        lr: Shared learning rate (paper: Beale 0.01, Rosenbrock 5e-4).
        steps: Iterations (paper: 1,000 and 25,000).
        runs: Number of runs (paper: 10), vmapped; GD is deterministic, so its runs are
            identical and only FGD's differ.
        start: Starting point (assumed; the paper does not state it).
        decay_k: Learning-rate decay ``k`` (0: constant, as in the paper's Fig. 2).
        chunk: Iterations per timed chunk.
        log_every: Steps per JSONL record.
        tune_factors: Learning-rate multipliers of the per-method sweep.
        tune_runs: Runs per learning rate in the sweep.
        runtime_rounds: Rounds of the R_f/R_b measurement.
        tangent: FGD's tangent distribution (``"normal"``: the paper's; see
            ``fgrad_jax.TANGENT_NAMES``).
        seed: Base seed.
    """

    name: str = "beale"
    lr: float = 0.01
    steps: int = 1000
    runs: int = 10
    start: tuple[float, float] = (1.0, 1.0)
    decay_k: float = 0.0
    chunk: int = 100
    log_every: int = 1
    tune_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    tune_runs: int = 5
    runtime_rounds: int = 15
    tangent: str = "normal"
    seed: int = 0


PRESETS = {
    # The paper's settings (lr, iterations, runs); start points are assumptions.
    "paper": {
        "beale": FunctionConfig("beale", 0.01, 1000, 10, (1.0, 1.0), chunk=100, log_every=1),
        "rosenbrock": FunctionConfig(
            "rosenbrock", 5e-4, 25000, 10, (-1.5, 2.0), chunk=2500, log_every=25
        ),
    },
}
# These problems are cheap, so the quick preset is the paper's.
PRESETS["quick"] = PRESETS["paper"]
PRESETS["test"] = {
    "beale": FunctionConfig(
        "beale",
        0.01,
        200,
        3,
        (1.0, 1.0),
        chunk=100,
        log_every=10,
        tune_factors=(0.5, 1.0),
        tune_runs=2,
        runtime_rounds=3,
    ),
    "rosenbrock": FunctionConfig(
        "rosenbrock",
        5e-4,
        400,
        3,
        (-1.5, 2.0),
        chunk=200,
        log_every=20,
        tune_factors=(0.5, 1.0),
        tune_runs=2,
        runtime_rounds=3,
    ),
}


def _problem(cfg: FunctionConfig):
    fn = FUNCTIONS[cfg.name]
    start = jnp.asarray(cfg.start, jnp.float32)

    def loss_fn(p, batch):
        del batch
        return fn(p)

    def init_params(key):
        del key
        return start

    return loss_fn, init_params


def run(
    cfg: FunctionConfig,
    out: str | Path,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> dict:
    """Runs one 2-D experiment: shared-lr comparison, tuned comparison, runtime ratios.

    Args:
        cfg: The configuration.
        out: Output directory; JSONL files go to ``out/runs/<name>/``.
        progress: Show progress bars.
        checkpoint_dir: Optional orbax checkpoint directory (resume).

    Returns:
        The experiment's entry of ``results.json``.
    """
    out = Path(out)
    loss_fn, init_params = _problem(cfg)
    run_dir = out / "runs" / cfg.name
    seeds = [cfg.seed + i for i in range(cfg.runs)]
    t0 = time.perf_counter()
    res = train_arms(
        [
            Arm("fgd", "fgd", [cfg.lr] * cfg.runs, seeds),
            Arm("sgd", "sgd", [cfg.lr] * cfg.runs, seeds),
        ],
        loss_fn,
        init_params,
        None,
        num_steps=cfg.steps,
        decay_k=cfg.decay_k,
        chunk=cfg.chunk,
        log_every=cfg.log_every,
        out_dir=run_dir,
        checkpoint_dir=checkpoint_dir,
        record_params=True,
        progress=progress,
        desc=f"{cfg.name} shared lr",
        tangent=cfg.tangent,
    )
    xs, ys, zs = landscape(cfg.name)
    np.savez(run_dir / "landscape.npz", xs=xs, ys=ys, zs=zs)
    shared = summarise_pair(res["fgd"], res["sgd"], smooth_window=1)
    shared["lr"] = cfg.lr
    final_points = {m: np.asarray(res[m].traj[:, -1]).tolist() for m in ("fgd", "sgd")}
    rt = measure_runtime(
        loss_fn,
        init_params(None),
        None,
        lr=cfg.lr,
        decay_k=cfg.decay_k,
        rounds=cfg.runtime_rounds,
        seed=cfg.seed,
        tangent=cfg.tangent,
    )
    add_estimates(shared, time_per_iter(rt))
    tuned = tune(cfg, run_dir, progress, rt)
    entry = {
        "R_f": rt["R_f"],
        "R_b": rt["R_b"],
        "fg_over_bp": rt["fg_over_bp"],
        "paired_ratio": rt["paired_ratio"],
        "T_f": shared["T_f"],
        "T_b": shared["T_b"],
        "T_ratio": shared["T_ratio"],
        "initial_loss": shared["initial_loss"],
        "final_loss_fgd": shared["final_loss_fgd"],
        "final_loss_sgd": shared["final_loss_sgd"],
        "shared_lr": [shared],
        "tuned": tuned,
        "runtime": rt,
        "final_points": final_points,
        "minimum": MINIMA[cfg.name],
        "num_params": 2,
        "wall_time_s": time.perf_counter() - t0,
        "config": to_jsonable(cfg),
    }
    return entry


def tune(cfg: FunctionConfig, run_dir: Path, progress: bool, rt: dict) -> dict:
    """Per-method learning-rate sweep; compares each method at its own best lr."""
    lrs = [cfg.lr * f for f in cfg.tune_factors]
    grid_lrs = [lr for lr in lrs for _ in range(cfg.tune_runs)]
    grid_seeds = [cfg.seed + 1000 + r for _ in lrs for r in range(cfg.tune_runs)]
    res = train_arms(
        [
            Arm("tune_fgd", "fgd", grid_lrs, grid_seeds),
            Arm("tune_sgd", "sgd", grid_lrs, grid_seeds),
        ],
        *_problem(cfg),
        None,
        num_steps=cfg.steps,
        decay_k=cfg.decay_k,
        chunk=cfg.chunk,
        log_every=cfg.steps // 10 or 1,
        out_dir=run_dir,
        progress=progress,
        desc=f"{cfg.name} lr sweep",
        tangent=cfg.tangent,
    )
    return pick_tuned(
        res,
        lrs,
        cfg.tune_runs,
        smooth_window=1,
        per_iter=time_per_iter(rt),
    )


def main(argv=None, name: str = "beale") -> dict:
    """Command line: ``python experiments/<beale|rosenbrock>.py --preset quick --out DIR``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] + f" ({name})")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--out", default=f"out/{name}")
    add_overrides(p, FunctionConfig, ["lr", "steps", "runs", "tangent"])
    p.add_argument("--checkpoint-dir")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = apply_overrides(PRESETS[a.preset][name], a)
    entry = run(cfg, a.out, progress=not a.no_progress, checkpoint_dir=a.checkpoint_dir)
    write_json(
        Path(a.out) / f"{name}.json",
        {"experiments": {name: entry}, "environment": environment(cfg)},
    )
    from toolkit.plots import plot_function, plot_loss

    plot_function(Path(a.out), name, entry)
    plot_loss(Path(a.out), name, entry)
    print(format_entry(name, entry))
    return entry

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

import _common as C
import jax
import jax.numpy as jnp
import numpy as np


def beale(p: jax.Array) -> jax.Array:
    """Beale's function; minimum 0 at ``(3, 0.5)``."""
    x, y = p[0], p[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def rosenbrock(p: jax.Array) -> jax.Array:
    """Rosenbrock's function ``(1 - x)^2 + 100 (y - x^2)^2``; minimum 0 at ``(1, 1)``."""
    x, y = p[0], p[1]
    return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


FUNCTIONS = {"beale": beale, "rosenbrock": rosenbrock}
MINIMA = {"beale": (3.0, 0.5), "rosenbrock": (1.0, 1.0)}
# Plot windows for the contour figures.
WINDOWS = {"beale": ((-1.0, 4.0), (-1.5, 2.0)), "rosenbrock": ((-2.0, 2.0), (-1.0, 3.0))}


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
    res = C.train_arms(
        [
            C.Arm("fgd", "fgd", [cfg.lr] * cfg.runs, seeds),
            C.Arm("sgd", "sgd", [cfg.lr] * cfg.runs, seeds),
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
    shared = C.summarise_pair(res["fgd"], res["sgd"], smooth_window=1)
    shared["lr"] = cfg.lr
    final_points = {m: np.asarray(res[m].traj[:, -1]).tolist() for m in ("fgd", "sgd")}
    rt = C.measure_runtime(
        loss_fn,
        init_params(None),
        None,
        lr=cfg.lr,
        decay_k=cfg.decay_k,
        rounds=cfg.runtime_rounds,
        seed=cfg.seed,
        tangent=cfg.tangent,
    )
    C.add_estimates(shared, {"fgd": rt["time_fgd_iter"], "sgd": rt["time_sgd_iter"]})
    tuned = tune(cfg, run_dir, progress, rt)
    entry = {
        "R_f": rt["R_f"],
        "R_b": rt["R_b"],
        "R_f_over_R_b": rt["R_f_over_R_b"],
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
        "config": C.to_jsonable(cfg),
    }
    return entry


def tune(cfg: FunctionConfig, run_dir: Path, progress: bool, rt: dict) -> dict:
    """Per-method learning-rate sweep; compares each method at its own best lr."""
    lrs = [cfg.lr * f for f in cfg.tune_factors]
    grid_lrs = [lr for lr in lrs for _ in range(cfg.tune_runs)]
    grid_seeds = [cfg.seed + 1000 + r for _ in lrs for r in range(cfg.tune_runs)]
    res = C.train_arms(
        [
            C.Arm("tune_fgd", "fgd", grid_lrs, grid_seeds),
            C.Arm("tune_sgd", "sgd", grid_lrs, grid_seeds),
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
    return C.pick_tuned(
        res,
        lrs,
        cfg.tune_runs,
        smooth_window=1,
        time_per_iter={"fgd": rt["time_fgd_iter"], "sgd": rt["time_sgd_iter"]},
    )


def main(argv=None, name: str = "beale") -> dict:
    """Command line: ``python experiments/<beale|rosenbrock>.py --preset quick --out DIR``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] + f" ({name})")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--out", default=f"out/{name}")
    p.add_argument("--lr", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--runs", type=int)
    p.add_argument("--tangent", help="FGD tangent distribution (default normal, the paper's)")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = dataclasses.replace(PRESETS[a.preset][name])
    for field in ("lr", "steps", "runs", "tangent"):
        if getattr(a, field) is not None:
            setattr(cfg, field, getattr(a, field))
    entry = run(cfg, a.out, progress=not a.no_progress, checkpoint_dir=a.checkpoint_dir)
    C.write_json(
        Path(a.out) / f"{name}.json",
        {"experiments": {name: entry}, "environment": C.environment(cfg)},
    )
    import _plots

    _plots.plot_function(Path(a.out), name, entry)
    _plots.plot_loss(Path(a.out), name, entry)
    print(C.format_entry(name, entry))
    return entry

"""Loss curves to comparisons: smoothing, divergence, time to a common threshold, tuning."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .train import METHODS, ArmResult


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average what exists)."""
    curve = np.asarray(curve, np.float64)
    window = max(1, min(int(window), len(curve)))
    c = np.cumsum(np.insert(np.nan_to_num(curve, nan=np.inf, posinf=np.inf), 0, 0.0))
    out = np.empty_like(curve)
    idx = np.arange(len(curve))
    lo = np.maximum(0, idx + 1 - window)
    with np.errstate(invalid="ignore"):
        out[:] = (c[idx + 1] - c[lo]) / (idx + 1 - lo)
    return out


def diverged(losses: np.ndarray) -> np.ndarray:
    """Which runs (rows of ``losses``) have a non-finite loss at some step."""
    return ~np.isfinite(np.asarray(losses)).all(axis=1)


def mean_curve(losses: np.ndarray) -> np.ndarray:
    """Mean loss curve over the runs that did not diverge (all ``inf`` if none is left)."""
    mean = run_band(losses)[0]
    return np.where(np.isnan(mean), np.inf, mean)


def run_band(losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(mean, low, high, n_diverged)`` of loss curves (rows = runs) for a figure, over the
    runs that did not diverge as in :func:`mean_curve`; all ``nan`` when every run diverged."""
    losses = np.asarray(losses, np.float64)
    ok = ~diverged(losses)
    if not ok.any():
        nan = np.full(losses.shape[1], np.nan)
        return nan, nan.copy(), nan.copy(), int(losses.shape[0])
    kept = losses[ok]
    return kept.mean(axis=0), kept.min(axis=0), kept.max(axis=0), int((~ok).sum())


def first_crossing(curve: np.ndarray, threshold: float) -> int | None:
    """Index of the first element ``<= threshold`` (``None`` if never)."""
    hits = np.nonzero(np.asarray(curve) <= threshold)[0]
    return int(hits[0]) if hits.size else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if (a is not None and b) else None


def _to_threshold(curves: dict[str, np.ndarray], time_at: dict[str, Any]) -> dict[str, Any]:
    """Final losses of the methods' smoothed curves, the common threshold (the higher of the
    two: a level both methods reach), iterations to it, and ``time_at[m](iteration)`` at them."""
    final = {m: float(curves[m][-1]) for m in METHODS}
    threshold = max(final.values())
    iters = {m: first_crossing(curves[m], threshold) for m in METHODS}
    t = {m: time_at[m](i) if i is not None else None for m, i in iters.items()}
    return {
        **{f"final_loss_{m}": final[m] for m in METHODS},
        "threshold": threshold,
        **{f"iters_to_threshold_{m}": iters[m] for m in METHODS},
        "T_f": t["fgd"],
        "T_b": t["sgd"],
        "T_ratio": _ratio(t["fgd"], t["sgd"]),
    }


def summarise_pair(fgd: ArmResult, sgd: ArmResult, smooth_window: int) -> dict[str, Any]:
    """Initial/final losses and time/iterations to a common loss threshold.

    The curves are the per-step training losses averaged over the runs that did not diverge
    (their number is reported), smoothed with a trailing moving average of
    ``smooth_window`` steps. ``T_f``/``T_b`` are the measured wall times (of the vmapped
    program of all runs, compilation excluded) at the first step the smoothed curve is at or
    below the threshold.
    """
    arms = {"fgd": fgd, "sgd": sgd}
    curves = {m: smooth(mean_curve(a.losses), smooth_window) for m, a in arms.items()}
    return {
        "initial_loss": float(np.nanmean(np.concatenate([fgd.losses[:, 0], sgd.losses[:, 0]]))),
        **_to_threshold(curves, {m: lambda i, a=a: float(a.step_time[i]) for m, a in arms.items()}),
        **{f"wall_time_{m}": a.wall_time for m, a in arms.items()},
        **{f"time_per_iter_{m}": a.wall_time / a.losses.shape[1] for m, a in arms.items()},
        "runs": int(fgd.losses.shape[0]),
        **{f"diverged_runs_{m}": int(diverged(a.losses).sum()) for m, a in arms.items()},
    }


def time_per_iter(runtime: dict[str, Any]) -> dict[str, float]:
    """``{"fgd": s, "sgd": s}``: median time of one iteration, from a
    :func:`toolkit.ratios.measure_runtime` result."""
    return {"fgd": runtime["variants"][0]["t_step_s"], "sgd": runtime["t_backprop_s"]}


def add_estimates(summary: dict, per_iter: dict[str, float]) -> dict:
    """Adds ``T_fgd_est``, ``T_sgd_est``, ``T_ratio_est`` to a :func:`summarise_pair` dict:
    iterations to the threshold x the median time of one un-vmapped iteration (the paper's
    per-run time, free of how ``jax.vmap`` over runs changes each method's cost)."""
    for m in METHODS:
        i = summary[f"iters_to_threshold_{m}"]
        summary[f"T_{m}_est"] = (i + 1) * per_iter[m] if i is not None else None
    summary["T_ratio_est"] = _ratio(summary["T_fgd_est"], summary["T_sgd_est"])
    return summary


def num_params(params: Any) -> int:
    """Number of scalar parameters."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


def pick_tuned(
    results: dict[str, ArmResult],
    lrs: Sequence[float],
    runs_per_lr: int,
    smooth_window: int,
    per_iter: dict[str, float],
) -> dict[str, Any]:
    """Picks each method's best learning rate from a sweep and compares them.

    ``results`` holds arms ``"tune_fgd"`` and ``"tune_sgd"`` whose runs are ordered
    ``lr``-major (``runs_per_lr`` seeds per learning rate). A learning rate's score is the
    final smoothed training loss averaged over its seeds (``inf`` if any seed diverged). With
    each method at its best rate, ``T = iterations to threshold x per_iter[method]`` (the
    median time of one iteration), since the sweep's runs share one vmapped program.
    """
    out: dict[str, Any] = {"lrs": list(lrs), "final_loss": {}, "best_lr": {}}
    curves = {}
    for m in METHODS:
        losses = results[f"tune_{m}"].losses.reshape(len(lrs), runs_per_lr, -1)
        cs = [smooth(mean_curve(runs), smooth_window) for runs in losses]
        # A rate at which any seed diverges does not count as tuned.
        bad = [diverged(runs).any() or not math.isfinite(c[-1]) for runs, c in zip(losses, cs)]
        finals = [math.inf if b else float(c[-1]) for b, c in zip(bad, cs)]
        best = int(np.argmin(finals))
        out["final_loss"][m] = finals
        out["best_lr"][m] = float(lrs[best])
        curves[m] = cs[best]
    out.update(_to_threshold(curves, {m: lambda i, m=m: (i + 1) * per_iter[m] for m in METHODS}))
    out["T_definition"] = "iterations to threshold x median time of one iteration"
    return out


def fmt(v: Any, nd: int = 3) -> str:
    """A number for a table: fixed or scientific notation, ``n/a`` for ``None``."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{nd}e}"
        return f"{v:.{nd}f}"
    return str(v)


def md_table(header: str, rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table's lines; ``header``: the column names separated by `` | ``."""
    lines = [f"| {header} |", "|" + "---|" * (header.count(" | ") + 1)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def format_entry(name: str, e: dict) -> str:
    """One-line summary of an experiment's entry."""
    t = e.get("tuned") or {}
    return (
        f"{name}: R_f={fmt(e['R_f'])} R_b={fmt(e['R_b'])} "
        f"T_f/T_b={fmt(e.get('T_ratio'))} (tuned {fmt(t.get('T_ratio'))}) "
        f"loss {fmt(e['initial_loss'])} -> fgd {fmt(e['final_loss_fgd'])} / "
        f"sgd {fmt(e['final_loss_sgd'])}"
    )

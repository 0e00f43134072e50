"""Figures, drawn only from what the experiments wrote: JSONL metrics, results entries and the
sampled landscapes of the 2-D functions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from experiments.toolkit.analysis import diverged, run_band
from experiments.toolkit.io import read_jsonl

# One colour and one name per method in every figure ("sgd" is the results' key for the
# backprop arm: plain (S)GD on jax.value_and_grad).
COLORS = {"fgd": "tab:blue", "sgd": "tab:red"}
LABELS = {"fgd": "FGD (forward gradient)", "sgd": "backprop"}


class _PlainLog(matplotlib.ticker.LogFormatter):
    """The log ticks matplotlib would label, as plain numbers ("0.6", not "6e-01")."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def _y_scale(ax, values) -> None:
    """A log y axis when the values span a decade or more, else a linear one: a log axis
    over less than a decade labels only minor ticks, as "2.31x10^0"."""
    v = np.asarray([x for x in np.ravel(values) if x is not None and np.isfinite(x) and x > 0])
    if v.size and v.max() >= 10 * v.min():
        ax.set_yscale("log")
        plain = matplotlib.ticker.FormatStrFormatter("%g")
        ax.yaxis.set_major_formatter(plain)
        # Over a decade or two matplotlib labels some minor ticks too: plainly.
        ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False))
    else:
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def _log_ticks(ax, ticks, fmt: str) -> None:
    """A log x axis with ticks exactly at ``ticks``, labelled ``fmt``, no minor ticks."""
    ax.set_xscale("log")
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter(fmt))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_arm(path: Path):
    rows = read_jsonl(path)
    header = rows[0] if rows and rows[0].get("header") else {}
    recs = [r for r in rows if not r.get("header")]
    steps = np.array([r["step"] for r in recs])
    times = np.array([r["time_s"] for r in recs])
    loss = np.array([[np.nan if v is None else v for v in r["loss"]] for r in recs], float)
    params = np.array([r["params"] for r in recs], float) if recs and "params" in recs[0] else None
    return header, steps, times, loss, params


def loss_figure(out: Path, name: str, entry: dict):
    """Loss vs iterations and vs wall time (mean over the runs that did not diverge, band =
    their min..max; the legend counts the diverged runs)."""
    run_dir = out / "runs" / name
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", ":", "-."]
    paths = sorted(p for p in run_dir.glob("*.jsonl") if not p.name.startswith("tune_"))
    arms = [(path, *_load_arm(path)) for path in paths]
    # One line style per learning rate, shared by both methods (colour = method).
    lrs = sorted({a[1].get("lrs", [0.0])[0] for a in arms})
    for path, header, steps, times, loss, _ in arms:
        method = header.get("method", path.stem.split("_")[0])
        lr = header.get("lrs", [None])[0]
        # Runs as columns -> rows; the mean and band leave diverged runs out, as the
        # tables do.
        mean, lo, hi, bad = run_band(loss.T)
        label = f"{LABELS[method]}, lr {lr:g}" if lr is not None else LABELS[method]
        if bad:
            label += f" ({bad} of {loss.shape[1]} runs diverged, left out)"
        ls = styles[lrs.index(lr if lr is not None else 0.0) % len(styles)]
        # A short run logs few points: mark them, or a single one would not show.
        marker = "o" if len(steps) < 30 else None
        for ax, x in zip(axes, (steps + 1, times)):
            ax.plot(x, mean, ls, color=COLORS[method], label=label, lw=1.2, marker=marker, ms=4)
            if loss.shape[1] - bad > 1:
                ax.fill_between(x, lo, hi, color=COLORS[method], alpha=0.15, lw=0)
    thr = (entry.get("shared_lr") or [{}])[0].get("threshold")
    for ax in axes:
        _y_scale(ax, np.concatenate([np.ravel(a[4]) for a in arms]) if arms else [])
        ax.set_ylabel("training loss")
        if thr:
            ax.axhline(thr, color="gray", lw=0.8, ls=":", label="threshold")
        ax.grid(alpha=0.3)
    # A curve that hardly falls is not a plotting accident: say so on the figure.
    drops = [np.nanmean(a[4][-1]) / np.nanmean(a[4][0]) for a in arms if len(a[4]) > 1]
    if drops and min(drops) > 0.8:
        note = (
            f"the loss falls by {max(0.0, 100 * (1 - min(drops))):.0f} % at most: the shared "
            "rate and\nstep count are too small for this model to train far; each method at\n"
            "its own rate: tuned_sweeps.png"
        )
        box = {"facecolor": "white", "alpha": 0.8, "lw": 0}
        axes[0].text(0.02, 0.03, note, transform=axes[0].transAxes, fontsize=8, bbox=box)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall time (s, all runs of an arm vmapped together)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{name}: loss vs iterations and vs time (mean over runs, band = min..max)")
    return fig


def function_figure(out: Path, name: str, entry: dict):
    """Contour plot of a 2-D function (its sampled landscape, colour bar = log10 f) with the
    FGD runs' and GD's trajectories (diverged FGD runs dashed)."""
    land = np.load(out / "runs" / name / "landscape.npz")
    xs, ys, zs = land["xs"], land["ys"], land["zs"]
    fig, ax = plt.subplots(figsize=(7.2, 5))
    # A grey landscape, so that the methods keep their colours of every other figure.
    logz = np.log10(zs + 1e-3)
    filled = ax.contourf(xs, ys, logz, levels=40, cmap="Greys", alpha=0.7)
    ax.contour(xs, ys, logz, levels=15, colors="k", linewidths=0.3, alpha=0.6)
    fig.colorbar(filled, ax=ax, label="log10 f(x, y)")
    start = entry["config"]["start"]
    for method in ("fgd", "sgd"):
        _, _, _, loss, params = _load_arm(out / "runs" / name / f"{method}.jsonl")
        fg = method == "fgd"
        # GD is deterministic: its runs coincide, one is drawn.
        runs = params.shape[1] if fg else 1
        bad = diverged(loss.T)
        label = LABELS[method]
        look = {"lw": 1.0 if fg else 2.5, "marker": "o" if fg else None, "zorder": 3 if fg else 4}
        if fg:
            label += f", {runs} runs"
            if bad.any():
                label += f" ({int(bad.sum())} diverged: dashed)"
        for r in range(runs):
            traj = np.vstack([start, params[:, r]])
            # The FGD runs thin and solid (each ending in a dot), backprop dotted on top: where
            # the paths coincide, both stay visible.
            style = ("--" if bad[r] else "-") if fg else ":"
            look["label"] = label if r == 0 else None
            ax.plot(*traj.T, style, color=COLORS[method], alpha=0.8, markevery=[-1], ms=3, **look)
    ax.plot(*start, "ko", ms=6, label="start")
    ax.plot(*entry["minimum"], "*", color="gold", mec="k", ms=14, label="minimum")
    ax.set(xlim=(xs.min(), xs.max()), ylim=(ys.min(), ys.max()), xlabel="x", ylabel="y")
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    ax.set_title(f"{name}: trajectories of every run")
    return fig


def tuned_figure(experiments: dict):
    """Final loss vs learning rate of the per-method sweeps."""
    names = [n for n, e in experiments.items() if e.get("tuned")]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.4 * max(1, len(names)), 3.4))
    axes = np.atleast_1d(axes)
    for ax, n in zip(axes, names):
        t = experiments[n]["tuned"]
        y = {m: np.array(t["final_loss"][m], float) for m in ("fgd", "sgd")}  # None -> nan
        finite = [v for m in y for v in y[m] if np.isfinite(v)]
        top = max(finite) if finite else 1.0
        for m, c in COLORS.items():
            y[m][~np.isfinite(y[m])] = np.nan
            ax.plot(t["lrs"], y[m], "o-", color=c, label=LABELS[m])
            bad = [lr for lr, v in zip(t["lrs"], y[m]) if np.isnan(v)]
            if bad:
                label = f"{LABELS[m]}: diverged"
                ax.plot(bad, [top] * len(bad), "x", color=c, ms=9, mew=2, label=label)
            ax.axvline(t["best_lr"][m], color=c, ls=":", lw=0.8)
        _log_ticks(ax, t["lrs"], "%g")  # the swept rates, labelled even within one decade
        ax.tick_params(axis="x", labelrotation=30)
        _y_scale(ax, finite)
        ax.set(title=n, xlabel="initial learning rate", ylabel="final training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("learning-rate sweeps (dotted: each method's tuned rate)")
    return fig


def depth_figure(depth: dict):
    """R_f, R_b, R_f/R_b and compiled memory vs MLP depth (paper Fig. 6)."""
    rows = depth["rows"]
    d = [r["depth"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(d, [r["R_f"] for r in rows], "o-", color=COLORS["fgd"], label="R_f (FGD)")
    axes[0].plot(d, [r["R_b"] for r in rows], "o-", color=COLORS["sgd"], label="R_b (backprop)")
    axes[0].set_ylabel("cost / cost of f")
    axes[0].legend(fontsize=8)
    axes[1].plot(d, [r["fg_over_bp"] for r in rows], "o-", color="k")
    axes[1].axhline(1.0, color="gray", lw=0.8, ls=":")
    axes[1].set_ylabel("R_f / R_b")
    mems = {
        f"{LABELS['fgd']} iteration": [r["variants"][0].get("memory") for r in rows],
        f"{LABELS['sgd']} iteration": [r["memory"].get("backprop") for r in rows],
        "f (forward only)": [r["memory"].get("forward") for r in rows],
    }
    for (label, ms), color in zip(mems.items(), (COLORS["fgd"], COLORS["sgd"], "gray")):
        total = [(x or {}).get("total_bytes", np.nan) for x in ms]
        axes[2].plot(d, total, "o--" if color == "gray" else "o-", color=color, label=label)
    axes[2].set(ylabel="XLA compiled memory (bytes)", yscale="log")
    axes[2].legend(fontsize=8)
    for ax in axes:
        # Layers are whole numbers: ticks at the measured depths, on a log axis (the
        # paper's depths run from 1 to 100).
        _log_ticks(ax, d, "%d")
        ax.set_xlabel("number of hidden layers")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"depth scaling: MLP width {depth['config']['width']}, batch {depth['config']['batch']}"
    )
    return fig


def plot_all(out: Path, results: dict) -> None:
    """Draws every figure of a run from its ``results.json`` dict and what it wrote."""
    experiments = results["experiments"]
    for name, entry in experiments.items():
        if name in ("beale", "rosenbrock"):
            _save(function_figure(out, name, entry), out / f"{name}_trajectories.png")
        _save(loss_figure(out, name, entry), out / f"{name}_loss.png")
    if results.get("depth"):
        _save(depth_figure(results["depth"]), out / "depth_scaling.png")
    if experiments:
        _save(tuned_figure(experiments), out / "tuned_sweeps.png")

"""Runs every experiment of Baydin et al. 2022 and writes results.json, report.md, figures.

Usage::

    python experiments/reproduce.py --preset quick --out out/quick   # 2 CPU cores, offline
    python experiments/reproduce.py --preset paper --out out/paper --data-dir ~/mnist

``quick`` uses scikit-learn's bundled 8x8 digits (real data, no download) and small step
counts; ``paper`` uses the paper's settings on MNIST (downloaded to ``$FGRAD_JAX_DATA``
unless ``--data-dir`` holds the IDX files) and is meant for a GPU/TPU. ``test`` is a tiny
preset for the test-suite.

Output in ``--out``: ``results.json`` (``{"experiments": {beale, rosenbrock, logreg, mlp,
cnn}, "depth": ..., "environment": ...}``), ``report.md``, PNG figures, and per-run JSONL
metrics under ``runs/``. Classification runs checkpoint under ``checkpoints/`` with orbax;
rerunning the same command after an interruption resumes them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _classify
import _functions
import depth as _depth
from toolkit import apply_overrides, environment, format_entry, to_jsonable, write_json
from toolkit.plots import plot_depth, plot_function, plot_loss, plot_tuned
from toolkit.report import write_report

EXPERIMENTS = ("beale", "rosenbrock", "logreg", "mlp", "cnn")


def main(argv=None) -> dict:
    """Command line; returns the results dict."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=("quick", "paper", "test"))
    p.add_argument("--out", default=None, help="output directory (default out/<preset>)")
    p.add_argument("--data-dir", help="directory of the MNIST IDX files (paper preset)")
    p.add_argument(
        "--dataset",
        help="override the classification data set "
        "(digits | mnist | fashion_mnist | a directory of IDX files)",
    )
    p.add_argument(
        "--tangent",
        default=None,
        help="FGD tangent distribution for every experiment (default: normal, "
        "the paper's; e.g. rademacher or lowrank)",
    )
    p.add_argument(
        "--only", nargs="+", choices=(*EXPERIMENTS, "depth"), help="run only these experiments"
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out or f"out/{a.preset}")
    out.mkdir(parents=True, exist_ok=True)
    progress = not a.no_progress
    selected = a.only or (*EXPERIMENTS, "depth")
    t0 = time.perf_counter()

    configs = {name: _functions.PRESETS[a.preset][name] for name in ("beale", "rosenbrock")}
    configs.update({name: _classify.PRESETS[a.preset][name] for name in ("logreg", "mlp", "cnn")})
    configs["depth"] = _depth.PRESETS[a.preset]
    # Each override reaches the configs that have the field (--tangent: all of them).
    overrides = {"data_dir": a.data_dir, "dataset": a.dataset, "tangent": a.tangent}
    configs = {k: apply_overrides(cfg, overrides) for k, cfg in configs.items()}
    full_config = {
        "preset": a.preset,
        "out": str(out),
        "experiments": list(selected),
        **{k: v for k, v in configs.items() if k in selected},
    }

    experiments = {}
    for name in EXPERIMENTS:
        if name not in selected:
            continue
        t = time.perf_counter()
        if name in ("beale", "rosenbrock"):
            entry = _functions.run(configs[name], out, progress=progress)
            plot_function(out, name, entry)
        else:
            entry = _classify.run(configs[name], out, progress=progress)
        plot_loss(out, name, entry)
        experiments[name] = entry
        print(f"[{time.perf_counter() - t:6.1f} s] {format_entry(name, entry)}", flush=True)

    results = {"experiments": experiments}
    if "depth" in selected:
        t = time.perf_counter()
        results["depth"] = _depth.run(configs["depth"], progress=progress)
        plot_depth(out, results["depth"])
        print(
            f"[{time.perf_counter() - t:6.1f} s] depth: "
            + ", ".join(f"{r['depth']}:{r['fg_over_bp']:.2f}" for r in results["depth"]["rows"]),
            flush=True,
        )
    if experiments:
        plot_tuned(out, experiments)
    wall = time.perf_counter() - t0
    results["wall_time_s"] = wall
    results["environment"] = environment(full_config)
    write_json(out / "results.json", results)
    report = write_report(out, to_jsonable(results), wall)
    print(f"wrote {out / 'results.json'} and {report} in {wall:.0f} s")
    return results


if __name__ == "__main__":
    main()

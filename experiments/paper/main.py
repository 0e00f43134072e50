"""Runs the experiments of Baydin et al. 2022 and writes results.json, report.md, figures.

    python experiments/reproduce.py --preset quick --out out/quick   # 2 CPU cores, offline
    python -m experiments.paper.main --preset paper --out out/paper --data-dir ~/mnist

Presets: ``configs/<preset>.json`` (``quick``: sklearn's 8x8 digits, offline; ``paper``: the
paper's settings on MNIST, falling back to Fashion-MNIST, with a note, when MNIST cannot be
had; ``test``: tiny). ``--only``, ``--max-iterations`` and ``--set EXP.FIELD=VALUE`` shorten a
run and every change is reported; ``--replot DIR`` redraws a finished run. Outputs and flags:
docs/reproducing.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments.paper import configs as presets
from experiments.paper import train
from experiments.paper.plots import plot_all
from experiments.paper.report import write_report
from experiments.toolkit import (
    apply_overrides,
    environment,
    format_entry,
    read_json,
    to_jsonable,
    write_json,
)

EXPERIMENTS = ("beale", "rosenbrock", "logreg", "mlp", "cnn")


def main(argv=None) -> dict:
    """Command line; returns the results dict."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=presets.presets())
    p.add_argument("--out", default=None, help="output directory (default out/<preset>)")
    p.add_argument("--data-dir", help="directory of the MNIST IDX files (paper preset)")
    p.add_argument("--dataset", help="digits, mnist, fashion_mnist or a directory of IDX files")
    p.add_argument("--tangent", help="FGD's tangent in every experiment (default: normal)")
    p.add_argument(
        "--only", nargs="+", choices=(*EXPERIMENTS, "depth"), help="run only these experiments"
    )
    p.add_argument("--max-iterations", type=int, help="cap every experiment's iterations at N")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="EXP.FIELD=VALUE",
        help="change one configuration field, e.g. cnn.seeds=2 depth.depths=1,2,4 "
        "(listed at the top of the report)",
    )
    p.add_argument(
        "--replot", metavar="DIR", help="redraw figures and report of an earlier run; no training"
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.replot:
        return replot(Path(a.replot))
    out = Path(a.out or f"out/{a.preset}")
    progress = not a.no_progress
    selected = a.only or (*EXPERIMENTS, "depth")
    t0 = time.perf_counter()

    preset = presets.load_preset(a.preset)
    # Each override reaches the configs that have the field (--tangent: all of them).
    overrides = {"data_dir": a.data_dir, "dataset": a.dataset, "tangent": a.tangent}
    configs = {k: apply_overrides(cfg, overrides) for k, cfg in preset.items()}
    configs = presets.scale(configs, a.max_iterations, a.set)
    explicit = a.dataset is not None or a.data_dir is not None
    configs, notes = presets.resolve_data(configs, selected, explicit)
    changed = presets.changed_fields(preset, configs, selected)
    notes += presets.scale_note(a.preset, changed)
    for note in notes:
        print(f"NOTE: {note}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    full_config = {"preset": a.preset, "out": str(out), "experiments": list(selected)}
    full_config |= {k: v for k, v in configs.items() if k in selected}

    experiments = {}
    for name in [n for n in EXPERIMENTS if n in selected]:
        t = time.perf_counter()
        run = train.run_function if name in ("beale", "rosenbrock") else train.run
        experiments[name] = entry = run(configs[name], out, progress=progress)
        print(f"[{time.perf_counter() - t:6.1f} s] {format_entry(name, entry)}", flush=True)

    results = {"experiments": experiments, "notes": notes, "changed_from_preset": changed}
    if "depth" in selected:
        t = time.perf_counter()
        results["depth"] = train.run_depth(configs["depth"], progress=progress)
        ratios = ", ".join(f"{r['depth']}:{r['fg_over_bp']:.2f}" for r in results["depth"]["rows"])
        print(f"[{time.perf_counter() - t:6.1f} s] depth: {ratios}", flush=True)
    wall = time.perf_counter() - t0
    results["wall_time_s"] = wall
    results["environment"] = environment(full_config)
    write_json(out / "results.json", results)
    plot_all(out, to_jsonable(results))
    report = write_report(out, to_jsonable(results), wall)
    print(f"wrote {out / 'results.json'} and {report} in {wall:.0f} s")
    return results


def replot(out: Path) -> dict:
    """Redraws every figure and ``report.md`` of a finished run from what it wrote."""
    results = read_json(out / "results.json")
    plot_all(out, results)
    report = write_report(out, results, results.get("wall_time_s"))
    print(f"redrew the figures and {report}")
    return results


if __name__ == "__main__":
    main()

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
import dataclasses
import math
import sys
import time
from pathlib import Path

from experiments.paper import train
from experiments.paper.plots import plot_depth, plot_function, plot_loss, plot_tuned
from experiments.paper.report import write_report
from experiments.toolkit import (
    add_overrides,
    apply_overrides,
    environment,
    format_entry,
    read_json,
    to_jsonable,
    write_json,
)
from fgrad_jax import datasets

EXPERIMENTS = ("beale", "rosenbrock", "logreg", "mlp", "cnn")
CLASSIFY = ("logreg", "mlp", "cnn")


class NoDataError(SystemExit):
    """No classification data could be found; raised before any training."""


def resolve_data(configs: dict, selected, explicit: bool) -> tuple[dict, list[str]]:
    """Checks that the classification data loads, before any work; returns
    ``(configs, notes)``.

    With the preset's MNIST and no explicit ``--dataset``/``--data-dir``, MNIST that cannot
    be found or downloaded is replaced by Fashion-MNIST (Debian's files), and a note says so.

    Raises:
        NoDataError: If no data set can be loaded; the message names the fixes.
    """
    names = [n for n in CLASSIFY if n in selected]
    if not names:
        return configs, []
    cfg = configs[names[0]]
    try:
        train.load_data(cfg)
        return configs, []
    except datasets.DataUnavailableError as e:
        first_error = e
    if cfg.dataset != "mnist" or explicit:
        raise NoDataError(
            f"reproduce.py: the data set {cfg.dataset!r} could not be loaded, so nothing was "
            f"run.\n{first_error}"
        )
    try:
        datasets.load_fashion_mnist()
    except datasets.DataUnavailableError as e:
        raise NoDataError(
            "reproduce.py: no classification data found, so nothing was run. MNIST could not "
            f"be loaded or downloaded:\n{first_error}\n\nThe offline fallback, Fashion-MNIST, "
            f"is missing too:\n{e}\n\nFix: give MNIST with --data-dir DIR (the four IDX "
            "files), run once with internet access, or install the fallback with "
            "`apt-get install dataset-fashion-mnist`."
        ) from None
    reason = " ".join(line.strip() for line in str(first_error).splitlines()[:2])
    note = (
        "MNIST could not be loaded or downloaded, so the classification experiments ran on "
        f"**Fashion-MNIST** ({datasets.DEFAULT_FASHION_MNIST_DIR}), not on the paper's MNIST "
        f"(reason: {reason}). Losses and accuracies are not comparable with MNIST's; cost "
        "ratios (same image size) are. Pass --data-dir with the MNIST files to run on MNIST."
    )
    configs = dict(configs)
    for n in CLASSIFY:
        configs[n] = dataclasses.replace(configs[n], dataset="fashion_mnist", data_dir=None)
    return configs, [note]


def _parse_value(cls: type, field: str, text: str):
    """``text`` as the value of ``cls.field``, parsed as the field's command-line option."""
    parser = argparse.ArgumentParser(prog="--set", exit_on_error=False)
    try:
        add_overrides(parser, cls, [field])
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    value = getattr(parser.parse_args([f"--{field.replace('_', '-')}", *text.split(",")]), field)
    return tuple(value) if isinstance(value, list) else value


def scale(configs: dict, max_iterations: int | None, sets: list[str]) -> dict:
    """Applies ``--max-iterations`` and ``--set name.field=value`` to the configs."""
    steps_before = {n: getattr(c, "steps", None) for n, c in configs.items()}
    configs = dict(configs)
    for item in sets:
        key, sep, text = item.partition("=")
        name, dot, field = key.partition(".")
        if not (sep and dot) or name not in configs:
            raise SystemExit(
                f"--set {item!r}: expected EXPERIMENT.FIELD=VALUE with EXPERIMENT one of "
                f"{sorted(configs)} (e.g. cnn.seeds=2 or depth.depths=1,2,4)."
            )
        value = _parse_value(type(configs[name]), field, text)
        configs[name] = dataclasses.replace(configs[name], **{field: value})
    if max_iterations is not None:
        if max_iterations < 1:
            raise SystemExit(f"--max-iterations must be >= 1, got {max_iterations}.")
        for name, cfg in configs.items():
            if hasattr(cfg, "steps") and cfg.steps > max_iterations:
                configs[name] = dataclasses.replace(cfg, steps=max_iterations)
    for name, cfg in configs.items():
        if getattr(cfg, "steps", None) != steps_before[name]:
            # A chunk must divide the steps; a sweep is no longer than the run.
            changes = {"chunk": math.gcd(cfg.chunk, cfg.steps)}
            if hasattr(cfg, "tune_steps"):
                changes["tune_steps"] = min(cfg.tune_steps or cfg.steps, cfg.steps)
            configs[name] = dataclasses.replace(cfg, **changes)
    return configs


def changed_fields(before: dict, after: dict, selected) -> dict[str, dict[str, list]]:
    """``{experiment: {field: [preset value, value used]}}`` for every changed field."""
    out = {}
    for name in selected:
        a, b = to_jsonable(before[name]), to_jsonable(after[name])
        diff = {k: [a[k], b[k]] for k in a if a[k] != b[k] and k not in ("chunk",)}
        if diff:
            out[name] = diff
    return out


def scale_note(preset: str, changed: dict) -> list[str]:
    """One note per shortened experiment, naming what differs from the preset."""
    notes = []
    for name, diff in changed.items():
        fields = {k: v for k, v in diff.items() if k not in ("dataset", "data_dir")}
        if fields:
            what = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in fields.items())
            notes.append(f"`{name}` differs from the {preset} preset: {what}.")
    return notes


def main(argv=None) -> dict:
    """Command line; returns the results dict."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=train.presets())
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
    p.add_argument(
        "--max-iterations",
        type=int,
        help="cap every experiment's iterations (and its sweep's) at N; the report says "
        "which experiments were shortened",
    )
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

    preset = train.load_preset(a.preset)
    # Each override reaches the configs that have the field (--tangent: all of them).
    overrides = {"data_dir": a.data_dir, "dataset": a.dataset, "tangent": a.tangent}
    configs = {k: apply_overrides(cfg, overrides) for k, cfg in preset.items()}
    configs = scale(configs, a.max_iterations, a.set)
    explicit = a.dataset is not None or a.data_dir is not None
    configs, notes = resolve_data(configs, selected, explicit)
    changed = changed_fields(preset, configs, selected)
    notes += scale_note(a.preset, changed)
    for note in notes:
        print(f"NOTE: {note}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
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
            entry = train.run_function(configs[name], out, progress=progress)
            plot_function(out, name, entry)
        else:
            entry = train.run(configs[name], out, progress=progress)
        plot_loss(out, name, entry)
        experiments[name] = entry
        print(f"[{time.perf_counter() - t:6.1f} s] {format_entry(name, entry)}", flush=True)

    results = {"experiments": experiments, "notes": notes, "changed_from_preset": changed}
    if "depth" in selected:
        t = time.perf_counter()
        results["depth"] = train.run_depth(configs["depth"], progress=progress)
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


def replot(out: Path) -> dict:
    """Redraws every figure and ``report.md`` of a finished run from what it wrote."""
    results = read_json(out / "results.json")
    for name, entry in results["experiments"].items():
        if name in ("beale", "rosenbrock"):
            plot_function(out, name, entry)
        plot_loss(out, name, entry)
    if results.get("depth"):
        plot_depth(out, results["depth"])
    if results["experiments"]:
        plot_tuned(out, results["experiments"])
    report = write_report(out, results, results.get("wall_time_s"))
    print(f"redrew the figures and {report}")
    return results


if __name__ == "__main__":
    main()

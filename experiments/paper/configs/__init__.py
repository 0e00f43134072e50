"""The presets: ``<preset>.json`` holds, per experiment, the fields of its config class
(:mod:`experiments.paper.train`) that differ from the defaults. Here they are read, checked
against the data at hand and changed by ``--max-iterations`` and ``--set``, and every change
is named so that the report can list it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from experiments.paper import train
from experiments.paper.train import ClassifyConfig, DepthConfig, FunctionConfig
from experiments.toolkit import add_overrides, from_dict, to_jsonable
from fgrad_jax import datasets

CONFIGS = Path(__file__).parent
CLASSIFY = ("logreg", "mlp", "cnn")


def load_preset(preset: str) -> dict:
    """``{experiment: config}`` of ``configs/<preset>.json``."""
    data = json.loads((CONFIGS / f"{preset}.json").read_text())
    classes = {"beale": FunctionConfig, "rosenbrock": FunctionConfig, "depth": DepthConfig}
    return {name: from_dict(classes.get(name, ClassifyConfig), v) for name, v in data.items()}


def presets() -> list[str]:
    """The presets' names (the files in ``configs/``)."""
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


class NoDataError(SystemExit):
    """No classification data could be found; raised before any training."""


def resolve_data(configs: dict, selected, explicit: bool) -> tuple[dict, list[str]]:
    """Checks that the classification data loads, before any work; returns ``(configs,
    notes)``. With the preset's MNIST and no explicit ``--dataset``/``--data-dir``, MNIST that
    cannot be found or downloaded is replaced by Fashion-MNIST (Debian's files), and a note
    says so; raises :class:`NoDataError`, naming the fixes, if no data set can be loaded."""
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

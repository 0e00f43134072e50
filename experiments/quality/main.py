"""Quality benchmark (issue 10): test accuracy on Fashion-MNIST of every gradient estimator of
fgrad_jax against backprop, same epochs, Adam with a per-method learning rate from a sweep.

    python -m experiments.quality.main --preset quick --out-dir runs/quality_quick
    python -m experiments.quality.main --preset full --out-dir runs/quality_full --max-minutes 50

Writes ``DIR/quality.json``, ``DIR/quality.md``, ``DIR/runs/<model>_<method>.jsonl`` and the
figures (made from the JSON/JSONL only). See ``docs/quality.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import fgrad_jax
from experiments.quality.configs import PRESETS, QualityConfig, load_preset
from experiments.quality.methods import parse_method
from experiments.quality.train import make_split, run_method
from experiments.toolkit import add_overrides, apply_overrides, environment, write_json


def run(cfg: QualityConfig) -> dict:
    """Runs the benchmark of ``cfg`` and writes its outputs; returns ``quality.json``'s dict."""
    for name in (*cfg.methods, *(cfg.cnn_methods or ()), *cfg.resnet_methods, *cfg.vit_methods):
        parse_method(name)  # unknown names fail before any work
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = fgrad_jax.datasets.load_fashion_mnist(cfg.data_dir, channel_axis=True)
    t0 = time.perf_counter()
    results: dict = {"methods": {}, "skipped": [], "config": dataclasses.asdict(cfg),
                     "environment": environment(), "dataset": ds.name}  # fmt: skip
    splits, todo = {}, []
    for model in cfg.models:
        names = cfg.methods if model == "mlp" or cfg.cnn_methods is None else cfg.cnn_methods
        size = cfg.cnn_train_size if model == "cnn" and cfg.cnn_train_size else cfg.train_size
        if model == "resnet":
            names, size = cfg.resnet_methods, cfg.resnet_train_size or cfg.train_size
        if model == "vit":
            size = cfg.vit_train_size or cfg.resnet_train_size or cfg.train_size
            names = cfg.vit_methods
        splits[model] = make_split(ds, model, size, cfg.val_size, cfg.test_size,
                                   cfg.diag_batches, cfg.batch_size)  # fmt: skip
        todo += [(names.index(n), model, n) for n in names]
        for what, n in (("val_size", splits[model].x_val.shape[0]),
                        ("test size", splits[model].x_test.shape[0])):  # fmt: skip
            if n % cfg.eval_batch:
                raise ValueError(f"eval_batch={cfg.eval_batch} must divide the {what} ({n}) "
                                 "so that every image is scored; pass --eval-batch with a "
                                 "divisor of both.")  # fmt: skip
    # Method by method, both models together, in the configured order: a time budget then
    # cuts the last methods on every model rather than a whole model.
    for _, model, name in sorted(todo, key=lambda t: (t[0], cfg.models.index(t[1]))):
        elapsed = (time.perf_counter() - t0) / 60
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes:
            results["skipped"].append(f"{model}/{name}")
            print(f"[quality] budget of {cfg.max_minutes} min spent: skip {model}/{name}")
            continue
        t = time.perf_counter()
        entry = run_method(name, model, splits[model], cfg, out)
        entry["train_size"] = int(splits[model].x_train.shape[0])
        entry["wall_s_incl_sweep_compile_eval"] = time.perf_counter() - t
        results["methods"].setdefault(name, {})[model] = entry
        print(f"[quality] {model:3s} {name:18s} acc {entry['test_acc']:.4f} "
              f"± {entry['test_acc_std']:.4f}  lr {entry['lr']:g}  "
              f"{entry['seconds']:.1f} s  (total {time.perf_counter() - t0:.0f} s)",
              flush=True)  # fmt: skip
        write_json(out / "quality.json", results)
    results["total_seconds"] = time.perf_counter() - t0
    write_json(out / "quality.json", results)
    try:
        from experiments.quality.report import write_report
    except ImportError as err:  # e.g. an accelerator image without matplotlib
        print(f"[quality] no report ({err}); write it elsewhere with --report {out}")
    else:
        write_report(out)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument(
        "--report", metavar="DIR", help="only write quality.md and the figures of a finished run"
    )
    parser.add_argument(
        "--against",
        metavar="DIR",
        help="with --report: compare the ranking with another finished run's (Kendall's tau)",
    )
    add_overrides(parser, QualityConfig, [f.name for f in dataclasses.fields(QualityConfig)
                                          if f.name != "preset"])  # fmt: skip
    args = parser.parse_args(argv)
    if args.report:
        from experiments.quality.report import write_report

        print(f"[quality] wrote {write_report(args.report, args.against)}")
        return
    cfg = apply_overrides(load_preset(args.preset), args)
    run(cfg)
    print(f"[quality] wrote {cfg.out_dir}/quality.json, quality.md and figures")


if __name__ == "__main__":
    sys.exit(main())

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
import json
import sys
import time
from pathlib import Path

import fgrad_jax
from experiments.quality.train import make_split, run_method
from experiments.toolkit import add_overrides, apply_overrides, environment, from_dict, write_json

# The methods the targets of issue 10 name come first (a --max-minutes budget cuts the last).
ALL_METHODS = (
    "backprop", "fg_normal_k4", "local_a_splitall_k64", "local_a_splitall_k32",
    "local_a_split_k32", "local_a_split_k64", "fg_act_k16",
    "local_a_split_k16", "local_a_k1", "fg_act_k1", "local_w_k1", "spsa_k1", "guided_k1",
    "fg_rademacher_k4", "fg_lowrank_k4", "fg_normal_k1", "fg_rademacher_k1", "fg_lowrank_k1",
    "fg_normal_k16", "fg_rademacher_k16", "fg_lowrank_k16", "local_a_k16", "fg_act_k32",
)  # fmt: skip


@dataclasses.dataclass
class QualityConfig:
    """Configuration of the quality benchmark.

    Attributes:
        preset: Name of the preset the other fields came from.
        out_dir: Output directory.
        data_dir: Directory of the four Fashion-MNIST IDX files (default: the Debian package's).
        models: Models to train: ``mlp`` (784-256-256-10), ``cnn`` (Flax MNIST example) and/or
            ``resnet`` (ResNet-18 with BatchNorm, 16 filters, trained as an unchanged class;
            ``quality/resnet.py``) and ``vit`` (a small ViT, LayerNorm and attention, trained
            unchanged; ``quality/vit.py``).
        methods: Method names trained on the MLP (see experiments/quality/methods.py).
        cnn_methods: Method names trained on the CNN (``None``: the same as ``methods``).
        resnet_methods: Method names trained on the ResNet (backprop, ``fg_<tangent>_k<K>``,
            ``local_a_k<K>``, ``local_w_k<K>``).
        epochs: Training epochs of every method.
        sweep_epochs: Epochs of the learning-rate sweep (seed ``seeds[0]``, held-out split).
        batch_size: Minibatch size.
        train_size: Training images of the MLP (``None``: all but the held-out split).
        cnn_train_size: Training images of the CNN (``None``: as ``train_size``).
        resnet_train_size: Training images of the ResNet (``None``: as ``train_size``).
        vit_methods: Method names trained on the ViT (as for the ResNet).
        vit_train_size: Training images of the ViT (``None``: as ``resnet_train_size``).
        val_size: Held-out training images for the sweep (and the cosine batches).
        test_size: Test images (``None``: all 10,000).
        seeds: Seeds of the final runs (vmapped together).
        diag_per_epoch: Cosine-to-true-gradient measurements per epoch (also the number of
            compiled calls per epoch).
        cnn_diag_per_epoch: As ``diag_per_epoch`` for the CNN (``None``: the same).
        diag_batches: Fixed held-out batches the cosine is averaged over.
        eval_batch: Batch size of the accuracy evaluation (must divide the split sizes).
        cnn_scan: Run the CNN's steps in a compiled lax.scan (``False``: a Python loop over a
            compiled step, much faster for convolutions on XLA:CPU; ``None``: a loop on CPU,
            a scan elsewhere).
        max_minutes: Stop starting new (model, method) runs after this many minutes; the
            skipped ones are listed in quality.json and the report.
        lrs: Learning rates of every method's sweep (``None``: the per-family grids,
            ``quality.train.LR_GRIDS``).
        tangents_at_once: Pass ``tangent_chunk=K`` (all K tangents in one pass) instead of
            the library's automatic chunks, which bound memory at the cost of a loop.
    """

    preset: str = "quick"
    out_dir: str = "runs/quality_quick"
    data_dir: str | None = None
    models: tuple[str, ...] = ("mlp", "cnn")
    methods: tuple[str, ...] = ALL_METHODS
    cnn_methods: tuple[str, ...] | None = None
    resnet_methods: tuple[str, ...] = ("backprop", "fg_normal_k4", "local_a_k16", "local_a_k32")
    epochs: int = 10
    sweep_epochs: int = 1
    batch_size: int = 128
    train_size: int | None = None
    cnn_train_size: int | None = None
    resnet_train_size: int | None = None
    vit_methods: tuple[str, ...] = ("backprop", "fg_normal_k4", "local_a_k16")
    vit_train_size: int | None = None
    val_size: int = 5000
    test_size: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    diag_per_epoch: int = 4
    cnn_diag_per_epoch: int | None = None
    diag_batches: int = 2
    eval_batch: int = 1000
    cnn_scan: bool | None = True
    max_minutes: float | None = None
    lrs: tuple[float, ...] | None = None
    tangents_at_once: bool = False


CONFIGS = Path(__file__).parent / "configs"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.json"))


def load_preset(preset: str) -> QualityConfig:
    """``configs/<preset>.json``: the fields that differ from :class:`QualityConfig`'s."""
    data = json.loads((CONFIGS / f"{preset}.json").read_text())
    return from_dict(QualityConfig, {"preset": preset, **data})


def run(cfg: QualityConfig) -> dict:
    """Runs the benchmark of ``cfg`` and writes its outputs; returns ``quality.json``'s dict."""
    for name in (*cfg.methods, *(cfg.cnn_methods or ()), *cfg.resnet_methods, *cfg.vit_methods):
        from experiments.quality.methods import parse_method

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

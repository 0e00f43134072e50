"""Fine-tuning benchmark entry point.

``python -m experiments.finetune.main --preset quick|full|test --out DIR`` from the
repository root (the module form: run as a file, ``experiments/finetune/main.py`` would
need the repository root on ``sys.path``, e.g. ``PYTHONPATH=.``) writes ``DIR/finetune.json`` (``{"methods": {NAME: {SETTING: {"test_acc",
"peak_bytes", "inference_bytes", "forward_passes", "seconds", ...}}}}``), ``DIR/report.md``
and figures. Pretrained checkpoints go to ``--ckpt-dir`` (default ``DIR/checkpoints``) and
are reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import jax

from experiments.finetune import report, train
from experiments.finetune.configs import PRESETS


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    """Runs a preset and writes its results; returns the results dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", default="out/finetune")
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    os.makedirs(args.out, exist_ok=True)
    ckpt_dir = args.ckpt_dir or os.path.join(args.out, "checkpoints")
    wanted = set(args.methods.split(",")) if args.methods else None
    t0, c0 = time.perf_counter(), time.process_time()
    data = train.digits_28(preset)
    results: dict = {
        "preset": preset.name,
        "env": {"jax": jax.__version__, "device": str(jax.devices()[0]), "commit": _commit()},
        "pretrain": {},
        "methods": {},
    }
    for cfg in preset.models:
        params, info = train.pretrain(cfg, preset, ckpt_dir)
        results["pretrain"][cfg.name] = info
        for method in preset.methods:
            if wanted and method.name not in wanted:
                continue
            recs = train.finetune(cfg, params, method, preset, data)
            if not recs:  # a method for another model (local losses: the ViT only)
                continue
            results["methods"].setdefault(method.name, {}).update(recs)
            results["wall_seconds"] = time.perf_counter() - t0
            with open(os.path.join(args.out, "finetune.json"), "w") as f:
                json.dump(results, f, indent=1)
    results["wall_seconds"] = time.perf_counter() - t0
    # Wall time depends on what else shares the cores; CPU time of this process does not.
    results["cpu_seconds"] = time.process_time() - c0
    with open(os.path.join(args.out, "finetune.json"), "w") as f:
        json.dump(results, f, indent=1)
    report.write_report(results, args.out)
    print(f"wrote {args.out}/finetune.json and report.md in {results['wall_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()

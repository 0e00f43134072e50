"""Per-step overhead of the forward-gradient SGD step on small models, against backprop.

Times, in one process (interleaved rounds, medians, paired ratios), a forward pass, the
backprop step and the forward-gradient steps (rademacher, normal, lowrank), each dispatched
from Python one call at a time (with and without donation), ``pipeline_steps`` calls back to
back blocked once, and ``loop_steps`` steps in one compiled ``fori_loop``, for the tiny MLP
784-8-8-10 (batch 8: overhead only) and the paper's MLP (batch 64). The cases are
``gpu_check.py``'s MLP section (docs/performance.md, "Per-step overhead on small models")::

    python -m experiments.benchmarks.overhead --out experiments/results/overhead_cpu.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

from experiments.benchmarks.gpu_sections import mlp_case
from experiments.toolkit import add_overrides, apply_overrides, environment, write_json
from experiments.toolkit.analysis import md_table

LABELS = ("forward", "backprop", "rademacher", "normal", "lowrank")


@dataclass
class Config:
    """The benchmark (``cases``: ``(sizes, batch, loop_steps)`` per model).

    Attributes:
        rounds: Timed rounds (interleaved).
        warmup: Untimed rounds before them.
        max_seconds: Stop taking rounds after this long (each case gets at least one).
    """

    cases: tuple = (((784, 8, 8, 10), 8, 100), ((784, 1024, 1024, 10), 64, 10))
    pipeline_steps: int = 10
    rounds: int = 30
    warmup: int = 3
    max_seconds: float = 600.0


def run(cfg: Config) -> dict:
    out = {"config": asdict(cfg), "environment": environment(), "cases": []}
    deadline = time.time() + cfg.max_seconds
    for sizes, batch_size, loop_steps in cfg.cases:
        modes = ("dispatched", "pipelined", "loop")
        timing = (cfg.rounds, cfg.warmup, deadline, cfg.pipeline_steps)
        case = mlp_case(list(sizes), batch_size, modes, loop_steps, *timing)
        out["cases"].append({"sizes": list(sizes), "loop_steps": loop_steps, **case})
    return out


def table(result: dict) -> str:
    """Markdown: ms per step and, in brackets, the paired ratio to the backprop step."""
    rows = []
    for case in result["cases"]:
        for row in case["rows"]:
            cells = []
            for label in LABELS:
                ms = f"{row[label]['ms']:.4g} ms"
                ratio = row[label].get("over_backprop")
                cells.append(ms if ratio is None or label == "backprop" else f"{ms} ({ratio:.2f})")
            n = row["steps_per_call"]
            mode = {
                "dispatched": "dispatched, blocked per call",
                "pipelined": f"{n} dispatched, blocked once",
            }.get(row["mode"], f"loop of {n}")
            sizes = "-".join(map(str, case["sizes"]))
            rows.append([sizes, row["batch_size"], mode, "yes" if row["donated"] else "no", *cells])
    return "\n".join(md_table(" | ".join(("MLP", "B", "mode", "donated", *LABELS)), rows))


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="out/overhead.json")
    add_overrides(ap, Config, ("rounds", "warmup", "max_seconds", "pipeline_steps"))
    args = ap.parse_args(argv)
    result = run(apply_overrides(Config(), args))
    result["table"] = table(result)
    write_json(args.out, result)
    print(result["table"])


if __name__ == "__main__":
    main()

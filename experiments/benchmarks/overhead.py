"""Per-step overhead of the forward-gradient SGD step on small models, against backprop.

Times, in one process (interleaved rounds, medians, paired ratios), a forward pass, the
backprop step and the forward-gradient steps (rademacher, normal, lowrank), each dispatched
from Python one call at a time (with and without donation), ``pipeline_steps`` calls back to
back blocked once, and ``loop_steps`` steps in one compiled ``fori_loop``, for the tiny MLP
784-8-8-10 (batch 8: overhead only) and the paper's MLP (batch 64). The cases are
``gpu_check.py``'s MLP section (docs/performance.md, "Per-step overhead on small models")::

    python -m experiments.benchmarks.overhead --out experiments/results/overhead_cpu.json

``--floor true`` times instead, pipelined and donated on the tiny MLP, the library's steps
against two hand-written ones without the library: ``hand:T`` (the library's hashed draw
of ``T`` from the step's key, plain ``jax.jvp``, SGD) and ``jvp given`` (the tangents as
arguments, the pure JVP).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import jax
import jax.numpy as jnp

from experiments.benchmarks.gpu_sections import (
    LR,
    first_tangent,
    make_step,
    mlp_case,
    timed_rounds,
    timing_row,
)
from experiments.toolkit import (
    Runner,
    add_overrides,
    apply_overrides,
    environment,
    mlp_loss,
    mlp_problem,
    write_json,
)
from experiments.toolkit.analysis import md_table
from fgrad_jax._hashed import HASHED
from fgrad_jax._state import step_key

LABELS = ("forward", "backprop", "rademacher", "normal", "lowrank")


@dataclass
class Config:
    """The benchmark (``cases``: ``(sizes, batch, loop_steps)`` per model).

    Attributes:
        rounds: Timed rounds (interleaved).
        warmup: Untimed rounds before them.
        max_seconds: Stop taking rounds after this long (each case gets at least one).
        floor: Time the tiny MLP's pipelined floors instead (see above).
    """

    cases: tuple = (((784, 8, 8, 10), 8, 100), ((784, 1024, 1024, 10), 64, 10))
    pipeline_steps: int = 10
    rounds: int = 30
    warmup: int = 3
    max_seconds: float = 600.0
    floor: bool = False


def run(cfg: Config) -> dict:
    cases, modes = [], ("dispatched", "pipelined", "loop")
    timing = (cfg.rounds, cfg.warmup, time.time() + cfg.max_seconds, cfg.pipeline_steps)
    for sizes, batch_size, loop_steps in cfg.cases:
        case = mlp_case(list(sizes), batch_size, modes, loop_steps, *timing)
        cases.append({"sizes": list(sizes), "loop_steps": loop_steps, **case})
    return {"cases": cases}


def run_floor(cfg: Config) -> dict:
    """Pipelined, donated steps of the tiny MLP: the library's, by hand, with given tangents."""
    sizes, batch_size, _ = cfg.cases[0]
    params, batch = mlp_problem(list(sizes), batch_size)
    key = jax.random.key(0)

    def by_hand(draw):
        def step(p, s, b):
            t, s = draw(p, s)
            value, d = jax.jvp(lambda q: mlp_loss(q, b), (p,), (t,))
            return jax.tree.map(lambda a, v: a - LR * d * v, p, t), s, value

        return step

    def hashed(name):
        return lambda p, c: (first_tangent(HASHED[name], step_key(key, c), p), c + 1)

    count = SimpleNamespace(init=lambda p: jnp.zeros((), jnp.int32))
    steps = {"backprop": make_step(mlp_loss, "backprop")}
    for name in ("rademacher", "normal"):
        steps[name] = make_step(mlp_loss, name)
        steps[f"hand:{name}"] = (count, by_hand(hashed(name)))
    given = SimpleNamespace(init=lambda p: jax.tree.map(jnp.ones_like, p))
    steps["jvp given"] = (given, by_hand(lambda p, t: (t, t)))
    fns = {
        n: Runner(tx, jax.jit(step, donate_argnums=(0, 1)), params, batch, cfg.pipeline_steps)
        for n, (tx, step) in steps.items()
    }
    times, reps = timed_rounds(fns, cfg.rounds, cfg.warmup, time.time() + cfg.max_seconds)
    row = timing_row(times, {n: n for n in fns}, "backprop", cfg.pipeline_steps)
    return {"sizes": list(sizes), "floor": row, **reps}


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
    add_overrides(ap, Config, ("rounds", "warmup", "max_seconds", "pipeline_steps", "floor"))
    args = ap.parse_args(argv)
    cfg = apply_overrides(Config(), args)
    result = {"config": asdict(cfg), "environment": environment()}
    result |= run_floor(cfg) if cfg.floor else run(cfg)
    if not cfg.floor:
        result["table"] = table(result)
    write_json(args.out, result)
    print(result.get("table", result.get("floor")))


if __name__ == "__main__":
    main()

"""Compile time of the forward-gradient step against ``jax.grad``'s, every tangent family.

For the 6-block nnx transformer of ``benchmarks/transformer.py`` and the depth-32 MLP of
the memory results, each program is lowered and compiled ``rounds`` times in a random
order per round, with :func:`jax.clear_caches` before every compile (JAX otherwise returns
the cached executable); the report gives median seconds, the paired ratio to ``jax.grad``
of the same round, the same for the compiling process's CPU time (all its threads: less
sensitive than wall time to other jobs on a shared machine) and the optimised program's
instruction count (lowering is not timed)::

    python -m experiments.benchmarks.compile_time --out experiments/results/compile_time_cpu.json

``--floors sphere orthogonal user lowrank`` adds the floors of those families (tangents
drawn by the library's sampler, ``user`` by the benchmark's callable): ``jvp given`` (plain
``jax.jvp`` and ``d·v`` with the tangents as arguments), ``draw:F`` (the draw alone) and
``hand:F`` (the draw and ``jax.jvp`` written by hand in one program, without the library).
"""

from __future__ import annotations

import argparse
import random
import re
import time
from dataclasses import asdict, dataclass
from functools import partial
from statistics import median

import jax
import jax.numpy as jnp

import fgrad_jax
from experiments.benchmarks.gpu_sections import first_tangent
from experiments.benchmarks.train import THREEFRY_NORMAL
from experiments.benchmarks.transformer import Config as TransformerConfig
from experiments.benchmarks.transformer import transformer_loss
from experiments.toolkit import (
    add_overrides,
    apply_overrides,
    environment,
    init_mlp,
    mlp_loss,
    synthetic_batch,
    write_json,
)
from experiments.toolkit.analysis import md_table
from experiments.toolkit.timing import paired_ratio
from fgrad_jax._tangents import TANGENTS


@dataclass
class Config(TransformerConfig):
    """The transformer benchmark's shape (``depth``, ``width``, ``heads``, ``seq_len``,
    ``batch``), the programs (``models``, ``tangents``, ``floors``: tangent families, or
    ``user``, whose floors are compiled too, see above) and the number of timed ``rounds``."""

    models: tuple[str, ...] = ("transformer", "mlp32")
    tangents: tuple[str, ...] = ("rademacher", "normal", "lowrank", "sphere", "orthogonal")
    floors: tuple[str, ...] = ()
    rounds: int = 3


def _loss_and_params(name: str, cfg: Config):
    if name == "transformer":
        return transformer_loss(cfg)
    batch = synthetic_batch(jax.random.key(1), 64, (784,))
    return (lambda p: mlp_loss(p, batch)), init_mlp(jax.random.key(0), [784] + [1024] * 32 + [10])


def _floors(loss, params, families) -> dict:
    """The floor programs of ``families`` (see the module docstring)."""

    def jvp_step(p, t):
        value, d = jax.jvp(loss, (p,), (t,))
        return value, jax.tree.map(lambda v: d * v, t)

    key = jax.random.key(0)
    programs = {"jvp given": (jvp_step, (params, jax.tree.map(jnp.ones_like, params)))}
    for f in families:
        draw = THREEFRY_NORMAL if f == "user" else partial(first_tangent, TANGENTS[f])
        programs[f"draw:{f}"] = (draw, (key, params))
        programs[f"hand:{f}"] = ((lambda d: lambda k, p: jvp_step(p, d(k, p)))(draw), (key, params))
    return programs


def instructions(compiled) -> int:
    return len(re.findall(r"^\s*(?:ROOT )?%?[\w.\-]+ = ", compiled.as_text(), re.M))


def run_model(name: str, cfg: Config) -> dict:
    loss, params = _loss_and_params(name, cfg)
    key = jax.random.key(0)
    programs = {"jax.grad": (jax.grad(loss), (params,))}
    user = {"user": THREEFRY_NORMAL}  # a callable drawing jax.random.normal per leaf
    for tangent in (*cfg.tangents, "user"):
        # "rademacher:always" etc.: fgrad_jax.hashed("rademacher", store="always").
        chosen = fgrad_jax.hashed(*tangent.split(":")) if ":" in tangent else tangent
        estimate = fgrad_jax.forward_grad(loss, tangent=user.get(tangent, chosen))
        programs[tangent] = (estimate, (key, params))
    if cfg.floors:
        programs |= _floors(loss, params, cfg.floors)
    seconds: dict[str, list[float]] = {n: [] for n in programs}
    cpu: dict[str, list[float]] = {n: [] for n in programs}
    sizes = {}
    for r in range(cfg.rounds):
        order = list(programs)
        random.Random(r).shuffle(order)
        for n in order:
            # A Lowered keeps its executable, and JAX caches compiles: a fresh lowering
            # with the caches cleared makes every round compile.
            jax.clear_caches()
            fn, args = programs[n]
            lowered = jax.jit(fn).lower(*args)
            t0, c0 = time.perf_counter(), time.process_time()
            compiled = lowered.compile()
            seconds[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
            sizes[n] = instructions(compiled)
    rows, g = {}, "jax.grad"
    for n, ts in seconds.items():
        rows[n] = {"seconds": median(ts), "over_grad": paired_ratio(ts, seconds[g])}
        rows[n] |= {"cpu_seconds": median(cpu[n]), "cpu_over_grad": paired_ratio(cpu[n], cpu[g])}
        rows[n]["instructions"] = sizes[n]
    return {"model": name, "rounds": cfg.rounds, "rows": rows}


def table(result: dict) -> str:
    """Markdown: one row per model and program."""
    rows = []
    for m in result["models"]:
        for n, row in m["rows"].items():
            cpu = [f"{row[k]:.2f}" if k in row else "-" for k in ("cpu_seconds", "cpu_over_grad")]
            times = [f"{row['seconds']:.2f}", f"{row['over_grad']:.2f}"]
            rows.append([m["model"], n, *times, *cpu, f"{row['instructions']:,}"])
    header = "model | program | compile s | / jax.grad | CPU s | CPU / jax.grad | HLO instructions"
    return "\n".join(md_table(header, rows))


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="out/compile_time.json")
    add_overrides(ap, Config, ("models", "tangents", "floors", "rounds"))
    cfg = apply_overrides(Config(), ap.parse_args(argv))
    result = {"config": asdict(cfg), "environment": environment()}
    result["models"] = [run_model(m, cfg) for m in cfg.models]
    result["table"] = table(result)
    write_json(ap.parse_args(argv).out, result)
    print(result["table"])


if __name__ == "__main__":
    main()

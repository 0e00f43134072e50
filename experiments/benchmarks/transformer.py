"""Forward gradient vs backprop on an unmodified Flax nnx transformer (beyond the paper's MLP).

Measures, in one process, interleaved rounds, medians: a forward pass, ``jax.grad`` and
``fgrad_jax.forward_grad`` for several tangents (gradient only, no optimizer), plus the
compile time of each, and writes JSON::

    python -m experiments.benchmarks.transformer --out experiments/results/transformer.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from statistics import median
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import fgrad_jax
from experiments.toolkit import (
    Transformer,
    add_overrides,
    apply_overrides,
    time_interleaved,
    write_json,
)


@dataclass
class Config:
    """The benchmark: the transformer's shape (``depth``, ``width``, ``heads``), the input
    (``seq_len``, ``batch``), timed ``rounds`` and the forward-gradient ``tangents``."""

    depth: int = 6
    width: int = 128
    heads: int = 4
    seq_len: int = 32
    batch: int = 16
    rounds: int = 15
    tangents: tuple[str, ...] = ("rademacher", "normal", "lowrank")


def transformer_loss(cfg: Any) -> tuple[Callable, Any]:
    """``(loss, params)``: the transformer of ``cfg``'s shape (any object with ``depth``,
    ``width``, ``heads``, ``seq_len``, ``batch``) on one fixed random batch, ``loss(params)``."""
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    x = jax.random.normal(jax.random.key(1), (cfg.batch, cfg.seq_len, cfg.width))
    y = jnp.zeros(cfg.batch, jnp.int32)

    def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss, params


def run(cfg: Config) -> dict:
    loss, params = transformer_loss(cfg)
    key = jax.random.key(0)
    programs = {"forward": (loss, (params,)), "backprop": (jax.grad(loss), (params,))}
    for tangent in cfg.tangents:
        estimator = fgrad_jax.forward_grad(loss, tangent=tangent)
        programs[f"fg_{tangent}"] = (estimator, (key, params))

    compiled, compile_s = {}, {}
    for name, (fn, args) in programs.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*args).compile()
        compile_s[name] = time.perf_counter() - start
        jax.block_until_ready(compiled[name](*args))

    calls = {n: (lambda n=n, args=args: compiled[n](*args)) for n, (_, args) in programs.items()}
    times = time_interleaved(calls, cfg.rounds, warmup=0)
    med = {name: median(ts) for name, ts in times.items()}
    rows = {}
    for name in programs:
        rows[name] = {"median_ms": 1e3 * med[name], "per_forward": med[name] / med["forward"]}
        rows[name] |= {"per_backprop": med[name] / med["backprop"], "compile_s": compile_s[name]}
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    out = {"config": asdict(cfg), "params": n_params, "device": str(jax.devices()[0])}
    return out | {"jax": jax.__version__, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    add_overrides(parser, Config, ["depth", "width", "batch", "rounds", "tangents"])
    args = parser.parse_args(argv)
    result = run(apply_overrides(Config(), args))
    for name, row in result["rows"].items():
        print(
            f"{name:15s} {row['median_ms']:8.1f} ms  /forward {row['per_forward']:5.2f}  "
            f"/backprop {row['per_backprop']:5.2f}  compile {row['compile_s']:5.1f} s"
        )
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()

"""Forward gradient vs backprop on an unmodified Flax nnx transformer (beyond the paper's MLP).

Measures, in one process, interleaved rounds, medians: a forward pass, ``jax.grad`` and
``fgrad_jax.forward_grad`` for several tangents (gradient only, no optimizer), plus the
compile time of each, and writes JSON::

    python experiments/bench_transformer.py --out experiments/results/transformer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from runtime import time_interleaved

import fgrad_jax


@dataclass
class Config:
    depth: int = 6
    width: int = 128
    heads: int = 4
    seq_len: int = 32
    batch: int = 16
    rounds: int = 15
    tangents: tuple[str, ...] = ("rademacher", "normal", "lowrank")


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=width, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg.width, cfg.heads, rngs) for _ in range(cfg.depth)])
        self.head = nnx.Linear(cfg.width, 10, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=1))


def run(cfg: Config) -> dict:
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (cfg.batch, cfg.seq_len, cfg.width))
    y = jnp.zeros(cfg.batch, jnp.int32)

    def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

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

    calls = {
        name: (lambda name=name, args=args: jax.block_until_ready(compiled[name](*args)))
        for name, (_, args) in programs.items()
    }
    times = time_interleaved(calls, cfg.rounds, warmup=0)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    rows = {
        name: {
            "median_ms": 1e3 * median[name],
            "per_forward": median[name] / median["forward"],
            "per_backprop": median[name] / median["backprop"],
            "compile_s": compile_s[name],
        }
        for name in programs
    }
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    return {
        "config": asdict(cfg),
        "params": n_params,
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "rows": rows,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=Config.rounds)
    args = parser.parse_args(argv)
    result = run(Config(rounds=args.rounds))
    for name, row in result["rows"].items():
        print(
            f"{name:15s} {row['median_ms']:8.1f} ms  /forward {row['per_forward']:5.2f}  "
            f"/backprop {row['per_backprop']:5.2f}  compile {row['compile_s']:5.1f} s"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

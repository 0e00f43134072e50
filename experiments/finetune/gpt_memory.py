"""Memory at scale: LoRA fine-tuning of a GPT-shaped model by forward gradients, compile only.

``python -m experiments.finetune.gpt_memory --out DIR [--size gpt2|small]`` compiles, for
a GPT-2-small-shaped nnx model (12 blocks, width 768, sequence 1024, batch 8, vocabulary
50257, the shape of docs/performance.md) with ``nnx.LoRALinear`` attention and MLP layers,
the loss's forward pass and one training step of each method, and writes XLA's memory
analysis to ``DIR/gpt_memory.json`` and ``DIR/gpt_memory.md``. Nothing runs: the
parameters are abstract (``nnx.eval_shape``), so this works on a laptop's CPU. Peak =
arguments + outputs + temporaries − donated (aliased) bytes of the compiled program.

Since only buffer assignment matters here, LLVM's optimisation level is set to 0 (compile
time; XLA's HLO passes and buffer assignment are unchanged by it).
"""

from __future__ import annotations

import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import fgrad_jax

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class GPTShape:
    """The model and batch shape; ``gpt2`` is GPT-2 small at sequence 1024, batch 8."""

    vocab: int = 50257
    width: int = 768
    depth: int = 12
    heads: int = 12
    seq_len: int = 1024
    batch: int = 8
    lora_rank: int = 8


SIZES = {
    "gpt2": GPTShape(),
    "small": GPTShape(vocab=512, width=64, depth=2, heads=4, seq_len=32, batch=4, lora_rank=4),
}


class Block(nnx.Module):
    """Pre-LN causal self-attention and MLP, every projection an ``nnx.LoRALinear``."""

    def __init__(self, s: GPTShape, rngs: nnx.Rngs):
        def lora(i: int, o: int) -> nnx.LoRALinear:
            return nnx.LoRALinear(i, o, lora_rank=s.lora_rank, rngs=rngs)

        w = s.width
        self.heads = s.heads
        self.ln1, self.ln2 = nnx.LayerNorm(w, rngs=rngs), nnx.LayerNorm(w, rngs=rngs)
        self.qkv, self.out = lora(w, 3 * w), lora(w, w)
        self.mlp_in, self.mlp_out = lora(w, 4 * w), lora(4 * w, w)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, w = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3 * self.heads, -1), 3, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        att = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        x = x + self.out(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, w))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


class GPT(nnx.Module):
    """Token and position embeddings, blocks, final LayerNorm, output tied to the embedding."""

    def __init__(self, s: GPTShape, rngs: nnx.Rngs):
        self.embed = nnx.Embed(s.vocab, s.width, rngs=rngs)
        self.pos = nnx.Embed(s.seq_len, s.width, rngs=rngs)
        self.blocks = nnx.List([Block(s, rngs) for _ in range(s.depth)])
        self.ln_f = nnx.LayerNorm(s.width, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """The final LayerNorm's output, ``(B, T, width)``: everything but the logits."""
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.embed.attend(self.hidden(tokens))


def chunked_xent(h: jax.Array, table: jax.Array, labels: jax.Array, chunk: int) -> jax.Array:
    """Mean cross-entropy of the tied-output logits ``h @ tableᵀ``, ``chunk`` positions at a
    time in a ``lax.scan``: only ``(B, chunk, vocab)`` logits (and, under a JVP, their
    tangent) exist at once instead of ``(B, T, vocab)``. Same value as the unchunked loss."""
    b, t, w = h.shape
    hs = h.reshape(b, t // chunk, chunk, w).swapaxes(0, 1)
    ys = labels.reshape(b, t // chunk, chunk).swapaxes(0, 1)

    def body(total, hy):
        logits = hy[0] @ table.T.astype(hy[0].dtype)
        return total + optax.softmax_cross_entropy_with_integer_labels(logits, hy[1]).sum(), None

    total, _ = jax.lax.scan(body, jnp.zeros((), h.dtype), (hs, ys))
    return total / (b * t)


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {
        "temp": int(m.temp_size_in_bytes),
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }
    out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def programs(
    s: GPTShape, xent_chunk: int = 0
) -> dict[str, tuple[Callable, tuple, tuple[int, ...]]]:
    """``{name: (fn, abstract args, donated argnums)}`` of the forward pass and the steps;
    ``xent_chunk > 0`` computes the loss (the forward pass's too) with
    :func:`chunked_xent`."""
    model = nnx.eval_shape(lambda: GPT(s, nnx.Rngs(0)))
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)  # type: ignore[misc]
    tokens = jax.ShapeDtypeStruct((s.batch, s.seq_len), jnp.int32)

    def loss(lora, base, x, y):
        model = nnx.merge(graphdef, lora, base)
        if xent_chunk:
            return chunked_xent(model.hidden(x), model.embed.embedding[...], y, xent_chunk)
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def lora_step(tx: optax.GradientTransformationExtraArgs) -> tuple[Callable, Any]:
        def step(lora, opt_state, base, x, y):
            updates, opt_state = tx.update(
                None, opt_state, lora, value_fn=lambda p: loss(p, base, x, y)
            )
            return optax.apply_updates(lora, updates), opt_state

        return step, jax.eval_shape(tx.init, lora)

    def backprop_lora():
        tx = optax.adam(1e-4)

        def step(lora, opt_state, base, x, y):
            grads = jax.grad(loss)(lora, base, x, y)
            updates, opt_state = tx.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state

        return step, jax.eval_shape(tx.init, lora)

    def backprop_full():
        tx = optax.adam(1e-4)

        def step(params, opt_state, x, y):
            grads = jax.grad(lambda p: loss(p[0], p[1], x, y))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return step, jax.eval_shape(tx.init, (lora, base))

    def fg(k: int, chunk: int | None = None) -> optax.GradientTransformationExtraArgs:
        est = fgrad_jax.forward_gradient(
            key=0, num_tangents=k, tangent="rademacher", tangent_chunk=chunk
        )
        return optax.chain(est, optax.adam(1e-4))

    spsa = optax.chain(fgrad_jax.spsa_gradient(key=0, num_samples=1), optax.sgd(1e-4))
    out: dict[str, tuple[Callable, tuple, tuple[int, ...]]] = {
        "forward": (loss, (lora, base, tokens, tokens), ())
    }
    for name, (step, state) in {
        "fg_lora_k1": lora_step(fg(1)),
        "fg_lora_k4": lora_step(fg(4)),
        # One tangent stream at a time: the automatic chunking fits streams to 1 GiB of
        # the largest intermediate, and with the loss chunked that is the attention scores.
        "fg_lora_k4_seq": lora_step(fg(4, 1)),
        "spsa_lora": lora_step(spsa),
        "backprop_lora": backprop_lora(),
    }.items():
        out[name] = (step, (lora, state, base, tokens, tokens), (0, 1))
    step, state = backprop_full()
    out["backprop_full"] = (step, ((lora, base), state, tokens, tokens), (0, 1))
    return out


def main(argv: list[str] | None = None) -> dict:
    """Compiles every program, writes ``gpt_memory.json`` and ``gpt_memory.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="gpt2")
    parser.add_argument("--out", default="out/finetune")
    parser.add_argument("--only", default=None, help="comma-separated subset of programs")
    parser.add_argument(
        "--xent-chunk",
        type=int,
        default=0,
        help="sequence positions per cross-entropy chunk (0: whole sequence at once); "
        "writes gpt_memory_chunk<N>.json/.md",
    )
    args = parser.parse_args(argv)
    s = SIZES[args.size]
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {
        "size": args.size,
        "shape": dataclasses.asdict(s),
        "xent_chunk": args.xent_chunk,
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "programs": {},
    }
    wanted = set(args.only.split(",")) if args.only else None
    stem = f"gpt_memory_chunk{args.xent_chunk}" if args.xent_chunk else "gpt_memory"
    for name, (fn, abstract, donate) in programs(s, args.xent_chunk).items():
        if wanted and name not in wanted and name != "forward":
            continue
        t0 = time.perf_counter()
        compiled = jax.jit(fn, donate_argnums=donate).lower(*abstract).compile()
        rec: dict[str, Any] = dict(_memory(compiled))
        rec["compile_seconds"] = time.perf_counter() - t0
        results["programs"][name] = rec
        fwd = results["programs"]["forward"]["peak"]
        print(
            f"{name:>14}: peak {rec['peak'] / GiB:.3f} GiB ({rec['peak'] / fwd:.2f}x forward), "
            f"temp {rec['temp'] / GiB:.3f} GiB, compile {rec['compile_seconds']:.1f} s",
            flush=True,
        )
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump(results, f, indent=1)
    fwd = results["programs"]["forward"]["peak"]
    lines = [
        f"# GPT LoRA fine-tuning memory, size `{args.size}` (compile only, {results['device']})"
        + (f", cross-entropy in chunks of {args.xent_chunk} positions" if args.xent_chunk else ""),
        "",
        f"Shape {dataclasses.asdict(s)}; peak = arguments + outputs + temporaries - donated.",
        "",
        "| program | peak | / forward | temp | arguments |",
        "|---|---|---|---|---|",
    ]
    for name, rec in results["programs"].items():
        lines.append(
            f"| `{name}` | {rec['peak'] / GiB:.3f} GiB | {rec['peak'] / fwd:.2f} | "
            f"{rec['temp'] / GiB:.3f} GiB | {rec['argument'] / GiB:.3f} GiB |"
        )
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()

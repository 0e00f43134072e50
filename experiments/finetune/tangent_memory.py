"""Working memory of the gradient alone on the benchmark's models, by number of tangents.

``python -m experiments.finetune.tangent_memory [--preset quick]`` prints XLA's temporary
bytes (compile only) of the loss's forward pass, ``jax.grad`` and ``fgrad_jax.forward_grad``
with K = 1, K = 4 and K = 4 in chunks of one tangent (``tangent_chunk=1``), for every model
of the preset at its fine-tuning batch: how much of a step's memory the K tangent streams
of the activations take.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fgrad_jax
from experiments.finetune import models
from experiments.finetune.configs import PRESETS


def temp_mib(fn: Any, *args: Any) -> float:
    """XLA's temporary bytes of ``jax.jit(fn)`` at ``args`` (abstract), in MiB."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    assert analysis is not None  # None only on backends without a memory analysis
    return analysis.temp_size_in_bytes / 2**20


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Prints and returns ``{model: {program: temp MiB}}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    results = {}
    for cfg in preset.models:
        module: Any = models.build(cfg)
        params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
        x = jax.ShapeDtypeStruct((preset.batch, 28, 28, 1), jnp.float32)
        y = jax.ShapeDtypeStruct((preset.batch,), jnp.int32)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

        def loss(p, x, y, module=module):
            logits = module.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        p = params["params"]
        out = {"forward": temp_mib(loss, p, x, y), "jax.grad": temp_mib(jax.grad(loss), p, x, y)}
        for k, chunk in ((1, None), (4, None), (4, 1)):
            est = fgrad_jax.forward_grad(
                loss, num_tangents=k, tangent="rademacher", tangent_chunk=chunk
            )
            out[f"forward_grad K={k}" + (f" chunk={chunk}" if chunk else "")] = temp_mib(
                est, key, p, x, y
            )
        results[cfg.name] = out
        cells = ", ".join(f"{n} {v:.3f} MiB ({v / out['forward']:.2f}x)" for n, v in out.items())
        print(f"{cfg.name}: {cells}", flush=True)
    return results


if __name__ == "__main__":
    main()

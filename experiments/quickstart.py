"""Quickstart: train a Flax nnx MLP on real Fashion-MNIST with forward gradients.

Offline, on the files of Debian's ``dataset-fashion-mnist`` package (or any ``--data-dir`` of
IDX files). The gradient is never back-propagated: each step is one ``jax.jvp`` with
``num_tangents`` random directions, through ``optax.chain(forward_gradient(...), adam)`` and
``nnx.Optimizer``::

    python experiments/quickstart.py --steps 2000 --batch-size 128

``--steps-per-call N`` (default 100) runs N steps inside one compiled call, a ``lax.scan``
over a chunk of N batches, instead of one Python call per step: the host dispatch and the
per-leaf argument handling of a jitted call are paid once per chunk.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fgrad_jax
from fgrad_jax.datasets import load_fashion_mnist


class MLP(nnx.Module):
    def __init__(self, sizes: tuple[int, ...], rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def loss_fn(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-tangents", type=int, default=4)
    parser.add_argument("--tangent", default="normal")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="directory of Fashion-MNIST IDX files")
    parser.add_argument(
        "--steps-per-call", type=int, default=100, help="steps per compiled call (1: one per step)"
    )
    args = parser.parse_args(argv)

    data = load_fashion_mnist(args.data_dir)
    train_x = jnp.asarray(data.train_images.reshape(len(data.train_images), -1))
    train_y = jnp.asarray(data.train_labels)
    test_x = jnp.asarray(data.test_images.reshape(len(data.test_images), -1))
    test_y = jnp.asarray(data.test_labels)

    model = MLP((train_x.shape[1], args.hidden, data.num_classes), nnx.Rngs(args.seed))
    fg = {"key": args.seed, "num_tangents": args.num_tangents, "tangent": args.tangent}
    tx = optax.chain(fgrad_jax.forward_gradient(**fg), optax.adam(args.learning_rate))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        value_fn = fgrad_jax.nnx_value_fn(loss_fn, model, images, labels)
        optimizer.update(model, None, value_fn=value_fn)
        return fgrad_jax.forward_gradient_state(optimizer.opt_state).value  # same JVP pass

    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def train_steps(state, images, labels):  # images: (steps, batch, ...), one scan
        def body(state, batch):
            model, optimizer = nnx.merge(graphdef, state)
            loss = train_step(model, optimizer, *batch)
            return nnx.state((model, optimizer)), loss

        return jax.lax.scan(body, state, (images, labels))

    @nnx.jit
    def accuracy(model, images, labels):
        return jnp.mean(jnp.argmax(model(images), -1) == labels)

    rng = np.random.default_rng(args.seed)
    chunk = max(1, args.steps_per_call)
    start = time.perf_counter()
    step, losses, first_call = 0, [], None
    while step < args.steps:
        n = min(chunk, args.steps - step)
        idx = rng.integers(0, len(train_x), (n, args.batch_size))
        if chunk == 1:
            losses = [train_step(model, optimizer, train_x[idx[0]], train_y[idx[0]])]
        else:
            state, losses = train_steps(state, train_x[idx], train_y[idx])
        step += n
        if first_call is None:  # includes compilation
            jax.block_until_ready(losses)
            first_call = (time.perf_counter() - start, n)
        if step % max(1, args.steps // 10) < n or step == args.steps:
            print(f"step {step:5d}  loss {float(losses[-1]):.4f}", flush=True)
    if chunk > 1:
        model, optimizer = nnx.merge(graphdef, state)
    elapsed = time.perf_counter() - start
    result = {
        "dataset": data.name,
        **{k: getattr(args, k) for k in ("steps", "batch_size", "num_tangents", "tangent")},
        "steps_per_call": chunk,
        "test_accuracy": float(accuracy(model, test_x, test_y)),
        "train_seconds": round(elapsed, 2),
        # Steady state: the calls after the first (which compiles), per step.
        "ms_per_step_after_compile": round(
            1e3 * (elapsed - first_call[0]) / max(1, args.steps - first_call[1]), 4
        ),
        "device": str(jax.devices()[0]),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Quickstart: train a Flax nnx MLP on real Fashion-MNIST with forward gradients.

Offline, on the files of Debian's ``dataset-fashion-mnist`` package (or any ``--data-dir`` of
IDX files). The gradient is never back-propagated: each step is one ``jax.jvp`` with
``num_tangents`` random directions, through ``optax.chain(forward_gradient(...), adam)`` and
``nnx.Optimizer``::

    python experiments/quickstart.py --steps 2000 --batch-size 128
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
    args = parser.parse_args(argv)

    data = load_fashion_mnist(args.data_dir)
    train_x = jnp.asarray(data.train_images.reshape(len(data.train_images), -1))
    train_y = jnp.asarray(data.train_labels)
    test_x = jnp.asarray(data.test_images.reshape(len(data.test_images), -1))
    test_y = jnp.asarray(data.test_labels)

    model = MLP((train_x.shape[1], args.hidden, data.num_classes), nnx.Rngs(args.seed))
    tx = optax.chain(
        fgrad_jax.forward_gradient(
            key=args.seed, num_tangents=args.num_tangents, tangent=args.tangent
        ),
        optax.adam(args.learning_rate),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        value_fn = fgrad_jax.nnx_value_fn(loss_fn, model, images, labels)
        optimizer.update(model, None, value_fn=value_fn)
        return fgrad_jax.forward_gradient_state(optimizer.opt_state).value  # same JVP pass

    @nnx.jit
    def accuracy(model, images, labels):
        return jnp.mean(jnp.argmax(model(images), -1) == labels)

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(train_x), args.batch_size)
        loss = train_step(model, optimizer, train_x[idx], train_y[idx])
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:5d}  loss {float(loss):.4f}", flush=True)
    elapsed = time.perf_counter() - start
    result = {
        "dataset": data.name,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_tangents": args.num_tangents,
        "tangent": args.tangent,
        "test_accuracy": float(accuracy(model, test_x, test_y)),
        "train_seconds": round(elapsed, 2),
        "device": str(jax.devices()[0]),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

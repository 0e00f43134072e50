"""Where the variance of split local losses comes from, block by block (issue 10).

Trains the quality benchmark's CNN with ``local_a_split_k<K>`` for a few hundred steps on
Fashion-MNIST, then compares each block's forward-gradient estimate with the true gradient of
its local loss (``jax.grad``, diagnosis only): cosine per block, averaged over keys and fixed
held-out batches, next to the number of perturbed activations each loss column scores.
Two layouts of the same network:

* ``flatten_in_block_1`` (the benchmark's CNN): the flatten joins the second conv block, whose
  output then has no spatial axes and is scored in one column;
* ``flatten_in_block_2`` (``local_a_splitall``): blocks drawn explicitly with the flatten in
  the dense block (same function, same parameters), so the second conv block keeps its
  spatial output and is split into patches and groups too.

    PYTHONPATH=. python experiments/local_split_diagnostics.py --steps 300 --out \\
        experiments/results/local_split_cnn_cpu.json
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from toolkit import environment, write_json
from toolkit.quality import SPLITS, SPLITS_ALL, model_blocks, model_layers

import fgrad_jax

LAYOUTS = {
    "flatten_in_block_1": (lambda: model_layers("cnn"), SPLITS["cnn"]),  # local_a_split
    "flatten_in_block_2": (lambda: model_blocks("cnn"), SPLITS_ALL["cnn"]),  # local_a_splitall
}


def perturbed_per_column(layers: list, split: dict, x: jax.Array) -> list[int]:
    """Per block: activations per example at the output of its parameterised op, divided by
    the block's loss columns (patches x groups)."""
    sizes, h, key = [], x, jax.random.key(0)
    flat = [entry for block in layers for entry in (block if isinstance(block, list) else [block])]
    for layer in flat:
        if isinstance(layer, nn.Module):
            h = jax.eval_shape(lambda a, m=layer: m.init_with_output(key, a)[0], h)
            sizes.append(int(np.prod(h.shape[1:])))
        else:
            h = jax.eval_shape(layer, h)
    out = []
    for i, size in enumerate(sizes):
        p = split["patches"][i]
        cols = (p * p if p else 1) * split["groups"][i]
        out.append(size // cols)
    return out


def block_cosines(local, params, x, y, k: int, keys: int) -> jax.Array:
    """Cosine of each block's estimate (block and head parameters) with its true gradient,
    mean over ``keys`` tangent draws."""
    true = fgrad_jax.diagnostics.true_gradient(
        lambda p: local.losses(p, x, y).mean(0).sum(), params
    )
    est = fgrad_jax.forward_grad(
        local.value_fn(x, y), num_tangents=k, tangent=local.tangent("activations")
    )
    draws = jax.vmap(lambda kk: est(kk, params))(jax.random.split(jax.random.key(7), keys))

    def per_block(g):
        return [(g["blocks"][i], g["heads"][i]) for i in range(len(params["blocks"]))]

    cos = []
    for i, t in enumerate(per_block(true)):
        c = jax.vmap(
            lambda d, i=i, t=t: fgrad_jax.diagnostics.cosine_similarity(per_block(d)[i], t)
        )(draws)
        cos.append(jnp.mean(c))
    return jnp.stack(cos)


def run_layout(name: str, ds, args) -> dict:
    make_layers, split = LAYOUTS[name]
    layers = make_layers()
    x_all = jnp.asarray(ds.train_images[: args.train_size], jnp.float32)
    y_all = jnp.asarray(ds.train_labels[: args.train_size])
    x_val = jnp.asarray(ds.train_images[-2 * args.batch_size :], jnp.float32)
    y_val = jnp.asarray(ds.train_labels[-2 * args.batch_size :])
    local = fgrad_jax.local_losses(layers, 10, **split)
    params = local.init(jax.random.key(args.seed), x_all[:1])
    tx = optax.chain(local.forward_gradient(args.seed, num_tangents=args.k), optax.adam(args.lr))
    state = tx.init(params)

    batches = args.train_size // args.batch_size

    @jax.jit
    def step(params, state, i):
        # Every batch once per epoch, in a fresh order each epoch.
        order = jax.random.permutation(jax.random.fold_in(jax.random.key(1), i // batches), batches)
        start = order[i % batches] * args.batch_size
        xb = jax.lax.dynamic_slice_in_dim(x_all, start, args.batch_size)
        yb = jax.lax.dynamic_slice_in_dim(y_all, start, args.batch_size)
        updates, state = tx.update(None, state, params, value_fn=local.value_fn(xb, yb))
        return optax.apply_updates(params, updates), state

    cos_fn = jax.jit(lambda p, xv, yv: block_cosines(local, p, xv, yv, args.k, args.keys))
    halves = [(x_val[: args.batch_size], y_val[: args.batch_size]),
              (x_val[args.batch_size :], y_val[args.batch_size :])]  # fmt: skip
    result = {"perturbed_per_column": perturbed_per_column(layers, split, x_all[:1]),
              "split": split, "cosine": {}}  # fmt: skip
    t0, done = time.perf_counter(), 0
    for target in sorted({0, *args.measure_at}):
        for i in range(done, target):
            params, state = step(params, state, i)
        done = target
        cos = np.mean([np.asarray(cos_fn(params, xv, yv)) for xv, yv in halves], axis=0)
        result["cosine"][str(target)] = cos.tolist()
        print(f"[split-diag] {name:20s} step {target:4d}  cosine per block "
              + " ".join(f"{c:.3f}" for c in cos)
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    acc = jnp.mean(local.predict(params, x_val).argmax(-1) == y_val)
    result["heldout_acc_at_end"] = float(acc)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=16, help="tangents per step")
    parser.add_argument("--measure-at", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--keys", type=int, default=8, help="tangent draws per cosine")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=25_600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    ds = fgrad_jax.datasets.load_fashion_mnist(args.data_dir, channel_axis=True)
    results = {"config": vars(args), "environment": environment(),
               "layouts": {n: run_layout(n, ds, args) for n in args.layouts}}  # fmt: skip
    for name, r in results["layouts"].items():
        print(f"[split-diag] {name}: perturbed activations per loss column "
              f"{r['perturbed_per_column']}, held-out accuracy {r['heldout_acc_at_end']:.3f}")  # fmt: skip
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()

"""How well K tangents estimate the head gradient of a frozen pretrained model.

``python -m experiments.finetune.head_cosine --ckpt-dir DIR [--model vit]`` prints, for a
batch of the few-shot digits, the mean cosine between the forward-gradient estimate of the
head's gradient (activity and weight perturbation, Rademacher tangents) and the exact one,
for K = 1 .. 256 tangents, at the zero head every method starts from and after 400 steps of
the linear probe (backprop Adam 3e-2). The head is one dense layer on frozen features, so
the exact gradient is ``x^T G / B`` with ``G`` the (B, 10) logit gradients: activity
perturbation estimates each row of ``G`` from K draws in 10 dimensions.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgrad_jax
from experiments.finetune import train
from experiments.finetune.configs import PRESETS

KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def cosines(module, params, x, y, keys: int = 64) -> dict[str, dict[int, float]]:
    """Mean cosine (over ``keys`` draws) of each estimate to the exact head gradient."""
    rest = {k: v for k, v in params.items() if k != "head"}

    def per_example(head, x, y):
        logits = module.apply({"params": {**rest, "head": head}}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    exact = jax.grad(lambda h: per_example(h, x, y).mean())(params["head"])
    flat_exact = jnp.concatenate([a.ravel() for a in jax.tree.leaves(exact)])
    out: dict[str, dict[int, float]] = {}
    for perturb in ("activations", "weights"):
        fn = (
            per_example
            if perturb == "activations"
            else (lambda h, x, y: per_example(h, x, y).mean())
        )
        out[perturb] = {}
        for k in KS:
            est = fgrad_jax.forward_grad(fn, num_tangents=k, tangent="rademacher", perturb=perturb)

            @jax.jit
            def cos(key, est=est):
                g = est(key, params["head"], x, y)
                f = jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])
                return f @ flat_exact / (jnp.linalg.norm(f) * jnp.linalg.norm(flat_exact))

            c = jax.lax.map(cos, jax.random.split(jax.random.key(0), keys))
            out[perturb][k] = float(jnp.mean(c))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--model", default="vit")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    preset = PRESETS["quick"]
    cfg = next(c for c in preset.models if c.name == args.model)
    data = train.digits_28(preset)
    pretrained, _ = train.pretrain(cfg, preset, args.ckpt_dir)
    module = train.models.build(cfg)
    params = dict(pretrained)
    params["head"] = jax.tree.map(jnp.zeros_like, params["head"])
    x, y = (jnp.asarray(a) for a in data["fewshot"])
    rng = np.random.default_rng(preset.seed)
    idx = rng.integers(0, len(y), (400, preset.batch))
    tx = optax.adam(3e-2)

    @jax.jit
    def probe(head):
        def body(c, i):
            h, s = c
            g = jax.grad(
                lambda h: train.xent(module.apply({"params": {**params, "head": h}}, x[i]), y[i])
            )(h)
            u, s = tx.update(g, s, h)
            return (optax.apply_updates(h, u), s), None

        return jax.lax.scan(body, (head, tx.init(head)), jnp.asarray(idx))[0][0]

    b = idx[0]
    results = {"zero_head": cosines(module, params, x[b], y[b])}
    trained = {**params, "head": probe(params["head"])}
    results["probe_400_steps"] = cosines(module, trained, x[b], y[b])
    for point, r in results.items():
        for perturb, per_k in r.items():
            print(point, perturb, " ".join(f"K={k}:{c:.3f}" for k, c in per_k.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

"""Estimates that must stay the same across refactorings of the estimator (bit for bit on one
machine, within a rounding-level tolerance across CPUs).

``tests/data/golden_estimates.npz`` was written by ``python tests/golden_estimates.py``
(one device). First at commit 5f7ee5c, before the estimator was split into tangent
strategies (the split left every entry bitwise unchanged); rewritten twice since, on purpose:
when the per-leaf seeds and the transformation's step keys changed from threefry
(``jax.random.bits``/``split``) to the integer hash of ``_random.fold_in`` (issue 11), and
when the leaves' tangents became consecutive ranges of one counter stream with one seed
(``_random.leaf_streams``, issue 20: normal, rademacher, sphere, low-rank and transform
entries redrawn, same laws; orthogonal moved by 8.6e-8 of its scale, user not at all).
``test_golden.py`` recomputes every entry, with one device (subprocess) and with the test
suite's eight, and compares within :data:`RELATIVE_TOLERANCE` of each entry's largest
magnitude: XLA:CPU emits different code per instruction set (AVX2 vs AVX-512), so results
differ at rounding level between CPUs (measured: 6.7e-7 of the scale on an AMD EPYC against
a file written on another CPU). A real change of the estimator moves entries by far more
(another tangent draw changes them completely). For refactors on one machine,
``python tests/golden_estimates.py --check --bitwise`` compares bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fgrad_jax

DATA = Path(__file__).resolve().parent / "data" / "golden_estimates.npz"
RELATIVE_TOLERANCE = 2e-5


def mismatches(ref: dict, got: dict, bitwise: bool = False) -> list[str]:
    """Entries of ``got`` farther from ``ref`` than the tolerance (or not bitwise equal)."""
    bad = []
    for k in ref:
        r, o = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
        if bitwise:
            ok = np.array_equal(ref[k], got[k])
        else:
            scale = float(np.max(np.abs(r), initial=0.0))
            ok = r.shape == o.shape and bool(np.all(np.abs(r - o) <= RELATIVE_TOLERANCE * scale))
        if not ok:
            bad.append(k)
    return bad


def _params():
    k = jax.random.split(jax.random.key(7), 5)
    return {
        "conv": jax.random.normal(k[0], (3, 3, 2, 4)) * 0.3,
        "dense": {"kernel": jax.random.normal(k[1], (4 * 4 * 4, 8)) * 0.2, "bias": jnp.zeros(8)},
        "out": jax.random.normal(k[2], (8, 3)) * 0.3,
        "step": jnp.array(3, jnp.int32),
    }


def _loss(params, x, y):
    h = jax.lax.conv_general_dilated(
        x, params["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(h).reshape(x.shape[0], -1)
    h = jax.nn.relu(h @ params["dense"]["kernel"] + params["dense"]["bias"])
    logits = h @ params["out"]
    return jnp.mean((logits - y) ** 2) * params["step"].astype(jnp.float32), logits


def _user_tangent(key, tree):
    return jax.tree.map(
        lambda leaf: jax.random.rademacher(key, jnp.shape(leaf), jnp.float32).astype(
            jnp.result_type(leaf)
        ),
        tree,
    )


TANGENTS = {
    "normal": "normal",
    "rademacher": "rademacher",
    "sphere": "sphere",
    "orthogonal": "orthogonal",
    "lowrank": "lowrank",
    "lowrank2": fgrad_jax.lowrank(2),
    "user": _user_tangent,
}


def compute() -> dict[str, np.ndarray]:
    params = _params()
    kx, ky = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (5, 4, 4, 2))
    y = jax.random.normal(ky, (5, 3))
    out = {}
    for name, tangent in TANGENTS.items():
        for k in (1, 3):
            est = jax.jit(
                fgrad_jax.value_and_forward_grad(
                    _loss, num_tangents=k, tangent=tangent, has_aux=True
                )
            )
            (value, aux), grad = est(jax.random.key(11), params, x, y)
            out[f"{name}/K{k}/value"] = np.asarray(value)
            out[f"{name}/K{k}/aux"] = np.asarray(aux)
            for path, leaf in jax.tree_util.tree_leaves_with_path(grad):
                out[f"{name}/K{k}/grad{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        # Two positional arguments differentiated, eagerly (not jitted).
        g = fgrad_jax.forward_grad(
            lambda a, b: jnp.sum(jnp.sin(a) * b) + jnp.sum(a @ b),
            argnums=(0, 1),
            num_tangents=2,
            tangent=tangent,
        )(jax.random.key(5), jnp.ones((3, 3)) * 0.5, jnp.arange(9.0).reshape(3, 3))
        out[f"{name}/argnums/a"], out[f"{name}/argnums/b"] = map(np.asarray, g)
    # The optax transformation over three steps.
    tx = fgrad_jax.forward_gradient(key=4, num_tangents=2, tangent="rademacher")
    p = {k: v for k, v in params.items() if k != "step"}
    state = tx.init(p)
    for i in range(3):
        upd, state = jax.jit(
            lambda s, p: tx.update(
                None, s, p, value_fn=lambda q: _loss({**q, "step": params["step"]}, x, y)[0]
            )
        )(state, p)
        for path, leaf in jax.tree_util.tree_leaves_with_path(upd):
            out[f"transform/{i}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        ref = dict(np.load(DATA))
        got = compute()
        bad = mismatches(ref, got, bitwise="--bitwise" in sys.argv)
        missing = sorted(set(ref) ^ set(got))
        print({"n": len(ref), "mismatched": bad, "missing": missing})
        sys.exit(1 if bad or missing else 0)
    DATA.parent.mkdir(exist_ok=True)
    np.savez(DATA, **compute())
    print("wrote", DATA)

"""What the runtime benchmark measures: one configuration's steps side by side
(:func:`experiments.toolkit.measure_ratios`), the data-parallel variant and the memory sweep.
The configurations are data, ``configs/<preset>.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fgrad_jax
from experiments.toolkit import (
    CNN,
    classifier_loss,
    donated_step,
    measure_ratios,
    memory_of,
    mlp_loss,
    mlp_problem,
    synthetic_batch,
)

CONFIGS = Path(__file__).parent / "configs"
LR = 1e-4  # of every timed SGD step (the timing does not depend on it)


def measure_sharded(
    loss_fn, params, batch, *, mesh_size: int, variants, reps: int = 9, fsdp: bool = False
) -> dict[str, Any]:
    """Data parallel: batch sharded over a 1-D mesh of ``mesh_size`` devices, params replicated
    (or, with ``fsdp``, each leaf sharded over the same axis along its largest axis that the
    mesh divides; leaves with none stay replicated).

    Times the steps (learning rate ``LR``) with :func:`experiments.toolkit.measure_ratios`
    (XLA's memory analysis per device) and counts the bytes of every collective in each
    compiled step (``_sharding.collective_bytes``).
    """
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from fgrad_jax._sharding import collective_bytes

    devices = jax.devices()
    if len(devices) < mesh_size:
        raise ValueError(f"--mesh {mesh_size} needs {mesh_size} devices; found {len(devices)}.")
    mesh = Mesh(np.array(devices[:mesh_size]), ("data",))

    def spec(x):
        if not fsdp:
            return P()
        axes = [a for a in np.argsort(x.shape)[::-1] if x.shape[a] % mesh_size == 0]
        return P(*["data" if a == (axes[0] if axes else -1) else None for a in range(x.ndim)])

    params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    res = measure_ratios(loss_fn, params, batch, variants=variants, lr=LR, reps=reps)

    def collectives(tangent=None, k=1):
        tx, st = donated_step(loss_fn, LR, tangent, k)
        return collective_bytes(st.lower(params, tx.init(params), batch).compile().as_text())

    res.update(mesh_size=mesh_size, fsdp=fsdp, backprop_collective_bytes=collectives())
    res["param_bytes"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    res["backprop_memory"] = res["memory"]["backprop"]
    for v, (tangent, k) in zip(res["variants"], variants):
        v["collective_bytes"] = collectives(tangent, k)
    return res


class ThreefryNormal:
    """A user tangent callable drawing ``jax.random.normal`` per leaf: the naive baseline
    (the estimator's generic path, the same work as the original implementation)."""

    def __call__(self, key, tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(
            treedef, [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
        )

    def __repr__(self):
        return "threefry_normal"


THREEFRY_NORMAL = ThreefryNormal()


def tangents_available(names):
    return [t for t in names if t in fgrad_jax.TANGENT_NAMES]


@dataclasses.dataclass
class RuntimeConfig:
    """One benchmark configuration, named ``name`` in the results: ``model`` ``"mlp"`` (the
    plain-JAX MLP, 784 inputs, ``depth`` hidden layers of ``width``) or ``"cnn"`` (28x28
    inputs), the forward-gradient steps' ``(tangent, num_tangents)`` ``variants``, timed
    ``reps`` rounds after ``warmup``; ``memory``: also each step's compiled memory."""

    name: str
    model: str
    batch_size: int
    variants: list[tuple[Any, int]]
    reps: int
    warmup: int = 2
    memory: bool = True
    width: int = 1024
    depth: int = 2


def run_config(cfg: RuntimeConfig) -> dict[str, Any]:
    """Measures one configuration; the :func:`experiments.toolkit.measure_ratios` dict plus its config."""
    kp, kb = jax.random.split(jax.random.key(0))
    if cfg.model == "mlp":
        params, batch = mlp_problem([784] + [cfg.width] * cfg.depth + [10], cfg.batch_size)
        loss = mlp_loss
    elif cfg.model == "cnn":
        cnn = CNN()
        batch = synthetic_batch(kb, cfg.batch_size, (28, 28))
        params = cnn.init(kp, batch[0][:1])
        loss = classifier_loss(cnn)
    else:
        raise ValueError(f"unknown model {cfg.model!r}; use 'mlp' or 'cnn'.")
    timing = {k: getattr(cfg, k) for k in ("variants", "reps", "warmup", "memory")}
    res = measure_ratios(loss, params, batch, **timing)
    res.update({k: getattr(cfg, k) for k in ("name", "model", "batch_size", "width", "depth")})
    res["num_params"] = int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
    return res


def memory_sweep(depths=(2, 4, 8, 16, 32), width=1024, batch_size=1024, tangents=None):
    """XLA temp bytes of each step vs depth (compile only, nothing is run)."""
    tangents = tangents or tangents_available(("rademacher", "normal", "lowrank"))
    rows = []
    for depth in depths:
        params, batch = mlp_problem([784] + [width] * depth + [10], batch_size)
        row = {"depth": depth, "width": width, "batch_size": batch_size}
        row["param_bytes"] = int(sum(p.nbytes for p in jax.tree_util.tree_leaves(params)))
        tx, st = donated_step(mlp_loss, LR)
        row["backprop"] = memory_of(st, params, tx.init(params), batch)
        for t in tangents:
            tx, st = donated_step(mlp_loss, LR, t)
            row[t] = memory_of(st, params, tx.init(params), batch)
            row[f"{t}_temp_over_backprop"] = row[t]["temp_bytes"] / row["backprop"]["temp_bytes"]
        rows.append(row)
    return rows


def load_preset(preset: str) -> list[RuntimeConfig]:
    """The configurations of ``configs/<preset>.json``, each with the variants whose tangent
    this fgrad_jax has (``threefry_normal``: the naive baseline above)."""

    tangents = {t: t for t in fgrad_jax.TANGENT_NAMES} | {"threefry_normal": THREEFRY_NORMAL}

    def variants(pairs):
        return [(tangents[t], k) for t, k in pairs if t in tangents]

    rows = json.loads((CONFIGS / f"{preset}.json").read_text())
    return [RuntimeConfig(**{**r, "variants": variants(r["variants"])}) for r in rows]

"""Runtime and memory of a forward-gradient step against a backprop step and a forward pass.

Everything is measured in one process, jitted, warmed up, with the candidates interleaved
(one call each per round, in a seeded random order) so that a noisy shared machine slows them alike, and
reported as medians. The paper's quantities (Baydin et al. 2022, Sec. 5):

* ``R_f`` = time of one forward-gradient SGD step / time of one evaluation of f;
* ``R_b`` = time of one backprop SGD step / time of one evaluation of f;
* ``fg_over_bp`` = ``R_f / R_b`` (the paper's MLP: 2.329 / 3.971 = 0.586).

``paired_ratio`` is the median over rounds of (fg step time / backprop step time) within the
same round: the most noise-robust form of ``fg_over_bp`` on a shared machine.

The measurement is :func:`experiments.toolkit.measure_ratios` (keys and their meanings:
:mod:`experiments.toolkit.records`); this script holds the configurations, the data-parallel variant
(``--mesh``) and the memory sweep. Command line::

    python -m experiments.benchmarks.main --preset quick --out runtime.json
    python -m experiments.benchmarks.main --preset full --out runtime.json   # every config below

Memory: ``jax.jit(step).lower(...).compile().memory_analysis()`` (XLA's static buffer
assignment: temp bytes are the working memory beyond arguments and outputs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# `--mesh N` on a CPU host: N host devices must be requested before jax is imported.
if "--mesh" in sys.argv[1:-1] and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    _n = sys.argv[sys.argv.index("--mesh") + 1]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}"
    ).strip()

import jax
import jax.numpy as jnp
import numpy as np

import fgrad_jax
from experiments.toolkit import (
    CNN,
    Runner,
    apply_overrides,
    classifier_loss,
    compiled_memory,
    environment,
    init_mlp,
    make_backprop_step,
    make_fg_step,
    make_forward,
    measure_ratios,
    median,
    memory_of,
    mlp_loss,
    paired_ratio,
    synthetic_batch,
    time_interleaved,
    write_json,
)

# Names other scripts and tests import from this module (most live in the toolkit).
__all__ = [
    "compiled_memory",
    "environment",
    "init_mlp",
    "make_backprop_step",
    "make_fg_step",
    "make_forward",
    "measure_ratios",
    "measure_sharded",
    "memory_sweep",
    "mlp_loss",
    "synthetic_batch",
    "time_interleaved",
]


def measure_sharded(
    loss_fn,
    params,
    batch,
    *,
    mesh_size: int,
    variants,
    lr: float = 1e-4,
    reps: int = 9,
    warmup: int = 2,
    fsdp: bool = False,
) -> dict[str, Any]:
    """Data parallel: batch sharded over a 1-D mesh of ``mesh_size`` devices, params replicated
    (or, with ``fsdp``, each leaf sharded over the same axis along its largest axis that the
    mesh divides; leaves with none stay replicated).

    Times the backprop step and each forward-gradient variant (interleaved, medians), counts
    the bytes of every collective in each compiled step (``_sharding.collective_bytes``) and
    reports XLA's memory analysis of each (per device).
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

    params = jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params
    )
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    fns: dict[str, Callable[[], None]] = {}
    tx, st = make_backprop_step(loss_fn, lr)
    fns["backprop"] = Runner(st, tx, params, batch)
    out: dict[str, Any] = {
        "mesh_size": mesh_size,
        "fsdp": fsdp,
        "param_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)),
        "variants": [],
    }
    compiled = st.lower(params, tx.init(params), batch).compile()
    out["backprop_collective_bytes"] = collective_bytes(compiled.as_text())
    out["backprop_memory"] = compiled_memory(compiled)
    for i, (tan, k) in enumerate(variants):
        tx, st = make_fg_step(loss_fn, lr, tan, k)
        fns[f"fg{i}"] = Runner(st, tx, params, batch)
        compiled = st.lower(params, tx.init(params), batch).compile()
        out["variants"].append(
            {
                "tangent": tan if isinstance(tan, str) else repr(tan),
                "num_tangents": k,
                "collective_bytes": collective_bytes(compiled.as_text()),
                "memory": compiled_memory(compiled),
            }
        )
    times = time_interleaved(fns, reps, warmup)
    out["t_backprop_s"] = median(times["backprop"])
    for i, v in enumerate(out["variants"]):
        v["t_step_s"] = median(times[f"fg{i}"])
        v["paired_ratio"] = paired_ratio(times[f"fg{i}"], times["backprop"])
    return out


# ----------------------------------------------------------------------------- presets


ALL_TANGENTS = ("rademacher", "normal", "sphere", "orthogonal", "lowrank")


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


def _tangents_available(names):
    return [t for t in names if t in fgrad_jax.TANGENT_NAMES]


@dataclasses.dataclass
class RuntimeConfig:
    """One benchmark configuration.

    Attributes:
        name: Name in the results (``mlp_b64``, ...).
        model: ``"mlp"`` (plain-JAX MLP, 784 inputs) or ``"cnn"`` (28x28 inputs).
        batch_size: Batch size.
        variants: ``(tangent, num_tangents)`` pairs of the forward-gradient steps.
        reps: Timed rounds.
        warmup: Untimed warm-up rounds.
        memory: Also read the compiled memory of each step.
        width: Hidden width of the MLP.
        depth: Hidden layers of the MLP.
    """

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
        sizes = [784] + [cfg.width] * cfg.depth + [10]
        params = init_mlp(kp, sizes)
        batch = synthetic_batch(kb, cfg.batch_size, (784,))
        loss = mlp_loss
    elif cfg.model == "cnn":
        cnn = CNN()
        batch = synthetic_batch(kb, cfg.batch_size, (28, 28))
        params = cnn.init(kp, batch[0][:1])
        loss = classifier_loss(cnn)
    else:
        raise ValueError(f"unknown model {cfg.model!r}; use 'mlp' or 'cnn'.")
    res = measure_ratios(
        loss,
        params,
        batch,
        variants=cfg.variants,
        reps=cfg.reps,
        warmup=cfg.warmup,
        memory=cfg.memory,
    )
    res.update(
        name=cfg.name,
        model=cfg.model,
        batch_size=cfg.batch_size,
        width=cfg.width,
        depth=cfg.depth,
        num_params=int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
    )
    return res


def configs(preset: str) -> list[RuntimeConfig]:
    """The configurations of a preset (``quick``: the two MLP batch sizes)."""
    tans = _tangents_available(ALL_TANGENTS)
    every = [(t, 1) for t in tans] + [(THREEFRY_NORMAL, 1)]
    structured = _tangents_available(("rademacher", "normal", "lowrank"))
    ks = [(t, k) for t in structured for k in (2, 4, 8)]
    quick = preset == "quick"
    reps = 7 if quick else 15
    out = [
        RuntimeConfig("mlp_b64", "mlp", 64, every + ks, reps),
        RuntimeConfig("mlp_b1024", "mlp", 1024, every + ([] if quick else ks), reps),
    ]
    if quick:
        return out
    out.append(RuntimeConfig("mlp_w4096_b64", "mlp", 64, every, 9, width=4096))
    out.append(RuntimeConfig("cnn_b64", "cnn", 64, every, 9))
    for depth in (2, 4, 8, 16, 32, 64):
        variants = [(t, 1) for t in structured]
        out.append(RuntimeConfig(f"depth{depth}_b64", "mlp", 64, variants, 7, depth=depth))
    return out


def memory_sweep(depths=(2, 4, 8, 16, 32), width=1024, batch_size=1024, tangents=None):
    """XLA temp bytes of each step vs depth (compile only, nothing is run)."""
    tangents = tangents or _tangents_available(("rademacher", "normal", "lowrank"))
    rows = []
    for depth in depths:
        kp, kb = jax.random.split(jax.random.key(0))
        sizes = [784] + [width] * depth + [10]
        params = init_mlp(kp, sizes)
        batch = synthetic_batch(kb, batch_size, (784,))
        row = {
            "depth": depth,
            "width": width,
            "batch_size": batch_size,
            "param_bytes": int(sum(p.nbytes for p in jax.tree_util.tree_leaves(params))),
        }
        tx, st = make_backprop_step(mlp_loss, 1e-4)
        row["backprop"] = memory_of(st, params, tx.init(params), batch)
        for t in tangents:
            tx, st = make_fg_step(mlp_loss, 1e-4, t, 1)
            row[t] = memory_of(st, params, tx.init(params), batch)
            row[f"{t}_temp_over_backprop"] = row[t]["temp_bytes"] / row["backprop"]["temp_bytes"]
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", choices=("quick", "full"), default="quick")
    ap.add_argument("--only", nargs="*", help="config names to run (default: all of the preset)")
    ap.add_argument("--no-memory-sweep", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default="runtime.json")
    ap.add_argument(
        "--mesh",
        type=int,
        default=None,
        help="also run the MLP steps data-parallel on a 1-D mesh of N devices (on a CPU host "
        "N host devices are requested automatically) and count their collective bytes",
    )
    ap.add_argument(
        "--fsdp",
        action="store_true",
        help="with --mesh: shard the parameters FSDP-style (largest axis over the mesh)",
    )
    args = ap.parse_args(argv)
    results = {"environment": environment(), "preset": args.preset, "configs": []}
    if args.mesh:
        results["mesh"] = []
        for bsz in (64, 1024):
            kp, kb = jax.random.split(jax.random.key(0))
            params = init_mlp(kp, [784, 1024, 1024, 10])
            batch = synthetic_batch(kb, bsz, (784,))
            res = measure_sharded(
                mlp_loss,
                params,
                batch,
                mesh_size=args.mesh,
                reps=args.reps or 9,
                fsdp=args.fsdp,
                variants=[(t, 1) for t in _tangents_available(("rademacher", "normal", "lowrank"))]
                + [("rademacher", 4), ("normal", 4)],
            )
            res["batch_size"] = bsz
            results["mesh"].append(res)
            print(
                f"== mesh {args.mesh}, B={bsz}: backprop {res['t_backprop_s'] * 1e3:.2f} ms, "
                f"collectives {res['backprop_collective_bytes']} (params {res['param_bytes']} B)",
                flush=True,
            )
            for v in res["variants"]:
                print(
                    f"   {v['tangent']:>11} K={v['num_tangents']}: {v['t_step_s'] * 1e3:.2f} ms "
                    f"(paired {v['paired_ratio']:.2f}), collectives {v['collective_bytes']}",
                    flush=True,
                )
    for cfg in configs(args.preset):
        if args.only and cfg.name not in args.only:
            continue
        cfg = apply_overrides(cfg, {"reps": args.reps})
        t0 = time.perf_counter()
        res = run_config(cfg)
        res["wall_s"] = time.perf_counter() - t0
        results["configs"].append(res)
        print(format_result(res), flush=True)
        write_json(args.out, results)
    if not args.no_memory_sweep and (not args.only or "memory" in args.only):
        depths = (2, 4, 8, 16, 32) if args.preset == "full" else (2, 8, 32)
        results["memory_sweep"] = memory_sweep(depths)
        for row in results["memory_sweep"]:
            print(
                "memory depth",
                row["depth"],
                "backprop temp MB",
                round(row["backprop"]["temp_bytes"] / 2**20, 1),
                {
                    t: round(row[t]["temp_bytes"] / 2**20, 1)
                    for t in row
                    if isinstance(row[t], dict) and t != "backprop"
                },
                flush=True,
            )
    write_json(args.out, results)
    return results


def format_result(res) -> str:
    lines = [
        f"== {res['name']}: t_fwd {res['t_forward_s'] * 1e3:.2f} ms, backprop {res['t_backprop_s'] * 1e3:.2f} ms, R_b {res['R_b']:.2f}"
    ]
    for v in res["variants"]:
        mem = v.get("memory") or {}
        lines.append(
            f"   {v['tangent']:>11} K={v['num_tangents']}: {v['t_step_s'] * 1e3:8.2f} ms  R_f {v['R_f']:.2f}  "
            f"fg/bp {v['fg_over_bp']:.2f} (paired {v['paired_ratio']:.2f})  temp {mem.get('temp_bytes', 0) / 2**20:.1f} MB"
            + (f"  /K=1 {v['paired_over_k1']:.2f}" if v.get("paired_over_k1") else "")
        )
    bm = (res.get("memory") or {}).get("backprop") or {}
    lines.append(f"   backprop temp {bm.get('temp_bytes', 0) / 2**20:.1f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

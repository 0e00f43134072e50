"""Runtime and memory of a forward-gradient step against a backprop step and a forward pass.

Everything is measured in one process, jitted, warmed up, the candidates interleaved in a
seeded random order each round, reported as medians (:func:`experiments.toolkit.measure_ratios`;
the keys and their meanings: :mod:`experiments.toolkit.ratios`). This script holds the
configurations (``configs/<preset>.json``), the data-parallel variant (``--mesh``) and the
memory sweep (XLA's compiled memory analysis)::

    python -m experiments.benchmarks.main --preset quick --out runtime.json
    python -m experiments.benchmarks.main --preset full --out runtime.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# `--mesh N` on a CPU host: N host devices must be requested before jax is imported.
if "--mesh" in sys.argv[1:-1]:
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        _n = sys.argv[sys.argv.index("--mesh") + 1]
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_n}".strip()

from experiments.benchmarks.train import (
    load_preset,
    measure_sharded,
    memory_sweep,
    run_config,
    tangents_available,
)
from experiments.toolkit import (
    apply_overrides,
    environment,
    mlp_loss,
    mlp_problem,
    write_json,
)


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
        sharded = {"mesh_size": args.mesh, "reps": args.reps or 9, "fsdp": args.fsdp}
        variants = [(t, 1) for t in tangents_available(("rademacher", "normal", "lowrank"))]
        sharded["variants"] = [*variants, ("rademacher", 4), ("normal", 4)]
        for bsz in (64, 1024):
            params, batch = mlp_problem([784, 1024, 1024, 10], bsz)
            res = measure_sharded(mlp_loss, params, batch, **sharded)
            res.update(name=f"mesh {args.mesh}, B={bsz}", batch_size=bsz)
            results["mesh"].append(res)
            print(format_result(res), flush=True)
            sent = [res["backprop_collective_bytes"]]
            sent += [v["collective_bytes"] for v in res["variants"]]
            print(f"   collective bytes (backprop, then each variant): {sent}", flush=True)
    for cfg in load_preset(args.preset):
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
            temp = {t: round(m["temp_bytes"] / 2**20, 1) for t, m in row.items() if type(m) is dict}
            print(f"memory depth {row['depth']}: temp MB {temp}", flush=True)
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

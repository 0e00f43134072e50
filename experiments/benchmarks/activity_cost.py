"""Cost of K tangents with activity perturbation, side by side with backprop (issue 16).

The quality benchmark's steps (Adam, one compiled step per call, not donated) timed in
interleaved rounds (medians of paired ratios): backprop, ``fg_act_k1``, ``fg_act_k16``,
``local_a_split_k16``; with ``--mesh N`` (N host devices, batch sharded, parameters
replicated) the bytes of every collective in the compiled steps against backprop's
(docs/performance.md)::

    python -m experiments.benchmarks.activity_cost --out experiments/results/activity_cost_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass

if "--mesh" in sys.argv:  # host devices must be set before jax is imported
    _n = sys.argv[sys.argv.index("--mesh") + 1]
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_n}"

import jax
import jax.numpy as jnp
import numpy as np

from experiments.quality.methods import init_run, make_method, step
from experiments.toolkit import add_overrides, apply_overrides, environment, write_json
from experiments.toolkit.timing import paired_ratio, time_interleaved
from fgrad_jax._sharding import collective_bytes


@dataclass
class Config:
    """Attributes:
    models: Quality-benchmark models to time (``mlp``, ``cnn``).
    methods: Method names (``experiments/quality/methods.py``); the first is the reference of the ratios.
    batch_size: Examples per step.
    rounds: Timed rounds (interleaved, random order).
    warmup: Untimed rounds.
    mesh: Host devices of the data-parallel byte count (0: skip it).
    mesh_methods: Methods whose collectives are counted.
    """

    models: tuple[str, ...] = ("mlp",)
    methods: tuple[str, ...] = ("backprop", "fg_act_k1", "fg_act_k16", "local_a_split_k16")
    batch_size: int = 128
    rounds: int = 15
    warmup: int = 2
    mesh: int = 0
    mesh_methods: tuple[str, ...] = ("backprop", "fg_act_k4", "fg_act_k32", "fg_rademacher_k4")


def _example(model: str, batch: int) -> tuple[jax.Array, jax.Array]:
    shape = (batch, 784) if model == "mlp" else (batch, 28, 28, 1)
    kx, ky = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, shape), jax.random.randint(ky, (batch,), 0, 10)


def _compiled_step(name: str, model: str, x: jax.Array, y: jax.Array, sharding=None):
    method = make_method(name, model, x[:1] if model == "mlp" else x)
    params, state = init_run(method, 1e-3, 0)
    if sharding is not None:
        x, y = jax.device_put((x, y), sharding)
    fn = jax.jit(lambda p, s, x, y: step(method, 1e-3, 1000.0, p, s, x, y))
    return fn, params, state, x, y


def timing(cfg: Config, model: str) -> dict:
    x, y = _example(model, cfg.batch_size)
    runners = {}
    for name in cfg.methods:
        fn, params, state, xs, ys = _compiled_step(name, model, x, y)
        box = [params, state]

        def call(fn=fn, box=box, xs=xs, ys=ys):
            box[0], box[1], loss = fn(box[0], box[1], xs, ys)
            return loss

        runners[name] = call
    times = time_interleaved(runners, cfg.rounds, cfg.warmup)
    ref = cfg.methods[0]
    out = {n: {"median_s": float(np.median(t))} for n, t in times.items()}
    for n in times:
        out[n][f"ratio_to_{ref}"] = paired_ratio(times[n], times[ref])
    if "fg_act_k1" in times and "fg_act_k16" in times:
        out["fg_act_k16_over_k1"] = paired_ratio(times["fg_act_k16"], times["fg_act_k1"])
    return out


def collectives(cfg: Config) -> dict:
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[: cfg.mesh]), ("data",))
    x, y = _example("mlp", cfg.batch_size)
    sharding = NamedSharding(mesh, P("data"))
    out = {}
    for name in cfg.mesh_methods:
        fn, params, state, xs, ys = _compiled_step(name, "mlp", x, y, sharding)
        hlo = fn.lower(params, state, xs, ys).compile().as_text()
        counted = collective_bytes(hlo)
        out[name] = {"collective_bytes": counted, "total": int(sum(counted.values()))}
    base = out["backprop"]["total"]
    for name in out:
        out[name]["ratio_to_backprop"] = out[name]["total"] / max(base, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    add_overrides(parser, Config, [f for f in Config.__dataclass_fields__])
    args = parser.parse_args(argv)
    cfg = apply_overrides(Config(), args)
    result = {"config": asdict(cfg), "environment": environment(), "timing": {}}
    with jax.numpy_dtype_promotion("standard"):
        for model in cfg.models:
            result["timing"][model] = timing(cfg, model)
            print(f"[activity_cost] {model}: {result['timing'][model]}")
        if cfg.mesh:
            result["collectives"] = collectives(cfg)
            for n, r in result["collectives"].items():
                print(f"[activity_cost] mesh {cfg.mesh} {n}: {r['total']} bytes "
                      f"({r['ratio_to_backprop']:.2f}x backprop)")  # fmt: skip
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()

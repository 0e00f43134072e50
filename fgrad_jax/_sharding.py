"""Helpers to check what a compiled step communicates (used by tests and benchmarks)."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_DTYPE_BYTES = {
    "f32": 4,
    "f16": 2,
    "bf16": 2,
    "f64": 8,
    "s32": 4,
    "u32": 4,
    "s64": 8,
    "u64": 8,
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_LINE = re.compile(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of every collective op in an HLO module's text, by op kind.

    Pass ``jax.jit(step).lower(*args).compile().as_text()``. Async pairs are counted once
    (at their ``-start``); the byte count is that of one device's result buffer.
    """
    out = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        shape, op = m.groups()
        op = op.removesuffix("-start")
        if op not in out:
            continue
        for dt, dims in _SHAPE.findall(shape):
            if dt in _DTYPE_BYTES:
                n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
                out[op] += n * _DTYPE_BYTES[dt]
    return out


def replicated_like(x: Any, ref: Any) -> Any:
    """``x`` constrained to be replicated over the mesh that ``ref`` (a traced array) lives on.

    Tangents depend only on the key, so every device can draw all of them locally. XLA's
    sharding propagation does not know that a draw is cheap: when a stored draw (the
    Gaussian, the low-rank factors) feeds both the JVP and the update of an FSDP-sharded
    parameter, it shards the draw like the parameter and then all-gathers it for the JVP,
    a parameter-sized collective per tangent. Replicating the draw removes it; the update
    then reads the local slice. Without a mesh (one device, or no sharding information in
    the trace) ``x`` is returned unchanged.
    """
    if isinstance(ref, jax.Array) and not isinstance(ref, jax.core.Tracer):
        # Outside jit: a concrete array carries its concrete sharding.
        mesh = getattr(ref.sharding, "mesh", None)
    else:
        try:
            mesh = jax.typeof(ref).sharding.mesh
        except (AttributeError, TypeError):
            return x
    if mesh is None or not getattr(mesh, "axis_names", ()) or mesh.size <= 1:
        return x
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P())), x)


def check_same_key_on_every_process(key: Any, who: str) -> None:
    """In a multi-process run, raises unless every process holds the same ``key``.

    Processes that draw different tangents apply different updates to parameters that are
    meant to be replicated: they drift apart while the all-reduced loss still agrees. One
    small all-gather of the key's words, once, when the transformation is built.
    """
    if jax.process_count() == 1 or isinstance(key, jax.core.Tracer):
        return
    import numpy as np
    from jax.experimental import multihost_utils

    words = np.asarray(jax.random.key_data(key)).reshape(-1)
    every = np.asarray(multihost_utils.process_allgather(words)).reshape(jax.process_count(), -1)
    if not (every == every[0]).all():
        raise ValueError(
            f"{who}'s key differs between the {jax.process_count()} processes (process "
            f"{jax.process_index()} holds {words.tolist()}): each process would draw other "
            "tangents and the replicated parameters would drift apart. Seed it identically "
            "on every process (e.g. key=0, not a key folded with jax.process_index()); keys "
            "for dropout or data order may differ per process, this one may not."
        )

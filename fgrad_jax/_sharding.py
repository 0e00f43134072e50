"""Helpers to check what a compiled step communicates (used by tests and benchmarks)."""

from __future__ import annotations

import math
import re

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

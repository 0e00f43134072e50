"""Memory of compiled programs: XLA's static buffer assignment and the device's peak."""

from __future__ import annotations

from typing import Any

import jax

_FIELDS = ("temp", "argument", "output", "alias", "generated_code")


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis of ``jax.jit(f).lower(...).compile()``, in bytes (``None`` on a
    backend without one): ``temp_bytes`` (the working memory beyond arguments and outputs),
    ``argument_bytes``, ``output_bytes``, ``alias_bytes``, ``generated_code_bytes`` and
    ``total_bytes = temp + argument + output - alias`` (aliased outputs reuse donated
    arguments, so they are counted once)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # a backend without memory analysis raises instead of returning None
        return None
    if ma is None:
        return None
    out = {
        f"{name}_bytes": int(getattr(ma, f"{name}_size_in_bytes"))
        for name in _FIELDS
        if hasattr(ma, f"{name}_size_in_bytes")
    }
    out["total_bytes"] = (
        out.get("temp_bytes", 0)
        + out.get("argument_bytes", 0)
        + out.get("output_bytes", 0)
        - out.get("alias_bytes", 0)
    )
    return out


def memory_of(jitted: Any, *args: Any) -> dict[str, int] | None:
    """:func:`compiled_memory` of ``jitted`` compiled for ``args`` (nothing is run)."""
    return compiled_memory(jitted.lower(*args).compile())


def device_peak_bytes() -> int | None:
    """The first device's peak memory in use so far (``None`` where unsupported, e.g. CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without allocator statistics raise
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None

"""Typed records of the runtime measurements, written to JSON with one meaning everywhere.

Every result file of ``experiments/`` uses these keys with these meanings:

* ``t_forward_s``, ``t_backprop_s``, ``t_step_s``: median seconds of one evaluation of f, one
  backprop SGD step and one forward-gradient SGD step;
* ``R_f = t_step_s / t_forward_s`` and ``R_b = t_backprop_s / t_forward_s`` (Baydin et al.
  2022, Sec. 5);
* ``fg_over_bp = R_f / R_b`` (the ratio of the medians; the paper's MLP: 2.329 / 3.971 =
  0.586);
* ``paired_ratio``: the median over rounds of (fg step time / backprop step time) within the
  same round; ``paired_over_k1`` (K > 1): the same of this step over the same tangent's K = 1
  step;
* memory dicts are :func:`toolkit.memory.compiled_memory` (``temp_bytes``, ``total_bytes``, ...).

A :class:`RatioResult`'s top-level ``R_f``, ``fg_over_bp`` and ``paired_ratio`` are its first
variant's; ``extra`` holds other callables timed in the same rounds, ``device_peak_bytes`` the
device's peak memory in use (``None`` on CPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class VariantTiming:
    """One forward-gradient step variant (``tangent``: a name, or the ``repr`` of a callable),
    timed in the same rounds as f and backprop."""

    tangent: str
    num_tangents: int
    t_step_s: float
    R_f: float
    fg_over_bp: float
    paired_ratio: float
    final_loss: float | None = None
    paired_over_k1: float | None = None
    memory: dict[str, int] | None = None


@dataclasses.dataclass
class RatioResult:
    """f, backprop and forward-gradient steps timed side by side (see the module docstring)."""

    t_forward_s: float
    t_backprop_s: float
    R_b: float
    R_f: float
    fg_over_bp: float
    paired_ratio: float
    reps: int
    variants: list[VariantTiming]
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    calls_per_measurement: dict[str, int] | None = None
    device_peak_bytes: int | None = None

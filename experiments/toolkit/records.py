"""Typed records of the runtime measurements, written to JSON with one meaning everywhere.

Every result file of ``experiments/`` uses these keys with these meanings:

* ``t_forward_s``, ``t_backprop_s``, ``t_step_s``: median seconds of one evaluation of f, one
  backprop SGD step and one forward-gradient SGD step;
* ``R_f = t_step_s / t_forward_s`` and ``R_b = t_backprop_s / t_forward_s`` (Baydin et al.
  2022, Sec. 5);
* ``fg_over_bp = R_f / R_b`` (the ratio of the medians; the paper's MLP: 2.329 / 3.971 =
  0.586);
* ``paired_ratio``: the median over rounds of (fg step time / backprop step time) within the
  same round;
* memory dicts are :func:`toolkit.memory.compiled_memory` (``temp_bytes``, ``total_bytes``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .io import to_jsonable


class Record:
    """Base of the records: ``to_json()`` gives the JSON-friendly dict that is written."""

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(self)


@dataclasses.dataclass
class VariantTiming(Record):
    """One forward-gradient step variant, timed in the same rounds as f and backprop.

    Attributes:
        tangent: Tangent distribution (a name, or the ``repr`` of a callable).
        num_tangents: Tangents per step (K).
        t_step_s: Median seconds of one step.
        R_f: ``t_step_s / t_forward_s``.
        fg_over_bp: ``t_step_s / t_backprop_s`` (= ``R_f / R_b``).
        paired_ratio: Median over rounds of (this step / backprop step) in the same round.
        final_loss: The loss the step reported last (from its own JVP), when it has state.
        paired_over_k1: For K > 1: median over rounds of (this step / the same tangent's
            K = 1 step), when that is timed too.
        memory: Compiled memory of the step.
    """

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
class RatioResult(Record):
    """f, backprop and forward-gradient steps timed side by side (see the module docstring).

    The top-level ``R_f``, ``fg_over_bp`` and ``paired_ratio`` are the first variant's.

    Attributes:
        t_forward_s: Median seconds of one evaluation of f.
        t_backprop_s: Median seconds of one backprop step.
        R_b: ``t_backprop_s / t_forward_s``.
        R_f: First variant's ``R_f``.
        fg_over_bp: First variant's ``fg_over_bp``.
        paired_ratio: First variant's ``paired_ratio``.
        reps: Timed rounds.
        variants: One :class:`VariantTiming` per forward-gradient step.
        memory: ``{"forward": ..., "backprop": ...}`` compiled memory (variants hold theirs).
        extra: Other callables timed in the same rounds: ``{name: {"t_s", "over_jax_backprop"}}``.
        calls_per_measurement: Calls per timed measurement of each candidate.
        device_peak_bytes: The device's peak memory in use (``None`` on CPU).
    """

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

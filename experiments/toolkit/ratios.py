"""R_f, R_b and the forward-gradient / backprop ratios, measured side by side in one process.

Two protocols share the harness (:func:`toolkit.timing.time_interleaved`) and the record
(:class:`RatioResult`), so every result file means the same by each key:

* :func:`measure_ratios`: the benchmark steps (constant-rate SGD; donated buffers threaded
  through each step), any number of tangent variants, one call per measurement;
* :func:`measure_runtime`: the training step of :mod:`toolkit.train` itself (FGD or SGD with
  the experiment's schedule), so that iterations x time per iteration estimates a run's
  time; repeated calls per measurement, because the 2-D functions' steps take microseconds.

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
* memory dicts are :func:`compiled_memory` (``temp_bytes``, ``total_bytes``, ...).

A :class:`RatioResult`'s top-level ``R_f``, ``fg_over_bp`` and ``paired_ratio`` are its first
variant's; ``extra`` holds other callables timed in the same rounds, ``device_peak_bytes`` the
device's peak memory in use (``None`` on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from statistics import median
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fgrad_jax

from .io import to_jsonable
from .timing import Runner, paired_ratio, time_interleaved
from .train import apply_step, make_step, make_tx

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
    counted = sum(out.get(f"{name}_bytes", 0) for name in ("temp", "argument", "output"))
    out["total_bytes"] = counted - out.get("alias_bytes", 0)
    return out


def memory_of(jitted: Any, *args: Any) -> dict[str, int] | None:
    """:func:`compiled_memory` of ``jitted`` compiled for ``args`` (nothing is run)."""
    return compiled_memory(jitted.lower(*args).compile())


def memory_stats() -> dict:
    """The first device's allocator statistics (empty where unsupported, e.g. CPU)."""
    try:
        return dict(jax.devices()[0].memory_stats() or {})
    except Exception:  # backends without allocator statistics raise
        return {}


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


def sgd_step(
    loss_fn: Callable, lr: float, tangent: Any = None, num_tangents: int = 1, key: int = 0
) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, step)``, not jitted: ``step(params, opt_state, batch) -> (params, opt_state,
    loss)``, one SGD step on ``jax.value_and_grad`` (``tangent=None``) or on the forward
    gradient with that tangent (:func:`fgrad_jax.fgd`)."""
    if tangent is None:
        tx = optax.sgd(lr)
    else:
        tx = fgrad_jax.fgd(lr, key=key, num_tangents=num_tangents, tangent=tangent)
    return tx, functools.partial(apply_step, tx, tangent is not None, loss_fn)


def donated_step(
    loss_fn: Callable, lr: float, tangent: Any = None, num_tangents: int = 1
) -> tuple[optax.GradientTransformation, Any]:
    """:func:`sgd_step`, jitted, parameters and optimiser state donated."""
    tx, step = sgd_step(loss_fn, lr, tangent, num_tangents)
    return tx, jax.jit(step, donate_argnums=(0, 1))


def summarise(times: dict[str, list[float]], fg: Sequence[tuple[str, Any, int]]) -> RatioResult:
    """The record of interleaved times of ``"forward"``, ``"backprop"`` and the forward-gradient
    steps ``fg``, listed as ``(name in times, tangent, K)``."""
    t_f, t_b = median(times["forward"]), median(times["backprop"])
    variants = []
    for name, tan, k in fg:
        t = median(times[name])
        v = VariantTiming(
            tangent=tan if isinstance(tan, str) else repr(tan),
            num_tangents=k,
            t_step_s=t,
            R_f=t / t_f,
            fg_over_bp=t / t_b,
            paired_ratio=paired_ratio(times[name], times["backprop"]),
        )
        single = next((n for n, t1, k1 in fg if k1 == 1 and t1 == tan), None)
        if k > 1 and single is not None:
            # Cost of K tangents relative to one, paired within each round.
            v.paired_over_k1 = paired_ratio(times[name], times[single])
        variants.append(v)
    first = variants[0]
    return RatioResult(
        t_forward_s=t_f,
        t_backprop_s=t_b,
        R_b=t_b / t_f,
        R_f=first.R_f,
        fg_over_bp=first.fg_over_bp,
        paired_ratio=first.paired_ratio,
        reps=len(times["forward"]),
        variants=variants,
    )


def measure_ratios(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    variants: Sequence[tuple[Any, int]],
    lr: float = 1e-4,
    reps: int = 15,
    warmup: int = 2,
    memory: bool = True,
) -> dict[str, Any]:
    """Times f, a backprop SGD step and forward-gradient SGD steps, interleaved; medians.

    ``variants``: ``(tangent, num_tangents)`` pairs, all timed in the same rounds. The
    caller's ``params`` are copied, never donated. ``memory``: also XLA's compiled memory
    analysis of each program. Returns a :class:`RatioResult` as a dict.
    """
    fwd = jax.jit(loss_fn)
    fns: dict[str, Callable[[], Any]] = {"forward": lambda: fwd(params, batch)}
    fns["backprop"] = bp = Runner(*donated_step(loss_fn, lr), params, batch)
    fg = [(f"fg{i}", tan, k) for i, (tan, k) in enumerate(variants)]
    runners = [Runner(*donated_step(loss_fn, lr, tan, k), params, batch) for _, tan, k in fg]
    fns |= {name: r for (name, _, _), r in zip(fg, runners)}
    res = summarise(time_interleaved(fns, reps, warmup), fg)
    for v, r in zip(res.variants, runners):
        v.final_loss = float(fgrad_jax.forward_gradient_state(r.state).value)
        v.memory = memory_of(r.step, r.params, r.state, batch) if memory else None
    if memory:
        res.memory = {"forward": memory_of(fwd, params, batch)}
        res.memory["backprop"] = memory_of(bp.step, bp.params, bp.state, batch)
    return to_jsonable(res)


def measure_runtime(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    lr: float = 1e-3,
    decay_k: float = 1e-4,
    rounds: int = 15,
    min_time: float = 0.02,
    seed: int = 0,
    tangent: str = "normal",
) -> dict[str, Any]:
    """R_f and R_b of the experiments' own training step (paper Sec. 5): f, one FGD and one
    backprop iteration (:func:`toolkit.train.make_step`) on the same unstacked parameters and
    batch, each call from the same inputs, a measurement at least ``min_time`` seconds long;
    ``seed`` seeds the call order and the FGD key. A :class:`RatioResult` as a dict, its one
    variant the FGD step."""
    lr_arr = jnp.float32(lr)
    fgd_state = make_tx("fgd", lr, decay_k, key=seed, tangent=tangent).init(params)
    sgd_state = make_tx("sgd", lr, decay_k).init(params)
    programs = {
        "forward": (loss_fn, (params, batch)),
        "fgd": (make_step("fgd", loss_fn, decay_k, tangent), (lr_arr, params, fgd_state, batch)),
        "backprop": (make_step("sgd", loss_fn, decay_k), (lr_arr, params, sgd_state, batch)),
    }
    compiled = {n: (jax.jit(fn).lower(*args).compile(), args) for n, (fn, args) in programs.items()}
    fns = {name: (lambda c=c, a=args: c(*a)) for name, (c, args) in compiled.items()}
    calls: dict[str, int] = {}
    times = time_interleaved(fns, rounds, warmup=1, seed=seed, min_time=min_time, calls_out=calls)
    res = summarise(times, [("fgd", tangent, 1)])
    res.variants[0].memory = compiled_memory(compiled["fgd"][0])
    res.memory = {k: compiled_memory(compiled[k][0]) for k in ("forward", "backprop")}
    res.calls_per_measurement = calls
    res.device_peak_bytes = memory_stats().get("peak_bytes_in_use")
    return to_jsonable(res)

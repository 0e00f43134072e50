"""Trace-time checks that :func:`fgrad_jax.forward_gradient` sits where its estimate is used.

The transformation *replaces* its incoming updates by an estimate computed from ``value_fn``.
Anything that runs before it in a chain, or an optax wrapper that feeds it updates or a
subset of the parameters, would be silently discarded or broken. optax gives a
transformation no handle on its position, so these checks read the Python call stack (only
while tracing, or eagerly): the frames of :func:`optax.chain` and of the wrappers below. If
optax renames them the checks find nothing and stay silent; the tests pin the behaviour.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

# (file name suffix, qualified name) of the optax functions that wrap a transformation in a
# way forward_gradient cannot work inside, with the alternative to name in the error.
_WRAPPERS: dict[tuple[str, str], tuple[str, str]] = {
    ("_accumulation.py", "MultiSteps.init"): (
        "optax.MultiSteps",
        "MultiSteps would call forward_gradient only on every k-th step, on the mean of "
        "updates it never produced. Accumulate the estimates instead: put forward_gradient "
        "first and the wrapper after it, optax.chain(fgrad_jax.forward_gradient(...), "
        "optax.MultiSteps(optimizer, every_k_schedule=k).gradient_transformation()).",
    ),
    ("_masking.py", "masked.<locals>.init_fn"): (
        "optax.masked",
        "masked would hand forward_gradient only part of the parameters, but value_fn needs "
        "all of them. Freeze leaves with forward_gradient(mask=...) (no tangents are spent on "
        "them) and mask the optimizer after it: optax.chain(fgrad_jax.forward_gradient("
        "mask=mask), optax.masked(optimizer, mask)).",
    ),
    ("_combining.py", "partition.<locals>.init_fn"): (
        "optax.multi_transform / optax.partition",
        "it would hand forward_gradient only part of the parameters, but value_fn needs all "
        "of them. Put forward_gradient first and the partition after it: optax.chain("
        "fgrad_jax.forward_gradient(mask=...), optax.multi_transform(transforms, labels)); "
        "use mask= to spend no tangents on frozen leaves (labels mapped to "
        "optax.set_to_zero()).",
    ),
    ("_conditionality.py", "apply_if_finite.<locals>.init"): (
        "optax.apply_if_finite",
        "it checks the updates *before* forward_gradient computes them. Put it after: "
        "optax.chain(fgrad_jax.forward_gradient(on_nonfinite='nan'), "
        "optax.apply_if_finite(optimizer, max_consecutive_errors=k)); a non-finite step then "
        "leaves the parameters and the optimizer's state unchanged.",
    ),
    ("lookahead.py", "lookahead.<locals>.init_fn"): (
        "optax.lookahead",
        "lookahead does not pass value_fn to the transformation it wraps. Estimate the "
        "gradient of the fast parameters with fgrad_jax.forward_grad(loss)(key, params.fast) "
        "and pass it as the updates of optax.lookahead(optimizer, ...).",
    ),
}


def _optax_frames(start: FrameType | None):
    """The consecutive optax frames above ``start`` (a user's own wrapper ends the walk)."""
    frame = start
    while frame is not None and "optax" in frame.f_code.co_filename:
        yield frame
        frame = frame.f_back


def _qualname(frame: FrameType) -> str:
    return getattr(frame.f_code, "co_qualname", frame.f_code.co_name)


_NOT_FIRST = (
    "forward_gradient must be the first transformation of its optax.chain (here it is at "
    "position {position}): it replaces the incoming updates by its estimate, so whatever "
    "runs before it (e.g. clip_by_global_norm, or an optimizer such as adam) would be "
    "silently discarded. Put it first; transformations after it see the estimate: "
    "optax.chain(fgrad_jax.forward_gradient(...), optax.clip_by_global_norm(1.0), "
    "optax.adam(1e-3))."
)


def _position(current: Any, fns: Any) -> int | None:
    """Index of ``current`` in ``fns`` if it is not the first, else ``None``."""
    if current is None or not fns or current is fns[0]:
        return None
    return next((i for i, fn in enumerate(fns) if fn is current), -1)


def check_init_placement() -> None:
    """Raises if ``init`` is called by a wrapper it cannot live in, or not first in a chain."""
    wrapper = None
    for frame in _optax_frames(sys._getframe(2)):
        filename, qualname = frame.f_code.co_filename, _qualname(frame)
        if qualname == "chain.<locals>.init_fn.<locals>.<genexpr>" and frame.f_back is not None:
            # optax.chain's init is ``tuple(fn(params) for fn in init_fns)``.
            position = _position(frame.f_locals.get("fn"), frame.f_back.f_locals.get("init_fns"))
            if position is not None:
                raise ValueError(_NOT_FIRST.format(position=position))
        for (suffix, name), found in _WRAPPERS.items():
            if filename.endswith(suffix) and qualname == name:
                wrapper = found  # the outermost one wins: multi_transform calls masked
    if wrapper is not None:
        name, advice = wrapper
        raise ValueError(
            f"forward_gradient cannot run inside {name}: {advice} "
            "(See 'Where it goes in a chain' in docs/getting_started.md.)"
        )


def check_first_in_chain() -> None:
    """Raises if a transformation runs before forward_gradient in an enclosing optax.chain."""
    for frame in _optax_frames(sys._getframe(2)):
        if _qualname(frame) == "chain.<locals>.update_fn":
            local = frame.f_locals
            position = _position(local.get("fn"), local.get("update_fns"))
            if position is not None:
                raise ValueError(_NOT_FIRST.format(position=position))

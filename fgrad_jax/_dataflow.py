"""Which inputs of a jaxpr each value depends on, read from the program (no evaluation).

Bitmasks over the inputs, carried through every equation; ``stop_gradient`` cuts them.
Calls that the structured-tangent interpreter inlines (``pjit``, ``custom_jvp_call``, ...)
are followed equation by equation; other higher-order primitives (``scan``, ``while``,
``cond``) are entered with every body input depending on all the primitive's inputs, so that
what happens inside them is still seen (``where`` names them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jax.extend import core as jcore

from fgrad_jax import _interpreter

# visit(eqn, masks of its inputs, names of the enclosing non-inlined primitives)
Visitor = Callable[[Any, list[int], tuple[str, ...]], None]


def _union(masks: list[int]) -> int:
    return functools.reduce(lambda a, b: a | b, masks, 0)


def _bodies(eqn: Any) -> list[Any]:
    found = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            body = getattr(v, "jaxpr", v)
            if hasattr(body, "eqns") and hasattr(body, "invars"):
                found.append(body)
    return found


def dependence(
    jaxpr: Any,
    in_masks: list[int],
    visit: Visitor | None = None,
    where: tuple[str, ...] = (),
    const_masks: list[int] | None = None,
    keep: int = 0,
) -> list[int]:
    """Per output of ``jaxpr``, the bitmask of the inputs it depends on; ``visit`` sees every
    equation (inside inlined calls and other higher-order primitives too).
    ``const_masks``: the masks of ``jaxpr``'s constants (default none); ``keep``: the bits
    that ``stop_gradient`` does not cut (a stopped value still depends on the data)."""
    env: dict[Any, int] = dict(zip(jaxpr.constvars, const_masks or []))
    env.update(zip(jaxpr.invars, in_masks))

    def read(v: Any) -> int:
        return 0 if isinstance(v, jcore.Literal) else env.get(v, 0)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if visit is not None:
            visit(eqn, ins, where)
        inner = _interpreter.inline_jaxpr(eqn)
        body = getattr(inner, "jaxpr", inner)
        if eqn.primitive.name == "stop_gradient":
            outs = [m & keep for m in ins]
        elif body is not None and len(body.invars) == len(ins):
            outs = dependence(body, ins, visit, where, keep=keep)
        else:
            everything = _union(ins)
            if visit is not None and everything:
                for sub in _bodies(eqn):
                    # Per input where the body takes the primitive's inputs as they are (scan).
                    masks = ins if len(sub.invars) == len(ins) else [everything] * len(sub.invars)
                    inside = (*where, eqn.primitive.name)
                    consts = [everything] * len(sub.constvars)
                    dependence(sub, masks, visit, inside, consts, keep)
            outs = [everything] * len(eqn.outvars)
        for v, m in zip(eqn.outvars, outs):
            env[v] = m
    return [read(v) for v in jaxpr.outvars]


KERNEL_OPS = ("dot_general", "conv_general_dilated")


def weight_perturbed_kernels(
    closed: Any, num_leaves: int, sites: set[int], batch: int
) -> dict[int, str]:
    """Leaves (indices into ``closed``'s inputs) used as the kernel of a dense/conv op that
    is not in ``sites`` (ids of the equations activity perturbation took), each with where
    that op is. A kernel is an operand computed from the leaves alone: operands that
    depend on the batch (a closed-over value with ``batch`` rows) are activations."""
    data = 1 << num_leaves
    rows = [getattr(v.aval, "shape", ()) for v in closed.jaxpr.constvars]
    consts = [data if shape and shape[0] == batch else 0 for shape in rows]
    found: dict[int, str] = {}

    def visit(eqn: Any, ins: list[int], where: tuple[str, ...]) -> None:
        if eqn.primitive.name not in KERNEL_OPS or id(eqn) in sites:
            return
        for m in ins[:2]:
            if m & data:
                continue
            for leaf in range(num_leaves):
                if m >> leaf & 1 and leaf not in found:
                    inside = f" inside `{'` in `'.join(reversed(where))}`" if where else ""
                    found[leaf] = f"`{eqn.primitive.name}`{inside}"

    leaves = [1 << i for i in range(num_leaves)]
    dependence(closed.jaxpr, leaves, visit, const_masks=consts, keep=data)
    return found


def check_no_fallback(
    closed: Any, num_leaves: int, sites: set[int], names: tuple[str, ...], batch: int
) -> None:
    """Raises, naming them, if kernels would silently be weight-perturbed."""
    fallen = weight_perturbed_kernels(closed, num_leaves, sites, batch)
    if fallen:
        listed = "; ".join(
            f"{names[leaf] or '<root>'} (kernel of {op})" for leaf, op in sorted(fallen.items())
        )
        raise ValueError(
            f"perturb='activations' cannot perturb the outputs of these kernels: {listed}. "
            "Each reaches its dense/conv op through something other than reshapes, "
            "transposes, casts and sharding constraints, so it would silently get the "
            "weight-perturbed estimate. Fixes: apply the kernel directly in the layer (move "
            "weight arithmetic, scans over layers or wrappers out of the differentiated "
            "path), or accept weight perturbation for them explicitly: "
            "tangent=fgrad_jax.activity_perturbation(fallback='weights'). "
            "fgrad_jax.diagnostics.perturbation_report(fn, *args) lists every leaf."
        )

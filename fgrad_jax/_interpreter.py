"""The structured-tangent JVP: a jaxpr interpreter whose tangents need not be dense arrays.

:func:`structured_jvp` is ``jax.jvp`` for a function whose input tangents may be

* dense arrays (``None`` where an input has no tangent),
* :class:`LazyTangent` s: dense tangents drawn right before the first operation that uses
  them (the counter-hash tangents are drawn this way), or
* any :class:`StructuredTangent` that a rule knows, such as the factored low-rank tangents
  of ``_lowrank.py``, whose strategy passes its rules for ``dot_general`` and
  ``conv_general_dilated`` with each call (``rules=``).

An equation with no tangent input is evaluated as is. ``jit``/``pjit``, ``closed_call`` and
``custom_vjp_call`` equations are interpreted inline (a ``custom_vjp`` function is
differentiated through its primal definition: ``jax.jvp`` refuses them, but the forward
gradient never needs the custom backward rule). For every other equation the caller's
rules, then :data:`CORE_RULES`, are tried in order; a rule returns ``None`` when it does
not handle the layout, and then the fallback densifies structured tangents and runs the
primitive's own JVP rule (always correct, only slower; :func:`recording` counts both
outcomes for tests).

The interpreter is also where XLA's scheduling is steered, by data dependences that do not
change any value (the :class:`Schedule`):

* a lazy draw's seed is combined with :func:`fake_zero` of another input of its consuming
  operation, so it is drawn when that input exists and not hoisted to the start;
* after each ``dot_general``/``conv_general_dilated`` the primal output is tied to its own
  tangent (:func:`tie_to_tangent`), so the primal chain cannot run ahead of the tangent
  chain and keep its activations alive (which would make the working memory grow with depth).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# The schedule is part of the interpreter's API: strategies read it from here.
from fgrad_jax._schedule import (  # noqa: F401
    MULTI_DEVICE,
    SINGLE_DEVICE,
    TIED_PRIMITIVES,
    Schedule,
    fake_zero,
    schedule_for,
    store_once,
    tie_to_tangent,
)

Array = jax.Array

# ----------------------------------------------------------------------------- tangents


class LazyTangent:
    """A dense tangent drawn where it is first used: ``make(zero)``, where ``zero`` is a
    fake zero from another input of the consuming operation (see :func:`fake_zero`)."""

    def __init__(self, make: Callable[[Array], Array]):
        self.make = make
        self.value: Array | None = None

    def materialize(self, anchor: Array | None = None) -> Array:
        if self.value is None:
            self.value = self.make(fake_zero(anchor))
        return self.value


class StructuredTangent(abc.ABC):
    """A tangent kept in a form cheaper than a dense array; ``dense()`` forms it.

    Subclass it: rules (passed to :func:`structured_jvp`) handle the form, and every
    operation no rule handles gets ``dense()`` and the primitive's own JVP.
    """

    @abc.abstractmethod
    def dense(self) -> Array: ...


class Rule(Protocol):
    """``rule(eqn, primals, tangents) -> (outs, tangent_outs)`` or ``None`` if not handled."""

    def __call__(
        self, eqn: Any, primals: list[Any], tangents: list[Any]
    ) -> tuple[list[Any], list[Any]] | None: ...


_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "jaxpr"}
_INLINE_CUSTOM = {"custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
_counters: list[collections.Counter] = []


def _is_structured(t: Any) -> bool:
    return isinstance(t, StructuredTangent)


@contextlib.contextmanager
def recording() -> Iterator[collections.Counter]:
    """Counts, while tracing inside the block, equations that a rule handled (``"rule"``)
    and fallbacks that had to densify a structured tangent (``"densified"``)."""
    counter: collections.Counter = collections.Counter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _count(what: str) -> None:
    for c in _counters:
        c[what] += 1


def _dense(t: Any) -> Any:
    if isinstance(t, LazyTangent):
        return t.materialize()
    return t.dense() if _is_structured(t) else t


def _is_anchor(p: Any) -> bool:
    dtype = getattr(p, "dtype", None)
    if dtype is None or getattr(p, "size", 0) == 0:
        return False
    return bool(jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_)


# ----------------------------------------------------------------------------- evaluation


def bind_params(eqn: Any) -> tuple[list[Any], dict[str, Any]]:
    res = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict):  # older jax
        return list(res[0]), res[1]
    return [], res


def _fallback(eqn: Any, primals: list[Any], tangents: list[Any]) -> tuple[list[Any], list[Any]]:
    subfuns, bound = bind_params(eqn)
    idx = [i for i, t in enumerate(tangents) if t is not None]
    if any(_is_structured(tangents[i]) for i in idx):
        _count("densified")

    def g(*xs):
        full = list(primals)
        for i, x in zip(idx, xs):
            full[i] = x
        out = eqn.primitive.bind(*subfuns, *full, **bound)
        return list(out) if eqn.primitive.multiple_results else [out]

    try:
        outs, touts = jax.jvp(g, [primals[i] for i in idx], [_dense(tangents[i]) for i in idx])
    except TypeError as err:
        if "custom_vjp" not in str(err):
            raise
        raise TypeError(
            f"A function defined with jax.custom_vjp is called inside `{eqn.primitive.name}`, "
            "where fgrad_jax cannot reach its primal definition (forward-mode needs it: "
            "jax.jvp refuses custom_vjp functions). Fixes: call it outside "
            f"`{eqn.primitive.name}` (e.g. unroll the loop), give it a jax.custom_jvp rule, "
            "or train with fgrad_jax.spsa_gradient, which needs no derivatives."
        ) from err
    return outs, touts


def inline_jaxpr(eqn: Any) -> Any | None:
    name = eqn.primitive.name
    param = _INLINE.get(name) or _INLINE_CUSTOM.get(name)
    return eqn.params.get(param) if param else None


def has_custom_vjp(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or a sub-jaxpr the interpreter inlines) calls a ``custom_vjp``
    function, which :func:`jax.jvp` refuses and :func:`structured_jvp` differentiates."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _INLINE_CUSTOM:
            return True
        inner = inline_jaxpr(eqn)
        if inner is not None and has_custom_vjp(getattr(inner, "jaxpr", inner)):
            return True
    return False


def has_outgrowing_dot(jaxpr: Any, min_bytes: int = 0) -> bool:
    """Whether ``jaxpr`` (or a sub-jaxpr the interpreter inlines) has a ``dot_general``
    whose output takes more bytes than its inputs, and at least ``min_bytes``: where
    :func:`_dot_concat_rule` and the primal-tangent tie change the program (and save an
    output-sized buffer)."""
    for eqn in jaxpr.eqns:
        if (
            eqn.primitive.name == "dot_general"
            and _outgrows_inputs(eqn)
            and nbytes(eqn.outvars[0].aval) >= min_bytes
        ):
            return True
        inner = inline_jaxpr(eqn)
        if inner is not None and has_outgrowing_dot(getattr(inner, "jaxpr", inner), min_bytes):
            return True
    return False


def _anchor_for(primals: list[Any], tangents: list[Any]) -> Any:
    # Prefer another input's dense tangent: the draws then follow the tangent chain that
    # consumes them, not the primal chain, which XLA may run far ahead.
    for t in tangents:
        dense = t is not None and not isinstance(t, LazyTangent) and not _is_structured(t)
        if dense and _is_anchor(t):
            return t
    for p, t in zip(primals, tangents):
        if not isinstance(t, LazyTangent) and _is_anchor(p):
            return p
    return None


def nbytes(aval: Any) -> int:
    """Bytes of an abstract value; 0 for what has no array layout (tokens) and for
    extended dtypes such as PRNG keys (a few words each)."""
    if not hasattr(aval, "shape") or not hasattr(aval, "dtype"):
        return 0
    try:
        itemsize = np.dtype(aval.dtype).itemsize
    except TypeError:
        return 0
    return math.prod(aval.shape) * itemsize


def _outgrows_inputs(eqn: Any) -> bool:
    """Whether the equation's outputs take more bytes than its inputs (e.g. a language
    model's logits from its activations and vocabulary matrix).

    Such an output is not tied to its tangent: the tie is an elementwise op whose result
    XLA stores beside the untied output, one more output-sized buffer, and it only pays
    where outputs are small next to what the next layers need (deep stacks of layers).
    """
    ins = sum(nbytes(v.aval) for v in eqn.invars)
    return sum(nbytes(v.aval) for v in eqn.outvars) > ins


def _eval(jaxpr, consts, primals, tangents, schedule: Schedule, rules=None):
    env: dict[Any, tuple[Any, Any]] = {}

    def read(v):
        if isinstance(v, jcore.Literal):
            return v.val, None
        return env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = (c, None)
    for v, p, t in zip(jaxpr.invars, primals, tangents):
        env[v] = (p, t)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        ps = [a for a, _ in ins]
        ts = [b for _, b in ins]
        inner = inline_jaxpr(eqn)
        if inner is None and any(isinstance(t, LazyTangent) for t in ts):
            anchor = _anchor_for(ps, ts) if schedule.anchor_draws else None
            ts = [t.materialize(anchor) if isinstance(t, LazyTangent) else t for t in ts]
        if all(t is None for t in ts):
            subfuns, bound = bind_params(eqn)
            out = eqn.primitive.bind(*subfuns, *ps, **bound)
            outs = list(out) if eqn.primitive.multiple_results else [out]
            touts = [None] * len(outs)
        elif inner is not None:
            body = inner.jaxpr if hasattr(inner, "jaxpr") else inner
            outs, touts = _eval(body, getattr(inner, "consts", ()), ps, ts, schedule, rules)
        else:
            name = eqn.primitive.name
            res = None
            given = rules.get(name, ()) if rules else ()
            for rule in (*given, *CORE_RULES.get(name, ())):
                res = rule(eqn, ps, ts)
                if res is not None:
                    _count("rule")
                    break
            if res is None:
                res = _fallback(eqn, ps, ts)
            outs, touts = res
            if schedule.tie_primal and name in TIED_PRIMITIVES and not _outgrows_inputs(eqn):
                outs = [
                    tie_to_tangent(o, t)
                    if t is not None
                    and not _is_structured(t)
                    and jnp.issubdtype(jnp.result_type(o), jnp.floating)
                    and _is_anchor(t)
                    else o
                    for o, t in zip(outs, touts)
                ]
        for v, o, t in zip(eqn.outvars, outs, touts):
            env[v] = (o, t)
    outs = [read(v) for v in jaxpr.outvars]
    return [o for o, _ in outs], [t for _, t in outs]


def _dot_concat_rule(eqn: Any, primals: list[Any], tangents: list[Any]) -> Any:
    """``ẋ·y + x·ẏ`` as one product ``[ẋ, x]·[y; ẏ]`` (operands joined along a contracting
    axis) when the output is larger than both operands together.

    The two-product form keeps two output-sized buffers alive before the add (XLA:CPU does
    not accumulate one product into the other); for a language model's vocabulary
    projection that is an extra logits-sized buffer, more than the whole forward pass's
    working memory. Joining copies the operands instead, which is cheaper exactly when
    they are smaller than the output.
    """
    (x, y), (tx, ty) = primals, tangents
    if tx is None or ty is None or _is_structured(tx) or _is_structured(ty):
        return None
    (lhs_contract, rhs_contract), _ = eqn.params["dimension_numbers"]
    if not lhs_contract or not _outgrows_inputs(eqn):
        return None
    subfuns, params = bind_params(eqn)
    joined_x = jnp.concatenate([tx.astype(x.dtype), x], axis=lhs_contract[0])
    joined_y = jnp.concatenate([y, ty.astype(y.dtype)], axis=rhs_contract[0])
    primal_out = eqn.primitive.bind(*subfuns, x, y, **params)
    return [primal_out], [eqn.primitive.bind(*subfuns, joined_x, joined_y, **params)]


#: Rules every evaluation tries after the caller's own (``rules=``).
CORE_RULES: dict[str, tuple[Rule, ...]] = {"dot_general": (_dot_concat_rule,)}


def jvp_jaxpr(
    closed: Any,
    primals: Sequence[Array],
    tangents: Sequence[Any],
    schedule: Schedule = SINGLE_DEVICE,
    rules: Mapping[str, Sequence[Rule]] | None = None,
) -> tuple[list[Any], list[Any]]:
    """The JVP of a closed jaxpr: flat lists ``(outs, tangent_outs)``, tangents dense.

    ``rules`` are the caller's rules by primitive name, tried before :data:`CORE_RULES`
    (the low-rank tangents' rules; activity perturbation's, which carry per-call state).
    """
    outs, touts = _eval(closed.jaxpr, closed.consts, list(primals), list(tangents), schedule, rules)
    touts = [
        jnp.zeros(jnp.shape(o), jnp.result_type(o)) if t is None else _dense(t)
        for o, t in zip(outs, touts)
    ]
    return outs, touts


def structured_jvp(
    fn: Callable[..., Any],
    primals: Sequence[Array],
    tangents: Sequence[Any],
    schedule: Schedule = SINGLE_DEVICE,
    rules: Mapping[str, Sequence[Rule]] | None = None,
) -> tuple[Any, Any]:
    """``jax.jvp(fn, primals, tangents)`` where tangents may be lazy or structured.

    ``fn`` returns a pytree; returns ``(out, tangent_out)`` with dense output tangents
    (zeros where an output does not depend on the inputs). ``rules``: as in
    :func:`jvp_jaxpr`.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*primals)
    outs, touts = jvp_jaxpr(closed, primals, tangents, schedule, rules)
    treedef = jax.tree_util.tree_structure(out_shape)
    return jax.tree_util.tree_unflatten(treedef, outs), jax.tree_util.tree_unflatten(treedef, touts)

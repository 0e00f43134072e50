"""The traced JVP of activity perturbation: sites, views, the per-example cotangents.

:func:`trace_jvp` runs one JVP of a traced program with the rules of a :class:`Trace`:
every ``dot_general``/``conv_general_dilated`` whose kernel is a differentiated leaf (seen
through the view primitives) becomes a *site* whose output gets a per-example tangent, a
bias added right after it shares that tangent, and every other use of a leaf gets a dense
weight tangent. :meth:`Trace.cotangents` and :meth:`Trace.contract` then turn the
directional derivatives into the estimate (see ``_activity.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from fgrad_jax import _interpreter, _random

Array = jax.Array

_VIEW_PRIMITIVES = (
    "sharding_constraint",
    "reshape",
    "broadcast_in_dim",
    "convert_element_type",
    "transpose",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
)


class View(_interpreter.StructuredTangent):
    """A differentiated leaf seen through a structural linear map: ``fn(leaf)``."""

    def __init__(self, trace: Trace, leaf: int, fn: Callable[[Array], Array]):
        self.trace, self.leaf, self.fn = trace, leaf, fn

    def dense(self) -> Array:
        # Any use that no rule handles is weight-perturbed with the leaf's own tangent.
        return self.fn(self.trace.weight_tangent(self.leaf))


@dataclasses.dataclass
class _Site:
    """A dense/conv op whose output is perturbed: ``op(lhs, kernel(leaf))``."""

    leaf: int
    op: Callable[[Array, Array], Array]  # (input, kernel) -> output, linear in the kernel
    kernel: Callable[[Array], Array]  # leaf value -> the op's kernel operand
    lhs: Array
    u: Array
    name: str
    bias: tuple[int, Callable[[Array], Array]] | None = None


def _bind(primitive: Any, params: dict[str, Any], lhs: Array, rhs: Array) -> Array:
    return primitive.bind(lhs, rhs, **params)


def _op_of(site: _Site, lhs: Array, w: Array) -> Array:
    return site.op(lhs, site.kernel(w))


def _broadcast_view(fn: Callable[[Array], Array], shape: tuple[int, ...], w: Array) -> Array:
    return jnp.broadcast_to(fn(w), shape)


def use_counts(jaxpr: Any, counts: collections.Counter) -> collections.Counter:
    """How often each variable is read, through the sub-jaxprs the interpreter inlines."""
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                counts[v] += 1
        inner = _interpreter.inline_jaxpr(eqn)
        if inner is not None:
            use_counts(inner.jaxpr if hasattr(inner, "jaxpr") else inner, counts)
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            counts[v] += 1
    return counts


class Trace:
    """Per-JVP state: the draws, the perturbed sites and the weight-perturbed leaves."""

    def __init__(self, strategy, key, primals, batch, uses, activations):
        self.strategy, self.key, self.primals = strategy, key, primals
        self.batch, self.uses, self.activations = batch, uses, activations
        self.sites: list[_Site] = []
        self.by_var: dict[Any, _Site] = {}
        self.weights: dict[int, Array] = {}
        self.site_eqns: set[int] = set()  # ids of the dot/conv equations turned into sites
        self.draws = 0
        self.rules = {
            "dot_general": [self._op_rule],
            "conv_general_dilated": [self._op_rule],
            "add": [self._bias_rule],
            "stop_gradient": [lambda eqn, ps, ts: ([eqn.primitive.bind(*ps)], [None])],
            "optimization_barrier": [self._barrier_rule],
            **{p: [self._view_rule] for p in _VIEW_PRIMITIVES},
        }

    def draw(self, shape: tuple[int, ...], dtype: Any) -> Array:
        seed = _random.seed_words(_random.fold_in(self.key, self.draws), 1)[0]
        self.draws += 1
        return self.strategy.base.draw(seed, shape).astype(dtype)

    def weight_tangent(self, leaf: int) -> Array:
        if leaf not in self.weights:
            p = self.primals[leaf]
            self.weights[leaf] = self.draw(p.shape, p.dtype)
        return self.weights[leaf]

    def _view_rule(self, eqn, primals, tangents):
        if not isinstance(tangents[0], View) or any(t is not None for t in tangents[1:]):
            return None
        subfuns, params = _interpreter.bind_params(eqn)
        if subfuns or eqn.primitive.multiple_results:
            return None
        out = eqn.primitive.bind(*primals, **params)
        if not jnp.issubdtype(out.dtype, jnp.floating):
            return None
        view, rest = tangents[0], primals[1:]
        fn = lambda w: eqn.primitive.bind(view.fn(w), *rest, **params)
        return [out], [View(self, view.leaf, fn)]

    def _barrier_rule(self, eqn, primals, tangents):
        # The barrier orders the primal computation; leaves' views pass through as they are.
        live = [t for t in tangents if t is not None]
        if not live or not all(isinstance(t, View) for t in live):
            return None
        return list(eqn.primitive.bind(*primals, **eqn.params)), list(tangents)

    def _op_rule(self, eqn, primals, tangents):
        lhs, rhs = primals
        tl, tr = tangents
        if not self.activations or not isinstance(tr, View):
            return None
        name = eqn.primitive.name
        _, params = _interpreter.bind_params(eqn)
        out = eqn.primitive.bind(lhs, rhs, **params)
        batch_first = name != "conv_general_dilated" or params["dimension_numbers"].out_spec[0] == 0
        if out.ndim == 0 or out.shape[0] != self.batch or not batch_first:
            raise ValueError(
                f"perturb='activations': the output of `{name}` (operands "
                f"{tuple(lhs.shape)} and {tuple(rhs.shape)} -> {tuple(out.shape)}) does not "
                f"have the batch axis first (the per-example losses have shape "
                f"({self.batch},)). Put the batch axis first in every dense/conv layer that "
                "uses a trained kernel, or use perturb='weights'."
            )
        u = self.draw(out.shape, out.dtype)
        t_out = u
        if tl is not None:
            tl = tl.dense() if isinstance(tl, View) else tl
            t_out = t_out + eqn.primitive.bind(tl, rhs, **params).astype(out.dtype)
        site = _Site(tr.leaf, functools.partial(_bind, eqn.primitive, params), tr.fn, lhs, u, name)
        self.sites.append(site)
        self.site_eqns.add(id(eqn))
        self.by_var[eqn.outvars[0]] = site
        return [out], [t_out]

    def _bias_rule(self, eqn, primals, tangents):
        for i in (0, 1):
            var, view = eqn.invars[i], tangents[1 - i]
            site = None if isinstance(var, jcore.Literal) else self.by_var.get(var)
            if site is None or not isinstance(view, View):
                continue
            if site.bias is not None or self.uses[var] != 1:
                return None
            out = eqn.primitive.bind(*primals)
            if out.shape != primals[i].shape:
                return None
            site.bias = (view.leaf, functools.partial(_broadcast_view, view.fn, out.shape))
            return [out], [tangents[i]]
        return None

    def cotangents(self, d: Array, columns: tuple[Any, ...] | None, coupled: bool) -> Kept:
        """This tangent's share of the estimate, before any weight contraction: the
        cotangent ``d ⊙ u`` of every site (float32) and each weight-perturbed leaf's
        ``mean_b(d_b) v``. Both are linear in the tangent, so the K tangents' shares are
        summed before :meth:`contract` applies each op's transposed map once."""
        d = d.astype(jnp.float32)
        # Examples coupled through the batch (BatchNorm in training mode): example b's
        # activations move every example's loss, so u_b is scored by the derivative of the
        # whole batch's loss, which keeps E[.] = the gradient (at a higher variance).
        d_sites = jnp.broadcast_to(jnp.sum(d, axis=0, keepdims=True), d.shape) if coupled else d

        def column(leaf, d=d):
            if columns is None:
                return d
            spec = columns[leaf]
            return d[:, spec] if isinstance(spec, int) else spec.total(d)

        def scaled(site):
            spec = None if columns is None else columns[site.leaf]
            if isinstance(spec, Columns) and spec.split:
                return spec.per_element(d_sites, site.u.astype(jnp.float32), site.name)
            dl = column(site.leaf, d_sites)
            return site.u.astype(jnp.float32) * dl.reshape((-1,) + (1,) * (site.u.ndim - 1))

        weights = {
            leaf: jnp.mean(column(leaf)) * v.astype(jnp.float32) for leaf, v in self.weights.items()
        }
        return Kept([scaled(site) for site in self.sites], weights)

    def contract(self, kept: Kept, inputs: list[Array]) -> list[Array]:
        """Per leaf: ``(1/B) Σ_sites J_siteᵀ ct_site`` plus the weight-perturbed terms, for
        cotangents already summed over the tangents (one contraction per site); ``inputs``
        are the sites' ``lhs`` as returned from the vmap over tangents."""
        out = [jnp.zeros(p.shape, jnp.float32) for p in self.primals]

        def add(leaf, fn, ct):
            _, pull = jax.vjp(fn, self.primals[leaf])
            (g,) = pull(ct.astype(jnp.result_type(fn(self.primals[leaf]))))
            out[leaf] = out[leaf] + g.astype(jnp.float32) * np.float32(1 / self.batch)

        for site, ct, lhs in zip(self.sites, kept.cotangents, inputs):
            add(site.leaf, functools.partial(_op_of, site, lhs), ct)
            if site.bias is not None:
                add(site.bias[0], site.bias[1], ct)
        for leaf, term in kept.weights.items():
            out[leaf] = out[leaf] + term
        return out


class Kept(NamedTuple):
    """What one tangent's JVP keeps for the update: the site cotangents, in the order of
    ``Trace.sites``, and the weight-perturbed leaves' terms (leaf index -> term)."""

    cotangents: list[Array]
    weights: dict[int, Array]


class Columns(NamedTuple):
    """The loss columns ``start .. start + size - 1`` of one block split into patches/groups.

    The columns are laid out patch-major, group-minor: column ``start + p * groups + g`` is
    patch ``p`` (row-major over the grid ``patches``) and channel group ``g``. A leaf with
    ``split=False`` (heads, weight-perturbed leaves) is estimated from the sum of the
    block's columns. With ``split=True`` (the block's own dense/conv op) each element of an
    activity perturbation ``u`` of shape ``(B, s_1, ..., s_n, C)`` is scaled by the
    derivative of its own column only: position ``i`` along spatial axis ``k`` belongs to
    patch row ``i * patches[k] // s_k`` and channel ``c`` to group ``c * groups // C``.
    """

    start: int
    patches: tuple[int, ...]
    groups: int
    split: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.patches, dtype=np.int64)) * self.groups

    def total(self, d: Array) -> Array:
        return jnp.sum(d[:, self.start : self.start + self.size], axis=1)

    def per_element(self, d: Array, u: Array, name: str) -> Array:
        n, g = len(self.patches), self.groups
        sizes = u.shape[1:-1]
        if (
            (n and len(sizes) != n)
            or u.shape[-1] % g
            or any(s % p for s, p in zip(sizes, self.patches))
        ):
            raise ValueError(
                f"Patch-/group-wise local losses: the output of `{name}` has shape "
                f"{tuple(u.shape)}, which does not split into patches {self.patches} (one per "
                f"spatial axis) and {g} channel groups. Train with the input shape given to "
                "init(), or choose patches/groups that divide this output."
            )
        # The column derivatives expanded to u's own shape (each repeated over its patch's
        # rows and its group's channels) rather than u reshaped into patch/group axes: with
        # the K tangents' cotangents summed before a convolution's kernel contraction, the
        # reshaped form miscompiled on XLA:CPU (jax 0.10.2: NaNs, then a segfault).
        b = u.shape[0]
        grid = self.patches if n else (1,) * len(sizes)
        dl = d[:, self.start : self.start + self.size].reshape(b, *grid, g)
        for axis, (s, p) in enumerate(zip(sizes, grid), start=1):
            dl = jnp.repeat(dl, s // p, axis=axis)
        return u * jnp.repeat(dl, u.shape[-1] // g, axis=-1)


def trace_jvp(
    strategy: Any,
    closed: Any,
    primals: list[Array],
    key: Array,
    batch: int,
    activations: bool,
    schedule: _interpreter.Schedule | None = None,
) -> tuple[Trace, list[Array], list[Array]]:
    """One JVP of the traced program ``closed`` with activity perturbation's rules:
    ``(trace, outputs, output tangents)``; ``trace`` lists what became a site."""
    uses = use_counts(closed.jaxpr, collections.Counter())
    trace = Trace(strategy, key, primals, batch, uses, activations)
    views = [View(trace, i, lambda w: w) for i in range(len(primals))]
    kwargs = {} if schedule is None else {"schedule": schedule}
    outs, touts = _interpreter.jvp_jaxpr(closed, primals, views, rules=trace.rules, **kwargs)
    return trace, outs, touts

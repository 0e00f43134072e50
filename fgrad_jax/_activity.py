"""Activity perturbation (Ren, Kornblith, Liao & Hinton 2023): tangents at op outputs.

With ``perturb="activations"`` the loss returns per-example losses ``L_b`` (shape ``(B,)``)
and the estimate is of ``∇ (1/B) Σ_b L_b``. Instead of a tangent on a kernel ``W``, a
tangent ``u`` (``E[u uᵀ] = I``, one independent entry per example and output unit) is
injected at the output ``y = op(x, W)`` of every ``dot_general`` and
``conv_general_dilated`` whose right-hand operand is a differentiated leaf (seen through
reshapes, broadcasts, transposes and dtype casts). One JVP of the loss vector gives the
per-example directional derivatives ``d_b = Σ_sites ∂L_b/∂y_b · u_b + (weight part)``, so
``d_b u_b`` is an unbiased estimate of ``∂L_b/∂y_b`` and

    g_W = (1/B) Σ_b J_bᵀ (d_b u_b),   J = ∂op(x, W)/∂W,

which for ``y = x W`` is ``xᵀ (d ⊙ u) / B``. ``J_bᵀ`` is the op's own transposed linear
map in ``W`` (:func:`jax.vjp` of that one op w.r.t. its kernel, at the cotangent
``d ⊙ u``): a local computation per op, never a backward pass through the network.

A bias added right after such an op (``y + b``, ``y`` used by nothing else) gets
``Σ_b (d ⊙ u)_b / B`` from the same ``u``. Every other use of a leaf (LayerNorm scales,
embeddings looked up by gather, a kernel used as the left operand, a bias that is not
added directly to a perturbed output) is weight-perturbed within the same JVP: it gets a
dense tangent ``v`` and the estimate ``mean_b(d_b) v``. Unbiasedness needs the examples to
be independent (``L_b`` depends on example ``b`` only; no BatchNorm in training mode).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from fgrad_jax import _interpreter, _random
from fgrad_jax._dataflow import check_no_fallback, weight_perturbed_kernels
from fgrad_jax._strategy import Direction, Selection, TangentStrategy
from fgrad_jax._tangents import HASHED

Array = jax.Array

PERTURB = ("weights", "activations")
FALLBACK = ("error", "weights")
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


class _View:
    """A differentiated leaf seen through a structural linear map: ``fn(leaf)``."""

    def __init__(self, trace: _Trace, leaf: int, fn: Callable[[Array], Array]):
        self.trace, self.leaf, self.fn = trace, leaf, fn

    def dense(self) -> Array:
        # Any use that no rule handles is weight-perturbed with the leaf's own tangent.
        return self.fn(self.trace.weight_tangent(self.leaf))


_interpreter.register_structured_type(_View)


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


def _use_counts(jaxpr: Any, counts: collections.Counter) -> collections.Counter:
    """How often each variable is read, through the sub-jaxprs the interpreter inlines."""
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                counts[v] += 1
        inner = _interpreter._inline_jaxpr(eqn)
        if inner is not None:
            _use_counts(inner.jaxpr if hasattr(inner, "jaxpr") else inner, counts)
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            counts[v] += 1
    return counts


class _Trace:
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
        if not isinstance(tangents[0], _View) or any(t is not None for t in tangents[1:]):
            return None
        subfuns, params = _interpreter._bind_params(eqn)
        if subfuns or eqn.primitive.multiple_results:
            return None
        out = eqn.primitive.bind(*primals, **params)
        if not jnp.issubdtype(out.dtype, jnp.floating):
            return None
        view, rest = tangents[0], primals[1:]
        fn = lambda w: eqn.primitive.bind(view.fn(w), *rest, **params)
        return [out], [_View(self, view.leaf, fn)]

    def _barrier_rule(self, eqn, primals, tangents):
        # The barrier orders the primal computation; leaves' views pass through as they are.
        live = [t for t in tangents if t is not None]
        if not live or not all(isinstance(t, _View) for t in live):
            return None
        return list(eqn.primitive.bind(*primals, **eqn.params)), list(tangents)

    def _op_rule(self, eqn, primals, tangents):
        lhs, rhs = primals
        tl, tr = tangents
        if not self.activations or not isinstance(tr, _View):
            return None
        name = eqn.primitive.name
        _, params = _interpreter._bind_params(eqn)
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
            tl = tl.dense() if isinstance(tl, _View) else tl
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
            if site is None or not isinstance(view, _View):
                continue
            if site.bias is not None or self.uses[var] != 1:
                return None
            out = eqn.primitive.bind(*primals)
            if out.shape != primals[i].shape:
                return None
            site.bias = (view.leaf, functools.partial(_broadcast_view, view.fn, out.shape))
            return [out], [tangents[i]]
        return None

    def cotangents(self, d: Array, groups: tuple[Any, ...] | None, coupled: bool) -> Kept:
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
            if groups is None:
                return d
            spec = groups[leaf]
            return d[:, spec] if isinstance(spec, int) else spec.total(d)

        def scaled(site):
            spec = None if groups is None else groups[site.leaf]
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
    ``_Trace.sites``, and the weight-perturbed leaves' terms (leaf index -> term)."""

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


@dataclasses.dataclass(frozen=True)
class ActivityPerturbation(TangentStrategy):
    """Per-example tangents at the outputs of dense/conv ops (``perturb="activations"``).

    Attributes:
        base: The elementwise distribution of ``u`` and of the weight-perturbed
            leaves' tangents (``_tangents.HashedTangents``: normal or rademacher).
        activations: ``False`` weight-perturbs every leaf while keeping the per-example
            (and per-group) derivatives; local losses with ``perturb="weights"`` use it.
        groups: ``groups(tree) -> pytree of ints`` with the structure of the
            differentiated argument: the loss then returns shape ``(B, G)`` and leaf ``i``
            is estimated from column ``groups[i]`` only (block-local losses). An entry may
            be a :class:`Columns` instead: a block split into patch/group columns.
        schedule: Overrides the ``_interpreter.Schedule`` (never changes a value).
        fallback: ``"error"`` (default): a dense/conv kernel that cannot be activity-
            perturbed (it reaches its op through something the rules do not see through:
            a scan, arithmetic on the weights, a custom wrapper) raises an error naming
            it; ``"weights"``: such kernels are weight-perturbed (unbiased, the weight-
            perturbed variance), as every non-kernel leaf is.
        batch_coupled: The per-example losses depend on other examples' activations
            (BatchNorm in training mode): each perturbation is then scored by the whole
            batch's directional derivative ``Σ_b d_b`` instead of its own example's
            ``d_b``, which keeps the estimate unbiased (at a higher variance).
    """

    base: Any
    activations: bool = True
    groups: Callable[[Any], Any] | None = None
    schedule: _interpreter.Schedule | None = None
    batch_coupled: bool = False
    fallback: str = "error"

    def __post_init__(self):
        if self.fallback not in FALLBACK:
            raise ValueError(f"fallback must be one of {FALLBACK}; got {self.fallback!r}.")

    def check_value(self, out: Any, fn_name: str) -> Array:
        out = jnp.asarray(out)
        want = "(B,)" if self.groups is None else "(B, num_groups)"
        if out.ndim != (1 if self.groups is None else 2) or out.shape[0] == 0:
            raise ValueError(
                f"With perturb='activations' (or local losses) {fn_name} must return the "
                f"per-example losses, shape {want}, with the batch axis first; got shape "
                f"{out.shape}. Return the unreduced losses (drop the .mean())."
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(f"{fn_name} must return floating-point losses; got {out.dtype}.")
        return out

    def prepare(self, key, primals, num_tangents, selection: Selection):
        groups = None
        if self.groups is not None:
            flat = jax.tree_util.tree_leaves(
                self.groups(selection.tree), is_leaf=lambda c: isinstance(c, Columns)
            )
            groups = tuple(
                flat[i] if isinstance(flat[i], Columns) else int(flat[i]) for i in selection.indices
            )
        schedule = self.schedule or _interpreter.schedule_for(primals)
        # The vmap over tangents traces direction() once; sum_tangents reads that trace's
        # sites right after it (the sites' inputs come out of the vmap as its unbatched
        # output ``shared``).
        traces: list[_Trace] = []
        keys = _random.fold_in(key, jnp.arange(num_tangents, dtype=jnp.uint32))
        paths = jax.tree_util.tree_flatten_with_path(selection.tree)[0]
        names = tuple(jax.tree_util.keystr(paths[i][0]) for i in selection.indices)
        return keys, (groups, schedule, traces, names)

    def direction(self, fun, primals, context, key) -> Direction:
        groups, schedule, traces, names = context
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*primals)
        losses_shape = out_shape[0].shape
        if groups is not None:
            last = max(
                (c if isinstance(c, int) else c.start + c.size - 1 for c in groups), default=0
            )
            if last >= losses_shape[1]:
                raise ValueError(
                    f"The loss has {losses_shape[1]} columns but the groups name column "
                    f"{last}; return one column per group."
                )
        uses = _use_counts(closed.jaxpr, collections.Counter())
        trace = _Trace(self, key, primals, losses_shape[0], uses, self.activations)
        views = [_View(trace, i, lambda w: w) for i in range(len(primals))]
        outs, touts = _interpreter.jvp_jaxpr(closed, primals, views, schedule, trace.rules)
        losses, d = outs[0], touts[0]
        _, aux = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)
        value = jnp.sum(jnp.mean(losses.astype(jnp.float32), axis=0)).astype(losses.dtype)
        if self.activations and self.fallback == "error":
            check_no_fallback(closed, len(primals), trace.site_eqns, names, losses_shape[0])
        traces.append(trace)
        shared = [site.lhs for site in trace.sites]
        kept = trace.cotangents(d, groups, self.batch_coupled)
        return Direction(value, d, aux, kept, shared)

    sums_tangents: ClassVar[bool] = True

    def sum_tangents(self, kept, shared, context):
        summed = jax.tree.map(lambda a: jnp.sum(a, axis=0), kept)
        return context[2][-1].contract(summed, shared)

    def combine(self, derivatives, primals, context, kept):
        k = np.float32(derivatives.shape[0])
        return [(s / k).astype(p.dtype) for s, p in zip(kept, primals)]


def perturbation_of_leaves(fun: Callable[..., Any], primals: list[Array]) -> list[str]:
    """For every primal of ``fun`` (per-example losses first in its output): how
    ``perturb="activations"`` perturbs it, and why (traced, nothing is computed)."""
    found: list[list[str]] = []

    def run(*ps):
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*ps)
        batch = jax.tree_util.tree_leaves(out_shape)[0].shape[0]
        uses = _use_counts(closed.jaxpr, collections.Counter())
        strategy = ActivityPerturbation(HASHED["rademacher"], fallback="weights")
        trace = _Trace(strategy, jax.random.key(0), list(ps), batch, uses, True)
        views = [_View(trace, i, lambda w: w) for i in range(len(ps))]
        _, touts = _interpreter.jvp_jaxpr(closed, list(ps), views, rules=trace.rules)
        fallen = weight_perturbed_kernels(closed, len(ps), trace.site_eqns, batch)
        for leaf in range(len(ps)):
            ops = [site.name for site in trace.sites if site.leaf == leaf]
            ops += [
                f"{site.name} bias" for site in trace.sites if site.bias and site.bias[0] == leaf
            ]
            text = []
            if ops:
                text.append(
                    f"activations: output of {len(ops)} op(s) ({', '.join(sorted(set(ops)))})"
                )
            if leaf in fallen:
                text.append(f"weights: kernel of {fallen[leaf]}, not seen through (fallback)")
            elif leaf in trace.weights:
                text.append("weights: not a dense/conv kernel (elementwise, gather, ...)")
            found.append(text or ["none: does not reach the losses"])
        return touts[0]

    jax.eval_shape(run, *primals)
    return ["; ".join(t) for t in found]


def activity_perturbation(
    tangent: str = "rademacher", *, fallback: str = "error"
) -> ActivityPerturbation:
    """The ``perturb="activations"`` strategy, to pass as ``tangent=`` with options.

    Args:
        tangent: The elementwise law of the perturbations: ``"rademacher"`` or ``"normal"``.
        fallback: ``"error"`` (what ``perturb="activations"`` does): a dense/conv kernel
            that cannot be activity-perturbed raises an error naming it; ``"weights"``:
            such kernels are weight-perturbed instead, explicitly.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import fgrad_jax
        >>> def losses(params, x):  # the kernel passes through a scan over layers
        ...     body = lambda h, w: (jnp.tanh(h @ w), None)
        ...     return jnp.sum(jax.lax.scan(body, x, params)[0] ** 2, axis=1)
        >>> params, x = jnp.ones((2, 3, 3)) / 3, jnp.ones((4, 3))
        >>> strategy = fgrad_jax.activity_perturbation(fallback="weights")
        >>> g = fgrad_jax.forward_grad(losses, tangent=strategy)(jax.random.key(0), params, x)
        >>> g.shape
        (2, 3, 3)
    """
    if tangent not in HASHED:
        raise ValueError(f"tangent must be one of {sorted(HASHED)}; got {tangent!r}.")
    return ActivityPerturbation(HASHED[tangent], fallback=fallback)


def with_perturbation(strategy: TangentStrategy, perturb: str) -> TangentStrategy:
    """``strategy`` for ``perturb`` (``"weights"``: unchanged)."""
    if perturb not in PERTURB:
        raise ValueError(f"perturb must be one of {PERTURB}; got {perturb!r}.")
    if perturb == "weights" or isinstance(strategy, ActivityPerturbation):
        return strategy
    if not hasattr(strategy, "draw") or not hasattr(strategy, "at"):
        raise ValueError(
            "perturb='activations' draws its tangents elementwise at the op outputs; use "
            f"tangent='rademacher' or tangent='normal' (got {strategy!r})."
        )
    return ActivityPerturbation(strategy)

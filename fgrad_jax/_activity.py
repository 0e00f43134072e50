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

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgrad_jax import _interpreter, _random
from fgrad_jax._activity_trace import Columns, Trace, trace_jvp
from fgrad_jax._dataflow import check_no_fallback, weight_perturbed_kernels
from fgrad_jax._strategy import Direction, Selection, TangentStrategy
from fgrad_jax._tangents import HASHED, HashedTangents

Array = jax.Array

PERTURB = ("weights", "activations")
FALLBACK = ("error", "weights")


class ActivityContext(NamedTuple):
    """What :class:`ActivityPerturbation` prepares: each leaf's loss column (or ``None``),
    the schedule, the traces of :meth:`~ActivityPerturbation.direction` (the last one is
    the current chunk's, read by ``sum_tangents``) and the leaves' paths for messages."""

    columns: tuple[Any, ...] | None
    schedule: _interpreter.Schedule
    traces: list[Trace]
    names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ActivityPerturbation(TangentStrategy[ActivityContext]):
    """Per-example tangents at the outputs of dense/conv ops (``perturb="activations"``).

    Attributes:
        base: The elementwise distribution of ``u`` and of the weight-perturbed
            leaves' tangents (``_tangents.HashedTangents``: normal or rademacher).
        perturb: ``"activations"`` (default) or ``"weights"``: every leaf weight-perturbed
            while keeping the per-example (and per-column) derivatives; local losses with
            ``perturb="weights"`` use it.
        columns: ``columns(tree) -> pytree of ints`` with the structure of the
            differentiated argument: the loss then returns shape ``(B, L)`` and leaf ``i``
            is estimated from loss column ``columns[i]`` only (block-local losses). An
            entry may be a :class:`Columns` instead: a block split into patch/group columns.
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
    perturb: str = "activations"
    columns: Callable[[Any], Any] | None = None
    schedule: _interpreter.Schedule | None = None
    batch_coupled: bool = False
    fallback: str = "error"

    def __post_init__(self):
        if self.perturb not in PERTURB:
            raise ValueError(f"perturb must be one of {PERTURB}; got {self.perturb!r}.")
        if self.fallback not in FALLBACK:
            raise ValueError(f"fallback must be one of {FALLBACK}; got {self.fallback!r}.")

    def check_value(self, out: Any, fn_name: str) -> Array:
        out = jnp.asarray(out)
        want = "(B,)" if self.columns is None else "(B, num_columns)"
        if out.ndim != (1 if self.columns is None else 2) or out.shape[0] == 0:
            raise ValueError(
                f"With perturb='activations' (or local losses) {fn_name} must return the "
                f"per-example losses, shape {want}, with the batch axis first; got shape "
                f"{out.shape}. Return the unreduced losses (drop the .mean())."
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(f"{fn_name} must return floating-point losses; got {out.dtype}.")
        return out

    def prepare(self, key, primals, num_tangents, selection: Selection):
        columns = None
        if self.columns is not None:
            flat = jax.tree_util.tree_leaves(
                self.columns(selection.tree), is_leaf=lambda c: isinstance(c, Columns)
            )
            columns = tuple(
                flat[i] if isinstance(flat[i], Columns) else int(flat[i]) for i in selection.indices
            )
        schedule = self.schedule or _interpreter.schedule_for(primals)
        # The vmap over tangents traces direction() once; sum_tangents reads that trace's
        # sites right after it (the sites' inputs come out of the vmap as its unbatched
        # output ``shared``).
        traces: list[Trace] = []
        keys = _random.fold_in(key, jnp.arange(num_tangents, dtype=jnp.uint32))
        paths = jax.tree_util.tree_flatten_with_path(selection.tree)[0]
        names = tuple(jax.tree_util.keystr(paths[i][0]) for i in selection.indices)
        return keys, ActivityContext(columns, schedule, traces, names)

    def direction(self, fun, primals, context: ActivityContext, key) -> Direction:
        columns, schedule, traces, names = context
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*primals)
        losses_shape = out_shape[0].shape
        if columns is not None:
            last = max(
                (c if isinstance(c, int) else c.start + c.size - 1 for c in columns), default=0
            )
            if last >= losses_shape[1]:
                raise ValueError(
                    f"The loss has {losses_shape[1]} columns but the column map names column "
                    f"{last}; return one column per block."
                )
        trace, outs, touts = trace_jvp(
            self, closed, primals, key, losses_shape[0], self.perturb == "activations", schedule
        )
        losses, d = outs[0], touts[0]
        _, aux = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)
        value = jnp.sum(jnp.mean(losses.astype(jnp.float32), axis=0)).astype(losses.dtype)
        if self.perturb == "activations" and self.fallback == "error":
            check_no_fallback(closed, len(primals), trace.site_eqns, names, losses_shape[0])
        traces.append(trace)
        shared = [site.lhs for site in trace.sites]
        kept = trace.cotangents(d, columns, self.batch_coupled)
        return Direction(value, d, aux, kept, shared)

    sums_tangents: ClassVar[bool] = True

    def sum_tangents(self, kept, shared, context: ActivityContext):
        summed = jax.tree.map(lambda a: jnp.sum(a, axis=0), kept)
        return context.traces[-1].contract(summed, shared)

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
        strategy = ActivityPerturbation(HASHED["rademacher"], fallback="weights")
        trace, _, touts = trace_jvp(strategy, closed, list(ps), jax.random.key(0), batch, True)
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
    if not isinstance(strategy, HashedTangents):
        raise ValueError(
            "perturb='activations' draws its tangents elementwise at the op outputs; use "
            f"tangent='rademacher' or tangent='normal' (got {strategy!r})."
        )
    return ActivityPerturbation(strategy)

"""The estimator pipeline: flatten, prepare, vmap the JVPs, combine, unflatten.

``estimate_forward_grad(spec, fun, key, args, kwargs)`` runs the four steps of every
estimate (see ``_strategy.py``) for an :class:`~fgrad_jax._spec.EstimatorSpec`; the public
functions here and in ``_transform.py`` / ``_flax.py`` build the spec once and call it.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from fgrad_jax import _interpreter
from fgrad_jax._spec import ArgNums, EstimatorSpec, as_key, is_differentiable
from fgrad_jax._strategy import Selection
from fgrad_jax._tangents import Tangent

Array = jax.Array


class Estimate(NamedTuple):
    value: Array
    aux: Any
    directional_derivatives: Array  # (K,) float32; (K, B) or (K, B, L) per example
    grad: Any


# With tangent_chunk=None, the K tangents go through the JVP at once while K copies of the
# function's largest intermediate stay below this; beyond it, in chunks that do. Chunks run
# in a compiled loop, which costs little on a GPU but makes XLA:CPU's convolution kernels
# 4-30x slower, so the limit only catches sizes where memory is the real risk.
AUTO_CHUNK_BYTES = 1 << 30


def largest_intermediate_bytes(jaxpr: Any) -> int:
    """Bytes of the largest value any equation of ``jaxpr`` (or a sub-jaxpr) produces."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, _interpreter.nbytes(var.aval))
        for sub in jcore.jaxprs_in_params(eqn.params):
            largest = max(largest, largest_intermediate_bytes(sub))
    return largest


def auto_chunk(num_tangents: int, largest_bytes: int) -> int:
    """The largest divisor of ``num_tangents`` whose tangents' copies of the largest
    intermediate fit in :data:`AUTO_CHUNK_BYTES` (at least 1)."""
    fits = max(1, AUTO_CHUNK_BYTES // max(largest_bytes, 1))
    return max(c for c in range(1, num_tangents + 1) if num_tangents % c == 0 and c <= fits)


def _mask_leaves(spec: EstimatorSpec, tree: Any, num_leaves: int) -> list[bool]:
    """One bool per leaf of ``tree`` from ``spec.mask`` (bools with its structure)."""
    mask = spec.mask(tree) if callable(spec.mask) else spec.mask
    if mask is None:
        return [True] * num_leaves
    try:
        per_leaf = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"mask must be a pytree of bools with the structure of the parameters (the "
            f"differentiated argument(s), argnums={spec.argnums_given!r}), or a prefix of "
            f"it: {err}"
        ) from None
    flags = jax.tree_util.tree_leaves(per_leaf)
    if len(flags) != num_leaves:
        raise ValueError(
            f"mask selects {len(flags)} leaves but the differentiated argument(s) have "
            f"{num_leaves}; give one bool per parameter leaf (or per subtree)."
        )
    for flag in flags:
        if isinstance(flag, jax.core.Tracer) or not isinstance(flag, (bool, np.bool_)):
            raise TypeError(
                f"mask leaves must be Python or NumPy bools (static), one per parameter "
                f"leaf; got {flag!r}."
            )
    return [bool(flag) for flag in flags]


@dataclasses.dataclass(frozen=True)
class _Flat:
    """The differentiated argument(s) of one call, flattened: ``primals`` are the leaves
    at ``selection.indices`` (floating point and selected by the mask)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    leaves: list[Any]
    treedef: Any
    selection: Selection
    primals: list[Array]

    def unflatten(self, spec: EstimatorSpec, estimates: list[Array]) -> Any:
        """The estimate in the structure of the argument(s); zeros for the other leaves."""
        out = [jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf)) for leaf in self.leaves]
        for i, g in zip(self.selection.indices, estimates):
            out[i] = g
        grad = jax.tree_util.tree_unflatten(self.treedef, out)
        return grad if spec.argnums_is_tuple else grad[0]


def _flatten(spec: EstimatorSpec, args: Sequence[Any], kwargs: dict[str, Any]) -> _Flat:
    for a in spec.argnums:
        if not -len(args) <= a < len(args):
            raise ValueError(
                f"argnums={spec.argnums_given!r} is out of range for {len(args)} positional args."
            )
    diff = tuple(args[a] for a in spec.argnums)
    leaves, treedef = jax.tree_util.tree_flatten(diff)
    tree = diff if spec.argnums_is_tuple else diff[0]
    selected = _mask_leaves(spec, tree, len(leaves))
    index = tuple(i for i, leaf in enumerate(leaves) if is_differentiable(leaf) and selected[i])
    if not index and any(is_differentiable(leaf) for leaf in leaves):
        raise ValueError(
            "mask selects no parameter: at least one floating-point leaf must be True "
            "(a step that changes nothing is almost always a mistake in the mask)."
        )
    if not index:
        raise TypeError(
            f"The differentiated argument(s) (argnums={spec.argnums_given!r}) have no "
            "floating-point leaves, so there is nothing to estimate a gradient for. Pass "
            "float parameters (e.g. jnp.float32 arrays) or choose other argnums."
        )
    primals = [jnp.asarray(leaves[i]) for i in index]
    return _Flat(tuple(args), kwargs, leaves, treedef, Selection(tree, index), primals)


def _flat_function(spec: EstimatorSpec, fun: Callable, flat: _Flat) -> Callable:
    """``fun`` as a function of the selected leaves only, returning ``(value, aux)``."""
    check_value, name = spec.strategy.check_value, spec.fn_name

    def flat_fun(*float_leaves):
        new_leaves = list(flat.leaves)
        for i, leaf in zip(flat.selection.indices, float_leaves):
            new_leaves[i] = leaf
        new_diff = jax.tree_util.tree_unflatten(flat.treedef, new_leaves)
        call_args = list(flat.args)
        for a, d in zip(spec.argnums, new_diff):
            call_args[a] = d
        out = fun(*call_args, **flat.kwargs)
        if spec.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"With has_aux=True, {name} must return a pair (scalar_loss, aux); "
                    f"got {type(out).__name__}."
                )
            return check_value(out[0], name), out[1]
        if isinstance(out, tuple):
            raise TypeError(
                f"{name} returned a tuple of {len(out)}; it must return a scalar loss. "
                "If it returns (loss, aux), pass has_aux=True."
            )
        return check_value(out, name), None

    return flat_fun


def _chunk_size(spec: EstimatorSpec, flat_fun: Callable, primals: list[Array]) -> int:
    if spec.tangent_chunk is not None:
        return spec.tangent_chunk
    if spec.num_tangents == 1 or not spec.strategy.chunks_tangents:
        return spec.num_tangents
    traced = jax.make_jaxpr(flat_fun)(*primals)
    return auto_chunk(spec.num_tangents, largest_intermediate_bytes(traced.jaxpr))


def _run_tangents(
    spec: EstimatorSpec, flat_fun: Callable, primals: list[Array], inputs: Any, context: Any
) -> tuple[Array, Array, Any, Any]:
    """``(value, derivatives, aux, kept)`` over the K tangents, in chunks if asked."""
    strategy, k = spec.strategy, spec.num_tangents

    def directions(x):
        value, derivs, aux, kept, shared = jax.vmap(
            lambda xi: tuple(strategy.direction(flat_fun, primals, context, xi)),
            out_axes=(None, 0, None, 0, None),
        )(x)
        return value, derivs, aux, strategy.sum_tangents(kept, shared, context)

    chunk = _chunk_size(spec, flat_fun, primals)
    if chunk == k:
        return directions(inputs)
    # One chunk of tangents at a time, each with its own primal: the primal is computed
    # K / chunk times, but only one chunk's tangent activations are alive at once.
    n = k // chunk
    split = lambda a: a.reshape(n, chunk, *a.shape[1:])
    value, derivs, aux, kept = jax.lax.map(directions, jax.tree.map(split, inputs))
    value, aux = value[0], jax.tree.map(lambda a: a[0], aux)
    merge = lambda a: a.reshape(k, *a.shape[2:])
    kept = jax.tree.map((lambda a: jnp.sum(a, axis=0)) if strategy.sums_tangents else merge, kept)
    return value, merge(derivs), aux, kept


def estimate_forward_grad(
    spec: EstimatorSpec, fun: Callable, key: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Estimate:
    """The estimate of ``∇ fun`` at ``args`` for ``spec``: the pipeline of ``_strategy.py``.

    Shared core of the public estimators and the optax transformation.
    """
    key = as_key(key)
    flat = _flatten(spec, args, kwargs)
    flat_fun = _flat_function(spec, fun, flat)
    strategy, primals = spec.strategy, flat.primals
    inputs, context = strategy.prepare(key, primals, spec.num_tangents, flat.selection)
    value, derivs, aux, kept = _run_tangents(spec, flat_fun, primals, inputs, context)
    derivs = derivs.astype(jnp.float32)
    grads = strategy.combine(derivs, primals, context, kept)
    return Estimate(value, aux, derivs, flat.unflatten(spec, grads))


def value_and_forward_grad(
    fun: Callable,
    argnums: ArgNums = 0,
    *,
    num_tangents: int = 1,
    tangent: Tangent = "normal",
    has_aux: bool = False,
    mask: Any = None,
    tangent_chunk: int | None = None,
    perturb: str = "weights",
) -> Callable[..., tuple[Any, Any]]:
    """Like :func:`jax.value_and_grad`, with a forward-gradient estimate of the gradient.

    The value and the ``num_tangents`` directional derivatives come from one
    :func:`jax.jvp` pass (vectorised over the tangents, the primal computed once): there
    is no backward pass and no extra forward pass.

    Args:
        fun: Function to differentiate. It must return a floating-point scalar, or a pair
            ``(scalar, aux)`` when ``has_aux=True``.
        argnums: Which positional argument(s) to differentiate (an int or a tuple).
        num_tangents: Number K of random directions; the estimate is the mean of the K
            single-direction estimates. Must be >= 1.
        tangent: Distribution of the directions: ``"normal"`` (the paper),
            ``"rademacher"`` (lowest variance, cheapest; recommended), ``"sphere"``,
            ``"orthogonal"``, ``"lowrank"`` or :func:`fgrad_jax.lowrank` ``(rank)``
            (rank-r kernel tangents, never materialised in the JVP), or a callable
            ``tangent(key, tree) -> tree`` with ``E[v vᵀ] = I``.
        has_aux: Whether ``fun`` returns ``(value, aux)``.
        mask: Which leaves to estimate, as :func:`optax.masked` takes it: a pytree of
            bools with the structure of ``args[argnums]`` (or a prefix of it), or a
            callable ``args[argnums] -> such a pytree``. Unselected leaves get no tangent
            (the JVP is cheaper) and an exact zero estimate. ``None`` selects all.
        tangent_chunk: Process the tangents ``tangent_chunk`` at a time (it must divide
            ``num_tangents``), one chunk after the other, each with its own primal pass:
            the step's working memory is that of ``tangent_chunk`` tangents instead of
            ``num_tangents``, for ``num_tangents / tangent_chunk`` primal passes instead
            of one. ``None`` (default): all at once while ``num_tangents`` copies of the
            function's largest intermediate value take at most 1 GiB
            (``fgrad_jax._estimator.AUTO_CHUNK_BYTES``), else the largest chunk that
            does (e.g. a language model's logits: one tangent at a time). Pass
            ``tangent_chunk=num_tangents`` to force all at once.
        perturb: ``"weights"`` (tangents on the parameters, Baydin et al.) or
            ``"activations"`` (Ren et al. 2023: tangents at the outputs of the dense/conv
            ops whose kernel is a parameter, one per example; lower variance). With
            ``"activations"``, ``fun`` returns per-example losses of shape ``(B,)``, the
            estimate is of the gradient of their mean and the value is their mean;
            ``tangent`` must be ``"normal"`` or ``"rademacher"``. See
            :doc:`/local_losses`.

    Returns:
        A function ``estimate(key, *args, **kwargs)`` returning ``(value, grad)`` (or
        ``((value, aux), grad)``), where ``grad`` has the structure and dtypes of
        ``args[argnums]``. Integer and bool leaves get zeros.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import fgrad_jax
        >>> f = lambda w: jnp.sum(w ** 2)
        >>> value, g = fgrad_jax.value_and_forward_grad(f)(jax.random.key(0), jnp.ones(3))
        >>> float(value), g.shape
        (3.0, (3,))
    """
    spec = EstimatorSpec.create(
        tangent=tangent,
        perturb=perturb,
        num_tangents=num_tangents,
        argnums=argnums,
        has_aux=has_aux,
        mask=mask,
        tangent_chunk=tangent_chunk,
    )

    @functools.wraps(fun)
    def estimate(key, *args, **kwargs):
        est = estimate_forward_grad(spec, fun, key, args, kwargs)
        if has_aux:
            return (est.value, est.aux), est.grad
        return est.value, est.grad

    return estimate


def forward_grad(
    fun: Callable,
    argnums: ArgNums = 0,
    *,
    num_tangents: int = 1,
    tangent: Tangent = "normal",
    has_aux: bool = False,
    mask: Any = None,
    tangent_chunk: int | None = None,
    perturb: str = "weights",
) -> Callable[..., Any]:
    """Like :func:`jax.grad`, but an unbiased forward-gradient estimate (Baydin et al. 2022).

    Draws ``v`` with ``E[v vᵀ] = I``, computes ``d = ∇f(θ)·v`` with one :func:`jax.jvp`
    and returns ``g = d·v`` (the mean over ``num_tangents`` directions). A non-finite
    ``d`` propagates into ``g``, as a non-finite gradient would with :func:`jax.grad`;
    :func:`fgrad_jax.forward_gradient` instead skips such a step.

    Args:
        fun: Function to differentiate; returns a floating-point scalar (or
            ``(scalar, aux)`` with ``has_aux=True``).
        argnums: Which positional argument(s) to differentiate (an int or a tuple).
        num_tangents: Number K of random directions averaged (>= 1).
        tangent: ``"normal"``, ``"rademacher"`` (recommended), ``"sphere"``,
            ``"orthogonal"``, ``"lowrank"``/:func:`fgrad_jax.lowrank` ``(rank)``, or a
            callable ``tangent(key, tree) -> tree``; see :doc:`/maths` and
            :doc:`/performance`.
        has_aux: Whether ``fun`` returns ``(value, aux)``; then ``(grad, aux)`` is returned.
        mask: Leaves to estimate (a pytree of bools or a callable, as in
            :func:`value_and_forward_grad`); the others get exact zeros.
        tangent_chunk: Tangents per chunk, to bound memory (see
            :func:`value_and_forward_grad`).
        perturb: ``"weights"`` or ``"activations"`` (then ``fun`` returns per-example
            losses of shape ``(B,)``), as in :func:`value_and_forward_grad`.

    Returns:
        ``estimate(key, *args, **kwargs)``: the estimate with the structure and dtypes of
        ``args[argnums]`` (a tuple for a tuple ``argnums``), plus ``aux`` if requested.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import fgrad_jax
        >>> f = lambda w: jnp.dot(w, jnp.arange(3.0))
        >>> g = fgrad_jax.forward_grad(f, num_tangents=3, tangent="orthogonal")
        >>> bool(jnp.allclose(g(jax.random.key(0), jnp.ones(3)), jnp.arange(3.0), atol=1e-5))  # K = n: exact
        True
    """
    value_and_grad = value_and_forward_grad(
        fun,
        argnums,
        num_tangents=num_tangents,
        tangent=tangent,
        has_aux=has_aux,
        mask=mask,
        tangent_chunk=tangent_chunk,
        perturb=perturb,
    )

    @functools.wraps(fun)
    def estimate(key, *args, **kwargs):
        value, grad = value_and_grad(key, *args, **kwargs)
        return (grad, value[1]) if has_aux else grad

    return estimate


def all_finite(*arrays: Array) -> Array:
    return functools.reduce(operator.and_, [jnp.all(jnp.isfinite(a)) for a in arrays])

"""Forward-gradient estimators built on :func:`jax.jvp`."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgrad_jax import _lowrank, _random, _sharding
from fgrad_jax._tangents import HASHED, TangentFn, as_lowrank, get_sampler, resolve_tangent

Array = jax.Array
ArgNums = int | Sequence[int]


def check_num_tangents(num_tangents: Any) -> int:
    if isinstance(num_tangents, jax.core.Tracer):
        raise TypeError(
            "num_tangents must be a static Python int, not a traced value. With "
            "optax.inject_hyperparams pass static_args=('num_tangents',)."
        )
    if (
        isinstance(num_tangents, jax.Array | np.ndarray)
        and num_tangents.shape == ()
        and (jnp.issubdtype(num_tangents.dtype, jnp.integer))
    ):
        num_tangents = int(num_tangents)
    if isinstance(num_tangents, bool) or not isinstance(num_tangents, (int, np.integer)):
        raise TypeError(f"num_tangents must be a positive int; got {num_tangents!r}.")
    if num_tangents < 1:
        raise ValueError(
            f"num_tangents must be >= 1 (the number of random directions averaged per "
            f"estimate); got {num_tangents}."
        )
    return int(num_tangents)


def as_key(key: Any, name: str = "key") -> Array:
    """Returns a typed PRNG key; accepts typed keys and legacy ``uint32[2]`` keys."""
    if isinstance(key, jax.Array | np.ndarray) or hasattr(key, "dtype"):
        dtype = key.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return key
        if dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2:
            return jax.random.wrap_key_data(key)
    raise TypeError(
        f"{name} must be a JAX PRNG key such as jax.random.key(0) (legacy "
        f"jax.random.PRNGKey(0) also works); got {type(key).__name__}"
        f"{getattr(key, 'shape', '')}{getattr(key, 'dtype', '')}."
    )


def is_differentiable(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


class _Estimate(NamedTuple):
    value: Array
    aux: Any
    directional_derivatives: Array  # (K,) float32
    grad: Any


def _normalise_argnums(argnums: ArgNums) -> tuple[tuple[int, ...], bool]:
    if isinstance(argnums, int):
        return (argnums,), False
    argnums = tuple(argnums)
    if not argnums or not all(isinstance(a, int) for a in argnums):
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints; got {argnums!r}.")
    return argnums, True


def _check_scalar(out: Any, fn_name: str) -> Array:
    out = jnp.asarray(out) if not isinstance(out, jax.Array) else out
    if out.shape != ():
        raise ValueError(
            f"{fn_name} must return a scalar loss (shape ()), got shape {out.shape}. "
            "Reduce it, e.g. with .mean() or .sum(); with has_aux=True return (scalar, aux)."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{fn_name} must return a floating-point scalar; got dtype {out.dtype}.")
    return out


def _k_axis(leaf: Array) -> int:
    """Where the K tangents of a leaf are stacked: before a kernel's last (output) axis.

    Under vmap a batched ``x @ W`` folds K into W's free dimensions; with K next to the
    output axis, ``(in, K, out)`` is already the ``(in, K·out)`` matrix XLA multiplies, so no
    transposing copy of the K stored tangents is needed (with K first it was one).
    """
    return leaf.ndim - 1 if leaf.ndim >= 2 else 0


def _hashed_draw(hashed, leaf: Array, store: bool) -> Callable[[Array, Array], Array]:
    """``draw(seed, k)``: tangent ``k`` of ``leaf``, and all K of them in one draw under vmap.

    Called inside the JVP, vectorised over ``k = arange(K)``. Its batching rule draws the K
    tangents in one array with the K axis where the batched matmul wants it (``_k_axis``;
    with K first XLA added a transposing copy, and fused the draw into it as a slow loop)
    and hands it to vmap as batched along that axis. Under that vmap ``seed`` carries a
    fake zero from the consuming op (``LazyTangent``), so its K copies are equal and the
    first one is used.
    """
    shape, size, axis = leaf.shape, np.uint32(max(leaf.size, 1)), _k_axis(leaf)

    def finish(t, seed):
        if store:
            # An expensive draw (the Gaussian) is kept for the update: computed once into
            # a buffer (otherwise XLA duplicates the elementwise draw into each consumer).
            # Kept draws exist only on one device (see ``store``), so unlike the low-rank
            # factors they need no replicated sharding constraint.
            t = _random.materialize(t, seed)
        return t.astype(leaf.dtype)

    @jax.custom_batching.custom_vmap
    def draw(seed, k):
        return finish(hashed.draw(seed, shape, k * size), seed)

    @draw.def_vmap
    def _draw_all(axis_size, in_batched, seed, k):
        del axis_size
        seed_batched, k_batched = in_batched
        if seed_batched:
            seed = seed[0]
        if not k_batched:
            return draw(seed, k), False
        return jnp.moveaxis(finish(hashed.draw_stacked(seed, shape, axis, k), seed), axis, 0), True

    return draw


def _combine(derivs: Array, tangents: Array, scale: Array) -> Array:
    """(1/K) Σ_k d_k v_k in float32, as an unrolled elementwise sum for small K.

    An explicit sum (rather than a tensordot over K) stays one elementwise expression, which
    XLA fuses with the tangent draw and the optimizer's update.
    """
    k = tangents.shape[0]
    if k > 16:
        return jnp.tensordot(derivs, tangents.astype(jnp.float32), axes=1) * scale
    acc = derivs[0] * tangents[0].astype(jnp.float32)
    for i in range(1, k):
        acc = acc + derivs[i] * tangents[i].astype(jnp.float32)
    return acc * scale if k > 1 else acc


def estimate_forward_grad(
    fun: Callable,
    key: Array,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    argnums: ArgNums = 0,
    num_tangents: int = 1,
    tangent: str | TangentFn = "normal",
    has_aux: bool = False,
    fn_name: str = "fun",
) -> _Estimate:
    """Shared core of the public estimators and the optax transformation."""
    key = as_key(key)
    argnum_tuple, is_tuple = _normalise_argnums(argnums)
    for a in argnum_tuple:
        if not -len(args) <= a < len(args):
            raise ValueError(
                f"argnums={argnums!r} is out of range for {len(args)} positional args."
            )
    diff = tuple(args[a] for a in argnum_tuple)
    leaves, treedef = jax.tree_util.tree_flatten(diff)
    float_index = [i for i, leaf in enumerate(leaves) if is_differentiable(leaf)]
    if not float_index:
        raise TypeError(
            f"The differentiated argument(s) (argnums={argnums!r}) have no floating-point "
            "leaves, so there is nothing to estimate a gradient for. Pass float parameters "
            "(e.g. jnp.float32 arrays) or choose other argnums."
        )
    primals = [jnp.asarray(leaves[i]) for i in float_index]
    shapes = [(num_tangents, *p.shape) for p in primals]
    hashed = HASHED.get(tangent) if isinstance(tangent, str) else None
    lowrank_spec = as_lowrank(tangent)
    if lowrank_spec is not None:
        seeds = _random.seed_words(key, len(primals))
        drawn = _lowrank.draw_lowrank(seeds, primals, num_tangents, lowrank_spec.rank)
        tangents = [d[1:] if d[0] == "lowrank" else (d[1],) for d in drawn]
    elif hashed is not None:
        # Fast path: elementwise counter-based draws (see _random.py), seeded per leaf.
        seeds = _random.seed_words(key, len(primals))
        for s in shapes:  # the counter of tangent k, element j is k * size + j (uint32)
            _random.check_counter_range(s)
        # Drawn lazily, right before the operation that first uses them
        # (one_hashed_direction); then kept for the update or drawn again there.
        # Kept only on one device: with several, XLA's SPMD pipeline split the kept Gaussian
        # draw into two stored loops (twice its memory per device); drawing it again is
        # cheaper there than holding it twice.
        store = hashed.stores(primals) and _lowrank.anchor_lazy_draws()
        draws = [_hashed_draw(hashed, p, store) for p in primals]
        tangents = [jnp.arange(num_tangents, dtype=jnp.uint32)]
    else:
        sampler = get_sampler(tangent, diff if is_tuple else diff[0], float_index)
        tangents32 = sampler(key, primals, num_tangents)
        # The JVP needs tangents in the primal dtype; using the rounded values in the
        # estimate too keeps it consistent with the derivative XLA actually computed.
        tangents = [t.astype(p.dtype) for t, p in zip(tangents32, primals)]
        # Drawn in full on every device (see _sharding.replicated_like).
        tangents = [_sharding.replicated_like(t, p) for t, p in zip(tangents, primals)]

    def flat_fun(*float_leaves):
        new_leaves = list(leaves)
        for i, leaf in zip(float_index, float_leaves):
            new_leaves[i] = leaf
        new_diff = jax.tree_util.tree_unflatten(treedef, new_leaves)
        call_args = list(args)
        for a, d in zip(argnum_tuple, new_diff):
            call_args[a] = d
        out = fun(*call_args, **kwargs)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"With has_aux=True, {fn_name} must return a pair (scalar_loss, aux); "
                    f"got {type(out).__name__}."
                )
            return _check_scalar(out[0], fn_name), out[1]
        return _check_scalar(out, fn_name), None

    def one_direction(*tangent_leaves):
        value, deriv, aux = jax.jvp(flat_fun, tuple(primals), tangent_leaves, has_aux=True)
        return value, deriv, aux

    def one_lowrank_direction(*factors):
        tans = [
            _lowrank.LowRankTangent(f[0], f[1], p.shape, p.dtype)
            if len(f) == 2
            else f[0].astype(p.dtype)
            for f, p in zip(factors, primals)
        ]
        (value, aux), (deriv, _) = _lowrank.lowrank_jvp(flat_fun, primals, tans)
        return value, deriv, aux

    def one_hashed_direction(k):
        lazy = [
            _lowrank.LazyTangent(lambda zero, i=i: draws[i](seeds[i] ^ zero, k))
            for i in range(len(primals))
        ]
        (value, aux), (deriv, _) = _lowrank.lowrank_jvp(flat_fun, primals, lazy)
        drawn = [t.materialize() for t in lazy] if store else []
        return value, deriv, aux, drawn

    # The primal does not depend on the tangent, so under vmap it is computed once and
    # only the tangent work is batched over the K directions.
    if lowrank_spec is not None:
        value, derivs, aux = jax.vmap(one_lowrank_direction, out_axes=(None, 0, None))(*tangents)
    elif hashed is not None:
        value, derivs, aux, tangents = jax.vmap(one_hashed_direction, out_axes=(None, 0, None, 0))(
            *tangents
        )
    else:
        value, derivs, aux = jax.vmap(one_direction, out_axes=(None, 0, None))(*tangents)
    derivs = derivs.astype(jnp.float32)
    if lowrank_spec is not None:
        grads_float = [
            _lowrank.combine_lowrank(derivs, d, p, lowrank_spec.rank)
            for d, p in zip(drawn, primals)
        ]
        return _finish(leaves, float_index, grads_float, treedef, is_tuple, value, aux, derivs)
    if hashed is not None and not store:
        # Draw the tangents again where the estimate is consumed (bitwise the same values)
        # instead of keeping all of them alive through the JVP: under jit the draw fuses
        # into the optimizer's elementwise update. XLA:CPU drops optimization barriers
        # before fusion, so to stop CSE from merging the two draws back into one stored
        # buffer the second draw's seeds get a data dependence on the derivatives that is
        # always zero but not provably so (x & (x ^ 1) for a bit x). It also orders the
        # redraw after the JVP, so no tangent of one layer lives across the others.
        seeds_again = seeds ^ _random.fake_zero(derivs)
        est_tangents = [
            hashed.draw(seeds_again[i], s).astype(p.dtype)
            for i, (s, p) in enumerate(zip(shapes, primals))
        ]
    else:
        est_tangents = tangents
    scale = jnp.float32(1.0 / num_tangents)
    grads_float = [
        _combine(derivs, t, scale).astype(p.dtype) for t, p in zip(est_tangents, primals)
    ]
    return _finish(leaves, float_index, grads_float, treedef, is_tuple, value, aux, derivs)


def _finish(leaves, float_index, grads_float, treedef, is_tuple, value, aux, derivs) -> _Estimate:
    grad_leaves = [jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf)) for leaf in leaves]
    for i, g in zip(float_index, grads_float):
        grad_leaves[i] = g
    grad = jax.tree_util.tree_unflatten(treedef, grad_leaves)
    if not is_tuple:
        grad = grad[0]
    return _Estimate(value, aux, derivs, grad)


def _check_common(num_tangents: int, tangent: Any) -> tuple[int, str | TangentFn]:
    return check_num_tangents(num_tangents), resolve_tangent(tangent)


def value_and_forward_grad(
    fun: Callable,
    argnums: ArgNums = 0,
    *,
    num_tangents: int = 1,
    tangent: str | TangentFn = "normal",
    has_aux: bool = False,
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
    num_tangents, tangent = _check_common(num_tangents, tangent)

    @functools.wraps(fun)
    def estimate(key, *args, **kwargs):
        est = estimate_forward_grad(
            fun,
            key,
            args,
            kwargs,
            argnums=argnums,
            num_tangents=num_tangents,
            tangent=tangent,
            has_aux=has_aux,
        )
        if has_aux:
            return (est.value, est.aux), est.grad
        return est.value, est.grad

    return estimate


def forward_grad(
    fun: Callable,
    argnums: ArgNums = 0,
    *,
    num_tangents: int = 1,
    tangent: str | TangentFn = "normal",
    has_aux: bool = False,
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
        fun, argnums, num_tangents=num_tangents, tangent=tangent, has_aux=has_aux
    )

    @functools.wraps(fun)
    def estimate(key, *args, **kwargs):
        value, grad = value_and_grad(key, *args, **kwargs)
        return (grad, value[1]) if has_aux else grad

    return estimate


def all_finite(*arrays: Array) -> Array:
    return functools.reduce(operator.and_, [jnp.all(jnp.isfinite(a)) for a in arrays])

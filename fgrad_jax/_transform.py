"""The forward gradient as an optax gradient transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fgrad_jax._estimator import all_finite, estimate_forward_grad
from fgrad_jax._placement import check_first_in_chain, check_init_placement
from fgrad_jax._sharding import check_same_key_on_every_process
from fgrad_jax._spec import EstimatorSpec
from fgrad_jax._state import ForwardGradientState, init_key, step_key
from fgrad_jax._tangents import Tangent

Array = jax.Array


_ON_NONFINITE = ("zero", "nan")


def _aux_placeholder(aux_example: Any) -> Any:
    def zeros(x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = jnp.asarray(x)
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree_util.tree_map(zeros, aux_example)


def _spec(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


def _store_aux(aux: Any, placeholder: Any) -> Any:
    """Checks ``aux`` against the state's fixed structure (jit, scan and nnx need it fixed)."""
    got, want = _spec(aux), _spec(placeholder)
    # Any: jaxlib ships no type stub for PyTreeDef (mypy cannot compare it).
    got_def: Any = jax.tree_util.tree_structure(got)
    if got_def != jax.tree_util.tree_structure(want) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
    ):
        raise ValueError(
            "value_fn's aux does not match forward_gradient's aux_example: the optimizer "
            "state stores the aux with a fixed structure, shapes and dtypes. value_fn "
            f"returned aux {got}, aux_example is {want}. Pass aux_example=jax.eval_shape("
            "value_fn, params)[1] (for nnx: jax.eval_shape(fgrad_jax.nnx_value_fn(loss_fn, "
            "model, *batch, has_aux=True), nnx.state(model, nnx.Param))[1])."
        )
    return aux


def _check_no_tuple(fn_name: str, owner: str) -> Callable[[Any], Any]:
    def check(out: Any) -> Any:
        if isinstance(out, tuple):
            raise TypeError(
                f"{fn_name} returned a tuple of {len(out)} (e.g. (loss, logits)) but "
                f"{owner} was built without has_aux. Pass has_aux=True so that {fn_name} "
                "may return (scalar_loss, aux), or return only the scalar loss."
            )
        return out

    return check


def check_updates(updates: Any) -> None:
    if updates is not None and jax.tree_util.tree_leaves(updates):
        raise ValueError(
            "forward_gradient received non-empty updates, which it would discard: it "
            "replaces them by its own estimate of the gradient of value_fn. Call "
            "update(None, state, params, value_fn=...) (with nnx.Optimizer: "
            "optimizer.update(model, None, value_fn=fgrad_jax.nnx_value_fn(loss_fn, model, "
            "*batch))), and make forward_gradient the first transformation of its chain: "
            "transformations after it see the estimate. Inside an optax wrapper such as "
            "MultiSteps or apply_if_finite, put the wrapper after forward_gradient instead."
        )


def forward_gradient(
    key: int | Array = 0,
    *,
    num_tangents: int = 1,
    tangent: Tangent = "normal",
    perturb: str = "weights",
    tangent_chunk: int | None = None,
    has_aux: bool = False,
    aux_example: Any = None,
    mask: Any = None,
    on_nonfinite: str = "zero",
) -> optax.GradientTransformationExtraArgs:
    """Replaces the incoming updates by a forward-gradient estimate of ``value_fn``.

    ``update(None, state, params, *, value_fn, **extra_args)`` draws ``num_tangents``
    tangents from the key in the state and returns the estimate of ``∇ value_fn(params)``
    (Baydin et al. 2022) as the updates. It must be the first transformation of its chain
    and receive ``None`` (or an empty pytree, as ``nnx.Optimizer.update(model, None, ...)``
    passes): anything else would be discarded, so it raises at trace time. Transformations
    after it in :func:`optax.chain` see the estimate. Extra args it does not use are
    ignored. optax wrappers that feed it updates or part of the parameters
    (``MultiSteps``, ``masked``, ``multi_transform``, ``apply_if_finite``, ``lookahead``)
    raise at ``init`` with the equivalent recipe (put the wrapper after it).

    Non-finite steps: if the loss or a directional derivative is not finite,
    ``state.num_nonfinite`` is incremented and, with ``on_nonfinite="zero"`` (default), the
    updates are zeros. A stateless optimizer after it (``sgd``, :func:`fgd`) then leaves the
    parameters unchanged, but a stateful one still advances (Adam's momentum keeps moving
    the parameters). With ``on_nonfinite="nan"`` the updates are NaN instead, for
    ``optax.chain(forward_gradient(on_nonfinite="nan"), optax.apply_if_finite(opt, k))``:
    then a non-finite step leaves the parameters and ``opt``'s state bitwise unchanged
    (only this state's key, count and ``num_nonfinite`` and apply_if_finite's counters move).

    Args:
        key: An int seed or a JAX PRNG key (typed or legacy).
        num_tangents: Number K of tangents averaged per step (>= 1); they share one
            primal evaluation.
        perturb: ``"weights"`` or ``"activations"`` (Ren et al. 2023; then ``value_fn``
            returns per-example losses of shape ``(B,)`` and ``state.value`` is their
            mean), as in :func:`fgrad_jax.value_and_forward_grad`.
        tangent: ``"normal"``, ``"rademacher"``, ``"sphere"``, ``"orthogonal"``,
            ``"lowrank"``/:func:`fgrad_jax.lowrank`, or a callable
            ``tangent(key, tree) -> tree`` with ``E[v vᵀ] = I``.
        tangent_chunk: Process the K tangents this many at a time, one chunk after the
            other (bounded memory for K primal passes / chunk); see
            :func:`fgrad_jax.value_and_forward_grad`.
        has_aux: Whether ``value_fn`` returns ``(loss, aux)``. The aux of the step's own
            JVP pass is stored in the state (``forward_gradient_state(opt_state).aux``), so
            metrics need no second forward pass.
        aux_example: With ``has_aux``, a pytree of arrays or :class:`jax.ShapeDtypeStruct`
            with the aux's structure, shapes and dtypes, e.g.
            ``jax.eval_shape(value_fn, params)[1]``; the optimizer state needs a fixed
            structure from ``init`` on (under jit, ``lax.scan`` and ``nnx.Optimizer``).
        mask: ``None`` (all floating-point leaves), or a pytree of bools with the
            structure of ``params`` (or a prefix), or a callable ``params -> mask`` as
            :func:`optax.masked` takes. Leaves marked ``False`` get no tangents (the step
            costs less and the variance is that of the smaller problem) and exact zero
            updates: freeze layers with it, and mask the optimizer after it the same way.
        on_nonfinite: ``"zero"`` or ``"nan"``; see above.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` with state
        :class:`ForwardGradientState`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> import fgrad_jax
        >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
        >>> params = {"w": jnp.zeros(4)}
        >>> tx = optax.chain(fgrad_jax.forward_gradient(key=0, num_tangents=4), optax.sgd(0.1))
        >>> state = tx.init(params)
        >>> for _ in range(100):
        ...     updates, state = tx.update(None, state, params, value_fn=loss)
        ...     params = optax.apply_updates(params, updates)
        >>> bool(loss(params) < 1e-2)
        True
    """
    spec = EstimatorSpec.create(
        tangent=tangent,
        perturb=perturb,
        num_tangents=num_tangents,
        has_aux=has_aux,
        mask=mask,
        tangent_chunk=tangent_chunk,
        fn_name="value_fn",
    )
    seed_key = init_key(key)
    check_same_key_on_every_process(seed_key, "forward_gradient")
    if on_nonfinite not in _ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}; got {on_nonfinite!r}.")
    if has_aux and aux_example is None:
        raise ValueError(
            "forward_gradient(has_aux=True) needs aux_example=: a pytree of arrays or "
            "jax.ShapeDtypeStruct with the structure of value_fn's aux, e.g. "
            "jax.eval_shape(value_fn, params)[1]. The optimizer state holds the aux and "
            "must keep one structure from init on."
        )
    if aux_example is not None and not has_aux:
        raise ValueError("aux_example is only used with has_aux=True; pass has_aux=True.")
    placeholder = _aux_placeholder(aux_example) if has_aux else None

    def init_fn(params: optax.Params) -> ForwardGradientState:
        del params
        check_init_placement()
        return ForwardGradientState.create(
            key=seed_key,
            count=jnp.zeros([], jnp.int32),
            value=jnp.full([], jnp.nan, jnp.float32),
            num_nonfinite=jnp.zeros([], jnp.int32),
            aux=placeholder,
        )

    def update_fn(
        updates: optax.Updates,
        state: ForwardGradientState,
        params: optax.Params | None = None,
        *,
        value_fn: Callable[[optax.Params], Any] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ForwardGradientState]:
        del extra_args
        check_updates(updates)
        check_first_in_chain()
        if value_fn is None:
            raise ValueError(
                "forward_gradient needs the loss: call update(None, state, params, "
                "value_fn=loss_fn), where value_fn(params) returns a scalar loss. With "
                "nnx.Optimizer: optimizer.update(model, None, "
                "value_fn=fgrad_jax.nnx_value_fn(loss_fn, model, x, y)); with a linen "
                "TrainState: fgrad_jax.apply_forward_gradient(state, value_fn=...)."
            )
        return estimate_update(spec, state, params, value_fn, on_nonfinite, placeholder)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _compose(check: Callable[[Any], Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args, **kwargs: check(fn(*args, **kwargs))


def estimate_update(
    spec: EstimatorSpec,
    state: ForwardGradientState,
    params: Any,
    value_fn: Any,
    on_nonfinite: str = "zero",
    placeholder: Any = None,
) -> tuple[Any, ForwardGradientState]:
    """The body of ``forward_gradient(...).update`` after its placement checks: the step's
    estimate of ``∇ value_fn(params)`` (zeros or NaN if not finite) and the next state."""
    if not callable(value_fn):
        raise TypeError(
            f"value_fn must be callable params -> scalar; got {type(value_fn).__name__}."
        )
    if params is None:
        raise ValueError(
            "forward_gradient needs params: call update(None, state, params, value_fn=...)."
        )
    fun = (
        value_fn
        if spec.has_aux
        else _compose(_check_no_tuple("value_fn", "forward_gradient"), value_fn)
    )
    est = estimate_forward_grad(spec, fun, step_key(state.key, state.count), (params,), {})
    finite = all_finite(est.value, est.directional_derivatives)
    fill = jnp.nan if on_nonfinite == "nan" else 0
    new_updates = jax.tree_util.tree_map(
        lambda g: jnp.where(finite, g, jnp.full_like(g, fill)), est.grad
    )
    new_state = ForwardGradientState.create(
        key=state.key,
        count=optax.safe_increment(state.count),
        value=est.value.astype(jnp.float32),
        num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32),
        aux=_store_aux(est.aux, placeholder) if spec.has_aux else None,
    )
    return new_updates, new_state


def fgd(
    learning_rate: optax.ScalarOrSchedule,
    key: int | Array = 0,
    *,
    num_tangents: int | None = None,
    tangent: Tangent = "normal",
    has_aux: bool = False,
    aux_example: Any = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Forward Gradient Descent (Baydin et al. 2022, Algorithm 1).

    ``optax.chain(forward_gradient(key, ...), optax.sgd(learning_rate))``: each step
    draws a tangent, takes one JVP of ``value_fn`` and moves against ``d·v``. SGD keeps no
    state, so a non-finite step (zero update) leaves the parameters unchanged.

    Args:
        learning_rate: A float or an optax schedule.
        key: An int seed or a JAX PRNG key.
        num_tangents: Number of tangents averaged per step (>= 1); ``None`` means 1.
            (The default is ``None`` rather than ``1`` so that
            ``optax.inject_hyperparams(fgd)(learning_rate=...)`` works: it turns every
            numeric default into a traced hyperparameter, and the number of tangents
            must be static. To inject with ``num_tangents=4`` pass
            ``static_args=("num_tangents",)``.)
        tangent: Tangent distribution; see :func:`forward_gradient`. A callable tangent
            under ``optax.inject_hyperparams`` needs ``static_args=("tangent",)``, or it is
            mistaken for a schedule.
        has_aux: Whether ``value_fn`` returns ``(loss, aux)``; see :func:`forward_gradient`.
        aux_example: The aux's structure, with ``has_aux``; see :func:`forward_gradient`.
        mask: Which parameter leaves are trained; frozen leaves get no tangents and zero
            updates. See :func:`forward_gradient`.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`; pass ``value_fn=`` to ``update``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> import fgrad_jax
        >>> tx = fgrad_jax.fgd(optax.exponential_decay(0.1, 1, 0.999), key=1)
        >>> params = jnp.zeros(2)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(None, state, params, value_fn=lambda p: jnp.sum((p - 1) ** 2))
        >>> updates.shape
        (2,)
    """
    return optax.chain(
        forward_gradient(
            key,
            num_tangents=1 if num_tangents is None else num_tangents,
            tangent=tangent,
            has_aux=has_aux,
            aux_example=aux_example,
            mask=mask,
        ),
        optax.sgd(learning_rate),
    )

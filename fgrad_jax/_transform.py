"""The forward gradient as an optax gradient transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgrad_jax._activity import with_perturbation
from fgrad_jax._estimator import (
    all_finite,
    as_key,
    check_num_tangents,
    estimate_forward_grad,
)
from fgrad_jax._tangents import Tangent, resolve_tangent

Array = jax.Array


class ForwardGradientState(NamedTuple):
    """State of :func:`forward_gradient`.

    Attributes:
        key: PRNG key, split at every step; the step's tangents come from the split.
        count: Number of updates made so far (int32).
        value: Loss at the parameters of the last update, from the same JVP pass
            (float32; NaN before the first update).
        num_nonfinite: Number of steps whose directional derivative or loss was not
            finite; such a step's update is all zeros (int32).
    """

    key: Array
    count: Array
    value: Array
    num_nonfinite: Array


def _init_key(key: int | Array) -> Array:
    if isinstance(key, bool):
        raise TypeError("key must be an int seed or a JAX PRNG key, not a bool.")
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    # optax.inject_hyperparams turns an int seed into an int array hyperparameter.
    if isinstance(key, jax.Array) and key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
        return jax.random.key(key)
    return as_key(key)


def forward_gradient(
    key: int | Array = 0,
    *,
    num_tangents: int = 1,
    tangent: Tangent = "normal",
    perturb: str = "weights",
) -> optax.GradientTransformationExtraArgs:
    """Replaces the incoming updates by a forward-gradient estimate of ``value_fn``.

    ``update(updates, state, params, *, value_fn, **extra_args)`` ignores ``updates``
    (``None`` is fine), draws ``num_tangents`` tangents from the key in the state and
    returns the estimate of ``∇ value_fn(params)`` (Baydin et al. 2022) as the updates.
    Chain it before any optax optimizer. Extra args it does not use are ignored, so it
    works inside :func:`optax.chain` next to other ExtraArgs transformations.

    If the loss or a directional derivative is not finite, the step's updates are zeros
    (the parameters stay as they are) and ``state.num_nonfinite`` is incremented: a
    single bad batch never corrupts the parameters, and the count tells you it happened.

    Args:
        key: An int seed or a JAX PRNG key (typed or legacy).
        num_tangents: Number K of tangents averaged per step (>= 1); they share one
            primal evaluation.
        tangent: ``"normal"``, ``"rademacher"``, ``"sphere"``, ``"orthogonal"``, or a
            callable ``tangent(key, tree) -> tree`` with ``E[v vᵀ] = I``.
        perturb: ``"weights"`` or ``"activations"`` (Ren et al. 2023; then ``value_fn``
            returns per-example losses of shape ``(B,)`` and ``state.value`` is their
            mean), as in :func:`fgrad_jax.value_and_forward_grad`.

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
    num_tangents = check_num_tangents(num_tangents)
    tangent = with_perturbation(resolve_tangent(tangent), perturb)
    seed_key = _init_key(key)

    def init_fn(params: optax.Params) -> ForwardGradientState:
        del params
        return ForwardGradientState(
            key=seed_key,
            count=jnp.zeros([], jnp.int32),
            value=jnp.full([], jnp.nan, jnp.float32),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: optax.Updates,
        state: ForwardGradientState,
        params: optax.Params | None = None,
        *,
        value_fn: Callable[[optax.Params], Array] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ForwardGradientState]:
        del updates, extra_args
        if value_fn is None:
            raise ValueError(
                "forward_gradient needs the loss: call update(updates, state, params, "
                "value_fn=loss_fn), where value_fn(params) returns a scalar loss (with "
                "nnx.Optimizer: optimizer.update(model, grads, value_fn=loss_fn))."
            )
        if not callable(value_fn):
            raise TypeError(
                f"value_fn must be callable params -> scalar; got {type(value_fn).__name__}."
            )
        if params is None:
            raise ValueError(
                "forward_gradient needs params: call update(updates, state, params, value_fn=...)."
            )
        next_key, step_key = jax.random.split(state.key)
        est = estimate_forward_grad(
            value_fn,
            step_key,
            (params,),
            {},
            num_tangents=num_tangents,
            tangent=tangent,
            fn_name="value_fn",
        )
        finite = all_finite(est.value, est.directional_derivatives)
        new_updates = jax.tree_util.tree_map(
            lambda g: jnp.where(finite, g, jnp.zeros_like(g)), est.grad
        )
        new_state = ForwardGradientState(
            key=next_key,
            count=optax.safe_increment(state.count),
            value=est.value.astype(jnp.float32),
            num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unwrap_variable(x: Any) -> Any:
    # flax.nnx.Optimizer wraps every optimizer-state array in an OptArray variable.
    return x.get_value() if hasattr(x, "get_value") and not isinstance(x, jax.Array) else x


def forward_gradient_state(opt_state: Any) -> ForwardGradientState:
    """Finds the :class:`ForwardGradientState` inside any optimizer state.

    Works on the state of :func:`fgd`, of an :func:`optax.chain` or
    :func:`optax.inject_hyperparams` around :func:`forward_gradient`, and on
    ``nnx.Optimizer.opt_state`` (whose variables it unwraps to arrays), so a training loop can
    log ``forward_gradient_state(opt_state).value`` (the loss from the step's own JVP pass)
    without depending on the chain's layout.

    Args:
        opt_state: An optimizer state containing exactly one :class:`ForwardGradientState`.

    Returns:
        That state, with plain arrays as fields.

    Raises:
        ValueError: If ``opt_state`` holds no :class:`ForwardGradientState`, or several.

    Example:
        >>> import jax.numpy as jnp
        >>> import fgrad_jax
        >>> tx = fgrad_jax.fgd(0.1)
        >>> params = jnp.zeros(3)
        >>> _, state = tx.update(None, tx.init(params), params, value_fn=lambda p: jnp.sum((p - 1) ** 2))
        >>> float(fgrad_jax.forward_gradient_state(state).value)
        3.0
    """
    found = [
        leaf
        for leaf in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, ForwardGradientState)
        )
        if isinstance(leaf, ForwardGradientState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"Expected exactly one ForwardGradientState in the optimizer state, found "
            f"{len(found)}. Pass the state of a transformation built with forward_gradient or fgd."
        )
    return ForwardGradientState(*(_unwrap_variable(x) for x in found[0]))


def fgd(
    learning_rate: optax.ScalarOrSchedule,
    key: int | Array = 0,
    *,
    num_tangents: int | None = None,
    tangent: Tangent = "normal",
) -> optax.GradientTransformationExtraArgs:
    """Forward Gradient Descent (Baydin et al. 2022, Algorithm 1).

    ``optax.chain(forward_gradient(key, ...), optax.sgd(learning_rate))``: each step
    draws a tangent, takes one JVP of ``value_fn`` and moves against ``d·v``.

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
            key, num_tangents=1 if num_tangents is None else num_tangents, tangent=tangent
        ),
        optax.sgd(learning_rate),
    )

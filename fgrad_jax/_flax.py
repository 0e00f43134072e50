"""Helpers for training Flax models (nnx and linen) with forward gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from fgrad_jax._estimator import check_num_tangents, estimate_forward_grad
from fgrad_jax._tangents import Tangent, resolve_tangent

Array = jax.Array


def nnx_value_fn(
    loss_fn: Callable[..., Array],
    model: nnx.Module,
    *args: Any,
    wrt: Any = nnx.Param,
    **kwargs: Any,
) -> Callable[[Any], Array]:
    """Builds the ``value_fn`` that :func:`fgrad_jax.forward_gradient` needs from an nnx model.

    ``value_fn(params)`` merges ``params`` (the ``wrt`` state, as
    :class:`flax.nnx.Optimizer` passes it) into a *copy* of ``model`` and returns
    ``loss_fn(model_copy, *args, **kwargs)``. The copy is required: the JVP traces the
    model, and merging in place would leak tracers into it (flax raises a trace-level
    error without ``copy=True``).

    Because it works on a copy, any state the forward pass mutates (BatchNorm batch
    statistics, the counters of ``nnx.Rngs`` streams used by Dropout) is discarded. For
    such models use :func:`nnx_value_and_forward_grad`, which writes that state back.

    Args:
        loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar``.
        model: The nnx model.
        *args: Positional arguments for ``loss_fn`` after the model (e.g. a batch).
        wrt: Filter of the differentiated state; must match the optimizer's ``wrt``.
        **kwargs: Keyword arguments for ``loss_fn``.

    Returns:
        ``value_fn(params) -> scalar``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import fgrad_jax
        >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
        >>> tx = optax.chain(fgrad_jax.forward_gradient(key=0), optax.sgd(0.1))
        >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
        >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
        >>> _ = optimizer.update(model, None, value_fn=fgrad_jax.nnx_value_fn(loss_fn, model, x, y))
    """
    graphdef, _, rest = nnx.split(model, wrt, ...)

    def value_fn(params: Any) -> Array:
        copy = nnx.merge(graphdef, params, rest, copy=True)
        return loss_fn(copy, *args, **kwargs)

    return value_fn


def nnx_value_and_forward_grad(
    loss_fn: Callable[..., Any],
    *,
    wrt: Any = nnx.Param,
    num_tangents: int = 1,
    tangent: Tangent = "normal",
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Any]]:
    """Forward-gradient analogue of :func:`flax.nnx.value_and_grad` for nnx models.

    Returns ``fn(key, model, *args, **kwargs) -> (loss, grads)`` (``((loss, aux), grads)``
    with ``has_aux``), where ``grads`` is an :class:`flax.nnx.State` of the ``wrt``
    variables, ready for ``optimizer.update(model, grads)`` with any plain optax
    optimizer. State that the forward pass mutates (BatchNorm batch statistics, Dropout's
    ``nnx.Rngs`` counters) is written back into ``model`` once, from the primal pass of
    the JVP, just as :func:`flax.nnx.value_and_grad` does.

    Args:
        loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (or ``(scalar, aux)``).
        wrt: Filter of the differentiated variables (default :class:`flax.nnx.Param`).
        num_tangents: Number of tangents averaged (>= 1).
        tangent: Tangent distribution, as in :func:`fgrad_jax.forward_grad`.
        has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
        ``fn(key, model, *args, **kwargs)``; ``key`` is a JAX PRNG key, new every step.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import fgrad_jax
        >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
        >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
        >>> grad_fn = fgrad_jax.nnx_value_and_forward_grad(loss_fn, num_tangents=2)
        >>> loss, grads = grad_fn(jax.random.key(0), model, jnp.ones((8, 3)))
        >>> _ = optimizer.update(model, grads)
    """
    num_tangents = check_num_tangents(num_tangents)
    tangent = resolve_tangent(tangent)

    def fn(key: Array, model: nnx.Module, *args: Any, **kwargs: Any):
        graphdef, params, rest = nnx.split(model, wrt, ...)

        def value_fn(p: Any):
            copy = nnx.merge(graphdef, p, rest, copy=True)
            out = loss_fn(copy, *args, **kwargs)
            loss, aux = out if has_aux else (out, None)
            _, _, new_rest = nnx.split(copy, wrt, ...)
            return loss, (aux, new_rest)

        est = estimate_forward_grad(
            value_fn,
            key,
            (params,),
            {},
            num_tangents=num_tangents,
            tangent=tangent,
            has_aux=True,
            fn_name="loss_fn",
        )
        aux, new_rest = est.aux
        nnx.update(model, new_rest)
        if has_aux:
            return (est.value, aux), est.grad
        return est.value, est.grad

    return fn


def apply_forward_gradient(
    state: Any, *, value_fn: Callable[[Any], Array], **extra_args: Any
) -> Any:
    """One optimisation step of a linen ``TrainState`` whose ``tx`` contains :func:`forward_gradient`.

    :meth:`flax.training.train_state.TrainState.apply_gradients` sends its keyword
    arguments to ``replace``, not to ``tx.update``, so it cannot pass ``value_fn``. This
    does what it does (update, apply, ``step + 1``) and forwards ``value_fn`` and
    ``extra_args`` to ``tx.update``.

    Args:
        state: A :class:`flax.training.train_state.TrainState` (or subclass).
        value_fn: ``value_fn(params) -> scalar``, e.g. a closure over ``state.apply_fn``
            and the batch.
        **extra_args: Further extra args for ``tx.update``.

    Returns:
        The new state.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> import flax.linen as nn
        >>> from flax.training.train_state import TrainState
        >>> import fgrad_jax
        >>> model = nn.Dense(1)
        >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> state = TrainState.create(apply_fn=model.apply, params=params, tx=fgrad_jax.fgd(0.1))
        >>> loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
        >>> state = fgrad_jax.apply_forward_gradient(state, value_fn=loss)
        >>> int(state.step)
        1
    """
    updates, new_opt_state = state.tx.update(
        None, state.opt_state, state.params, value_fn=value_fn, **extra_args
    )
    new_params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state)

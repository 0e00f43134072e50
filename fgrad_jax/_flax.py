"""Helpers for training Flax models (nnx and linen) with forward gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import optax
from flax import nnx
from flax.nnx import graph

from fgrad_jax._estimator import estimate_forward_grad
from fgrad_jax._spec import EstimatorSpec
from fgrad_jax._tangents import Tangent

Array = jax.Array


class _Detached:
    """An nnx graph node passed to ``loss_fn``, split outside the JVP and copied inside it.

    Mutating an object created outside a JAX trace from inside it is a flax trace-level
    error (e.g. drawing a Dropout key from ``nnx.Rngs`` in the loss), so ``loss_fn`` gets a
    copy made inside the trace; its new state can then be written back after the estimate.
    """

    def __init__(self, node: Any):
        self.node = node
        self.graphdef, self.state = nnx.split(node)

    def copy(self) -> Any:
        return nnx.merge(self.graphdef, self.state, copy=True)


def split_wrt(node: Any, wrt: Any) -> tuple[nnx.GraphDef[Any], nnx.State, nnx.State]:
    """``nnx.split(node, wrt, ...)``: the graph, the state selected by ``wrt`` and the rest."""
    # cast: nnx.split's overload for two or more filters returns a variadic tuple of states.
    return cast("tuple[nnx.GraphDef[Any], nnx.State, nnx.State]", nnx.split(node, wrt, ...))


def _detach(args: tuple, kwargs: dict, fork_rngs: bool) -> tuple[list, dict]:
    def one(x):
        if not graph.is_graph_node(x):
            return x
        if fork_rngs and isinstance(x, nnx.Rngs):
            # The copy's draws cannot be written back on this path: fork, which advances
            # the caller's streams once per step, so every step draws new keys.
            x = x.fork()
        return _Detached(x)

    return [one(a) for a in args], {k: one(v) for k, v in kwargs.items()}


def _attach(args: list, kwargs: dict) -> tuple[list, dict, list]:
    copies = []

    def one(x):
        if isinstance(x, _Detached):
            copies.append((x, x.copy()))
            return copies[-1][1]
        return x

    return [one(a) for a in args], {k: one(v) for k, v in kwargs.items()}, copies


def _split_loss(out: Any, has_aux: bool, fn_name: str) -> tuple[Any, Any]:
    if has_aux:
        return out
    if isinstance(out, tuple):
        raise TypeError(
            f"{fn_name} returned a tuple of {len(out)} (e.g. (loss, logits)); pass "
            "has_aux=True so that it may return (scalar_loss, aux), or return only the loss."
        )
    return out, None


def _check_params(params: Any, expected: Any, wrt: Any) -> None:
    # Any: jaxlib ships no type stub for PyTreeDef (mypy cannot compare it).
    got: Any = jax.tree_util.tree_structure(params)
    want: Any = jax.tree_util.tree_structure(nnx.as_pure(expected))
    if got != want:
        raise ValueError(
            f"The optimizer passed {got.num_leaves} parameter leaves, but nnx_value_fn's "
            f"wrt={wrt!r} selects {want.num_leaves} (or other paths): the two filters "
            "differ. Pass the optimizer's filter: nnx_value_fn(loss_fn, model, *batch, "
            "wrt=optimizer.wrt)."
        )


def _changed(before: list, after: list) -> bool:
    return len(before) != len(after) or any(a is not b for a, b in zip(before, after))


def _mutation_error(what: str) -> ValueError:
    return ValueError(
        f"loss_fn changed the state of {what} (BatchNorm batch statistics, or RNG counters "
        "of an nnx.Rngs stored in the model, as Dropout(rngs=...) uses) during the "
        "forward pass. nnx.Optimizer.update(model, None, value_fn=...) cannot write that "
        "state back, so it would be lost silently. Use "
        "grad_fn = fgrad_jax.nnx_value_and_forward_grad(loss_fn) and "
        "optimizer.update(model, grad_fn(key, model, *batch)[1]) with a plain optax "
        "optimizer: it writes the state back once per step (pass nnx.Rngs to loss_fn as an "
        "argument, or call model.eval() for a pass that mutates nothing)."
    )


def nnx_value_fn(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    **kwargs: Any,
) -> Callable[[Any], Any]:
    """Builds the ``value_fn`` that :func:`fgrad_jax.forward_gradient` needs from an nnx model.

    ``value_fn(params)`` merges ``params`` (the ``wrt`` state, as
    :class:`flax.nnx.Optimizer` passes it) into a *copy* of ``model`` and returns
    ``loss_fn(model_copy, *args, **kwargs)``. The copy is required: the JVP traces the
    model, and merging in place would leak tracers into it.

    nnx graph objects among ``args``/``kwargs`` are copied the same way; an ``nnx.Rngs``
    argument (the nnx tutorial's ``loss_fn(model, rngs, batch)``, Dropout keys drawn inside
    the loss) is forked first, which advances its streams once per step. State that the
    forward pass mutates cannot come back out of ``optimizer.update``, so a ``loss_fn``
    that changes the model's state (BatchNorm in training mode, Dropout with its own
    stored ``rngs``) raises an error at trace time naming
    :func:`nnx_value_and_forward_grad`, which handles such models.

    Args:
        loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (or ``(scalar, aux)``).
        model: The nnx model.
        *args: Positional arguments for ``loss_fn`` after the model (e.g. a batch).
        wrt: Filter of the differentiated state; must match the optimizer's ``wrt``
            (``wrt=optimizer.wrt`` always does); a mismatch is an error.
        has_aux: Whether ``loss_fn`` returns ``(loss, aux)``; then use
            ``forward_gradient(has_aux=True, aux_example=...)``.
        **kwargs: Keyword arguments for ``loss_fn``.

    Returns:
        ``value_fn(params) -> scalar`` (or ``(scalar, aux)``).

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
    graphdef, expected, rest = split_wrt(model, wrt)
    d_args, d_kwargs = _detach(args, kwargs, fork_rngs=True)

    def value_fn(params: Any) -> Any:
        _check_params(params, expected, wrt)
        copy = nnx.merge(graphdef, params, rest, copy=True)
        c_args, c_kwargs, copies = _attach(d_args, d_kwargs)
        before = [jax.tree_util.tree_leaves(nnx.state(copy, nnx.Not(wrt)))]
        before += [jax.tree_util.tree_leaves(nnx.state(c)) for _, c in copies]
        out = loss_fn(copy, *c_args, **c_kwargs)
        if _changed(before[0], jax.tree_util.tree_leaves(nnx.state(copy, nnx.Not(wrt)))):
            raise _mutation_error("the model")
        for (d, c), b in zip(copies, before[1:]):
            if not isinstance(d.node, nnx.Rngs) and _changed(
                b, jax.tree_util.tree_leaves(nnx.state(c))
            ):
                raise _mutation_error(f"the argument {type(d.node).__name__}")
        loss, aux = _split_loss(out, has_aux, "loss_fn")
        return (loss, aux) if has_aux else loss

    return value_fn


def nnx_value_and_forward_grad(
    loss_fn: Callable[..., Any],
    *,
    wrt: Any = nnx.Param,
    num_tangents: int = 1,
    tangent: Tangent = "normal",
    has_aux: bool = False,
    mask: Any = None,
    tangent_chunk: int | None = None,
    perturb: str = "weights",
) -> Callable[..., tuple[Any, Any]]:
    """Forward-gradient analogue of :func:`flax.nnx.value_and_grad` for nnx models.

    Returns ``fn(key, model, *args, **kwargs) -> (loss, grads)`` (``((loss, aux), grads)``
    with ``has_aux``), where ``grads`` is an :class:`flax.nnx.State` of the ``wrt``
    variables, ready for ``optimizer.update(model, grads)`` with any plain optax
    optimizer. State that the forward pass mutates (BatchNorm batch statistics, Dropout's
    ``nnx.Rngs`` counters, in the model or in an ``nnx.Rngs`` passed to ``loss_fn``) is
    written back once, from the primal pass of the JVP, just as
    :func:`flax.nnx.value_and_grad` does. The loss and aux come from that same pass.

    Args:
        loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (or ``(scalar, aux)``).
        wrt: Filter of the differentiated variables (default :class:`flax.nnx.Param`).
        num_tangents: Number of tangents averaged (>= 1).
        tangent: Tangent distribution, as in :func:`fgrad_jax.forward_grad`.
        has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
        mask: Which ``wrt`` leaves get tangents (see :func:`fgrad_jax.forward_gradient`);
            the others get zeros. ``wrt`` filters usually express this more simply.
        tangent_chunk: Tangents per chunk, to bound memory (see
            :func:`fgrad_jax.value_and_forward_grad`).
        perturb: ``"weights"`` or ``"activations"`` (then ``loss_fn`` returns
            per-example losses of shape ``(B,)`` and the reported loss is their mean), as
            in :func:`fgrad_jax.value_and_forward_grad`.

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
    spec = EstimatorSpec.create(
        tangent=tangent,
        perturb=perturb,
        num_tangents=num_tangents,
        has_aux=True,
        mask=mask,
        tangent_chunk=tangent_chunk,
        fn_name="loss_fn",
    )

    def fn(key: Array, model: nnx.Module, *args: Any, **kwargs: Any):
        graphdef, params, rest = split_wrt(model, wrt)
        d_args, d_kwargs = _detach(args, kwargs, fork_rngs=False)

        def value_fn(p: Any):
            copy = nnx.merge(graphdef, p, rest, copy=True)
            c_args, c_kwargs, copies = _attach(d_args, d_kwargs)
            loss, aux = _split_loss(loss_fn(copy, *c_args, **c_kwargs), has_aux, "loss_fn")
            _, _, new_rest = split_wrt(copy, wrt)
            return loss, (aux, new_rest, [nnx.state(c) for _, c in copies])

        est = estimate_forward_grad(spec, value_fn, key, (params,), {})
        aux, new_rest, new_arg_states = est.aux
        nnx.update(model, new_rest)
        detached = [x for x in (*d_args, *d_kwargs.values()) if isinstance(x, _Detached)]
        for d, state in zip(detached, new_arg_states):
            nnx.update(d.node, state)
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

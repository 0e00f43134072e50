"""The tangent-strategy protocol: how one family of tangents enters the estimator.

Every estimate runs the same pipeline (``_estimator.estimate_forward_grad``)::

    flatten the selected floating leaves  ->  strategy.prepare(key, primals, K, selection)
      ->  vmap over the K tangents of strategy.direction(fun, primals, context, inputs)
      ->  strategy.sum_tangents(kept, shared, context)   # once per chunk, optional
      ->  strategy.combine(derivatives, primals, context, kept)  ->  unflatten

``prepare`` returns per-tangent ``inputs`` (every leaf with a leading axis of size K, what
the vmap maps over) and a ``context`` shared by all K (seeds, options): each strategy names
its context's type (``TangentStrategy[MyContext]``), usually a small ``NamedTuple``.
``direction`` runs one JVP and returns a :class:`Direction`; its ``kept`` is whatever the
JVP drew that ``combine`` needs again (the vmap stacks it over K). ``sum_tangents`` runs
once per chunk of tangents, right after the vmap: a strategy whose estimate is linear in
something per-tangent (activity perturbation: the cotangent of each weight contraction)
sums it there and contracts once, instead of once per tangent. ``combine`` turns the K
directional derivatives into one estimate per leaf. The primal does not depend on the
tangent, so under the vmap it is computed once and only the tangent work is batched.

See :doc:`/writing_an_estimator` for a complete new strategy.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Context = TypeVar("Context")


class Selection(NamedTuple):
    """Which leaves are differentiated.

    Attributes:
        tree: The differentiated argument as given (a tuple of arguments for a tuple
            ``argnums``), for strategies that need its structure (a user's sampler, a
            guess of the gradient, per-leaf options).
        indices: The flat indices, into ``jax.tree.leaves(tree)``, of the leaves that get
            tangents (floating point and selected by the mask), in the order of
            ``primals``.
    """

    tree: Any
    indices: tuple[int, ...]


class Direction(NamedTuple):
    """One tangent's JVP, as :meth:`TangentStrategy.direction` returns it.

    Attributes:
        value: The function's value (does not depend on the tangent: one copy for all K).
        derivative: The directional derivative (batched over the K tangents).
        aux: The function's aux (one copy for all K), or ``None``.
        kept: Whatever :meth:`TangentStrategy.combine` needs from this tangent (batched
            over the K tangents), or ``None``.
        shared: Tangent-independent values for :meth:`TangentStrategy.sum_tangents`.
    """

    value: Array
    derivative: Array
    aux: Any
    kept: Any
    shared: Any = None


def check_scalar(out: Any, fn_name: str) -> Array:
    """``out`` as a floating-point scalar, or an error naming the fix."""
    out = jnp.asarray(out) if not isinstance(out, jax.Array) else out
    if out.shape != ():
        raise ValueError(
            f"{fn_name} must return a scalar loss (shape ()), got shape {out.shape}. "
            "Reduce it, e.g. with .mean() or .sum(); with has_aux=True return (scalar, aux)."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{fn_name} must return a floating-point scalar; got dtype {out.dtype}.")
    return out


class TangentStrategy(abc.ABC, Generic[Context]):
    """One family of tangent distributions: pass an instance as ``tangent=``.

    Subclass it with your context's type, ``class Mine(TangentStrategy[MyContext])``, and
    implement :meth:`prepare`, :meth:`direction` and :meth:`combine`; override
    :meth:`check_value` or :meth:`sum_tangents` (with :attr:`sums_tangents`) only when the
    strategy needs them. Strategies are immutable (frozen dataclasses): the estimator
    builds nothing on them.
    """

    #: ``True`` when :meth:`sum_tangents` returns one sum per chunk instead of ``kept`` with
    #: its K axis: the pipeline then adds the chunks' sums rather than stacking them.
    sums_tangents: ClassVar[bool] = False
    #: ``False`` when the K tangents must go through one vmap together (the guided
    #: estimator's K + 1 tangents): the pipeline then never splits them into chunks.
    chunks_tangents: ClassVar[bool] = True

    def check_value(self, value: Any, fn_name: str) -> Array:
        """Checks the function's value (by default a floating-point scalar) and returns it."""
        return check_scalar(value, fn_name)

    def sum_tangents(self, kept: Any, shared: Any, context: Context) -> Any:
        """Runs after the vmap over one chunk of tangents (same trace), with the JVP's
        ``kept`` (K axis first) and ``shared``: by default ``kept`` unchanged; see
        :attr:`sums_tangents`."""
        return kept

    @abc.abstractmethod
    def prepare(
        self, key: Array, primals: list[Array], num_tangents: int, selection: Selection
    ) -> tuple[Any, Context]:
        """Returns ``(inputs, context)``: ``inputs`` with a leading K axis on every leaf."""

    @abc.abstractmethod
    def direction(
        self, fun: Callable[..., Any], primals: list[Array], context: Context, inputs: Any
    ) -> Direction:
        """One directional derivative of ``fun`` (``fun(*primals) -> (value, aux)``) along
        the tangent that ``inputs`` (one slice of :meth:`prepare`'s) describes."""

    @abc.abstractmethod
    def combine(
        self, derivatives: Array, primals: list[Array], context: Context, kept: Any
    ) -> list[Array]:
        """The estimate ``(1/K) Σ_k d_k v_k`` for every leaf, in the leaves' dtypes."""


def mean_of_products(derivatives: Array, tangents: Array, divide: bool = False) -> Array:
    """``(1/K) Σ_k d_k v_k`` in float32 as an unrolled elementwise sum for small K.

    An explicit sum (rather than a tensordot over K) stays one elementwise expression,
    which XLA fuses with the tangent draw and the optimizer's update. ``divide`` divides by
    K instead of multiplying by ``1/K`` (the low-rank estimator's dense leaves always have;
    the two differ in the last bit, and estimates are kept bit for bit).

    Args:
        derivatives: The K directional derivatives, float32 of shape ``(K,)``.
        tangents: The K tangents of one leaf, shape ``(K, *leaf.shape)``, any floating dtype.
        divide: Divide by K rather than multiply by ``1/K``.

    Returns:
        A float32 array of the leaf's shape.

    Example:
        >>> import jax.numpy as jnp
        >>> import fgrad_jax
        >>> d = jnp.array([2.0, -1.0])
        >>> v = jnp.array([[1.0, 1.0], [1.0, -1.0]])
        >>> fgrad_jax.mean_of_products(d, v)  # (2 v_1 - v_2) / 2
        Array([0.5, 1.5], dtype=float32)
    """
    k = tangents.shape[0]
    if k > 16:
        acc = jnp.tensordot(derivatives, tangents.astype(jnp.float32), axes=1)
    else:
        acc = derivatives[0] * tangents[0].astype(jnp.float32)
        for i in range(1, k):
            acc = acc + derivatives[i] * tangents[i].astype(jnp.float32)
    if k == 1 and not divide:
        return acc
    return acc / np.float32(k) if divide else acc * np.float32(1.0 / k)

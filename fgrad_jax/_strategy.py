"""The tangent-strategy protocol: how one family of tangents enters the estimator.

Every estimate runs the same pipeline (``_estimator.estimate_forward_grad``)::

    flatten the selected floating leaves  ->  strategy.prepare(key, primals, K, selection)
      ->  vmap over the K tangents of strategy.direction(fun, primals, context, inputs)
      ->  strategy.combine(derivatives, primals, context, kept)  ->  unflatten

``prepare`` returns per-tangent ``inputs`` (every leaf with a leading axis of size K, what
the vmap maps over) and a ``context`` shared by all K (seeds, options). ``direction`` runs
one JVP and returns ``(value, derivative, aux, kept)``; ``kept`` is whatever the JVP drew
that ``combine`` needs again (the vmap stacks it over K). ``sum_tangents`` then runs once
per chunk of tangents, right after the vmap: a strategy whose estimate is linear in
something per-tangent (activity perturbation: the cotangent of each weight contraction)
sums it there and contracts once, instead of once per tangent. ``combine`` turns the K
directional derivatives into one estimate per leaf. The primal does not depend on the
tangent, so under the vmap it is computed once and only the tangent work is batched.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Selection(NamedTuple):
    """Which leaves are differentiated: the flat indices ``indices`` into the leaves of ``tree``
    (the differentiated argument as given; a tuple of arguments for a tuple ``argnums``)."""

    tree: Any
    indices: tuple[int, ...]


class Direction(NamedTuple):
    """One tangent's JVP: ``kept`` is batched over the tangents; ``value``, ``aux`` and
    ``shared`` do not depend on the tangent (one copy for all K; ``shared`` is for
    :meth:`TangentStrategy.sum_tangents`)."""

    value: Array
    derivative: Array
    aux: Any
    kept: Any
    shared: Any = None


class TangentStrategy(abc.ABC):
    """One family of tangent distributions (dense samples, counter hashes, low rank, ...)."""

    #: ``True`` when :meth:`sum_tangents` returns one sum per chunk instead of ``kept`` with
    #: its K axis: the pipeline then adds the chunks' sums rather than stacking them.
    sums_tangents: ClassVar[bool] = False

    def sum_tangents(self, kept: Any, shared: Any, context: Any) -> Any:
        """Runs after the vmap over one chunk of tangents (same trace), with the JVP's
        ``kept`` (K axis first) and ``shared``: by default ``kept`` unchanged; see
        :attr:`sums_tangents`."""
        return kept

    @abc.abstractmethod
    def prepare(
        self, key: Array, primals: list[Array], num_tangents: int, selection: Selection
    ) -> tuple[Any, Any]:
        """Returns ``(inputs, context)``: ``inputs`` with a leading K axis on every leaf."""

    @abc.abstractmethod
    def direction(
        self, fun: Callable[..., Any], primals: list[Array], context: Any, inputs: Any
    ) -> Direction:
        """One directional derivative of ``fun`` (``fun(*primals) -> (value, aux)``)."""

    @abc.abstractmethod
    def combine(
        self, derivatives: Array, primals: list[Array], context: Any, kept: Any
    ) -> list[Array]:
        """The estimate ``(1/K) Σ_k d_k v_k`` for every leaf, in the leaves' dtypes."""


def mean_of_products(derivatives: Array, tangents: Array, divide: bool = False) -> Array:
    """``(1/K) Σ_k d_k v_k`` in float32 as an unrolled elementwise sum for small K.

    An explicit sum (rather than a tensordot over K) stays one elementwise expression,
    which XLA fuses with the tangent draw and the optimizer's update. ``divide`` divides by
    K instead of multiplying by ``1/K`` (the low-rank estimator's dense leaves always have;
    the two differ in the last bit, and estimates are kept bit for bit).
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

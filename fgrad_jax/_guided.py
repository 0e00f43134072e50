"""Guided tangents: forward gradients around a guess of the gradient's direction.

With a unit guess ``ĝ`` (over all differentiated leaves) and ``P = I − ĝĝᵀ``, the estimate is

    g = (∇f·ĝ) ĝ + λ (1/K) Σ_k (∇f·P u_k) P u_k

with ``u_k`` isotropic counter-hash tangents (``E[u uᵀ] = I``). The first term is the
projection of the gradient on the guess (Fournier et al. 2023, "Can Forward Gradient Match
Backpropagation?"); the second is a forward gradient of the rest, shrunk by ``λ``. Since
``E[P u uᵀ P] = P``, ``E[g] = ĝĝᵀ∇f + λ P∇f = ∇f − (1 − λ) P ∇f``.

All K+1 directional derivatives come from one JVP: tangent ``K`` is ``ĝ`` (giving
``γ = ∇f·ĝ``) and tangents ``0..K−1`` are the plain ``u_k``; since ``∇f·P u_k = ∇f·u_k − c_k γ``
with ``c_k = ĝ·u_k``, the projected tangents are never formed in the JVP, and the update
draws the ``u_k`` again from their seeds (as the counter-hash tangents do).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgrad_jax import _interpreter, _random
from fgrad_jax._spec import EstimatorSpec, is_differentiable
from fgrad_jax._state import ForwardGradientState
from fgrad_jax._strategy import Direction, Selection, TangentStrategy
from fgrad_jax._tangents import HashedTangents, hashed_distribution
from fgrad_jax._transform import check_updates, estimate_update, forward_gradient

Array = jax.Array


def _check_unit_interval(value: Any, name: str, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a float in [0, 1]; got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] ({fix}); got {value!r}.")
    return float(value)


class GuidedContext(NamedTuple):
    """What :class:`Guided` prepares (``c_k = ĝ·u_k``, ``scale = λ`` or 1 without a guess)."""

    seeds: Array
    bases: list[int]  # each leaf's first counter (_random.leaf_streams)
    draws: list[Callable[[Array, Array], Array]]
    unit: list[Array]
    c: Any  # (K,) float32
    scale: Array
    schedule: _interpreter.Schedule
    num_tangents: int


@dataclasses.dataclass(frozen=True, eq=False)
class Guided(TangentStrategy[GuidedContext]):
    """Tangents around a guess; see :func:`fgrad_jax.guided`.

    Attributes:
        guess: A pytree with the structure of the differentiated argument (its floating
            leaves give the direction ``ĝ`` after normalisation over all of them).
        residual_scale: ``λ`` in ``[0, 1]``, the weight of the isotropic residual.
        base: The counter-hash law of the isotropic tangents ``u``.
    """

    guess: Any
    residual_scale: float
    base: HashedTangents
    # The guess's tangent is the (K+1)-th of one vmap: the K + 1 go through together.
    chunks_tangents: ClassVar[bool] = False

    def _unit_guess(self, primals: list[Array], selection: Selection) -> tuple[list[Array], Array]:
        leaves = jax.tree_util.tree_leaves(self.guess)
        want = jax.tree_util.tree_leaves(selection.tree)
        if len(leaves) != len(want):
            raise ValueError(
                f"The guess must have the structure of the differentiated argument: it has "
                f"{len(leaves)} leaves, the argument {len(want)}."
            )
        picked = [jnp.asarray(leaves[i], jnp.float32) for i in selection.indices]
        for g, p in zip(picked, primals):
            if g.shape != p.shape:
                raise ValueError(
                    f"A guess leaf has shape {g.shape}, its parameter {p.shape}; give the guess "
                    "the parameters' shapes."
                )
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in picked))
        has_guess = norm > 0
        inv = jnp.where(has_guess, 1.0 / jnp.where(has_guess, norm, 1.0), 0.0)
        # The guess in each leaf's dtype, the values the JVP and the update both use.
        unit = [(g * inv).astype(p.dtype).astype(jnp.float32) for g, p in zip(picked, primals)]
        return unit, has_guess

    def prepare(self, key, primals, num_tangents, selection: Selection):
        unit, has_guess = self._unit_guess(primals, selection)
        # The K isotropic tangents are those of `base` for the same key (one stream).
        seeds, bases = _random.leaf_streams(key, [p.size for p in primals], num_tangents)
        for p in primals:  # tangent K (the guess) also takes a counter range
            _random.check_counter_range((num_tangents + 1, *p.shape))
        # c_k = ĝ·u_k, one reduction over the draws (fused, not stored).
        c = sum(
            jnp.sum(
                (
                    self.base.draw(seeds[i], (num_tangents, *p.shape), _base(bases[i])) * unit[i]
                ).reshape(num_tangents, -1),
                axis=1,
            )
            for i, p in enumerate(primals)
        )
        scale = jnp.where(has_guess, jnp.float32(self.residual_scale), jnp.float32(1.0))
        schedule = _interpreter.schedule_for(primals)
        draws = [self.base.lazy_draw(p, False, b) for p, b in zip(primals, bases)]
        context = GuidedContext(seeds, bases, draws, unit, c, scale, schedule, num_tangents)
        return jnp.arange(num_tangents + 1, dtype=jnp.uint32), context

    def direction(self, fun, primals, context: GuidedContext, k) -> Direction:
        seeds, draws, unit = context.seeds, context.draws, context.unit

        def tangent(zero, i):
            u = draws[i](seeds[i] ^ zero, k)
            return jnp.where(k == context.num_tangents, unit[i].astype(u.dtype), u)

        lazy = [
            _interpreter.LazyTangent(functools.partial(tangent, i=i)) for i in range(len(primals))
        ]
        (value, aux), (deriv, _) = _interpreter.structured_jvp(fun, primals, lazy, context.schedule)
        return Direction(value, deriv, aux, None)

    def combine(self, derivatives, primals, context: GuidedContext, kept):
        unit, c, scale = context.unit, context.c, context.scale
        gamma = derivatives[context.num_tangents]
        projected = derivatives[: context.num_tangents] - c * gamma  # ∇f·P u_k
        # (1/K) Σ d_k u_k, the u_k drawn again from their seeds.
        residual = self.base.estimate_from_seeds(projected, primals, context.seeds, context.bases)
        coef = gamma - scale * jnp.mean(projected * c)  # the ĝ part of γĝ + λ(1/K)Σ d_k P u_k
        return [
            (scale * r.astype(jnp.float32) + coef * g).astype(p.dtype)
            for r, g, p in zip(residual, unit, primals)
        ]


def _base(base: int) -> Any:
    return np.uint32(base) if base else None


def guided(guess: Any, *, residual_scale: float = 0.1, distribution: str = "rademacher") -> Guided:
    """Tangents around a guess of the gradient, as a ``tangent=`` of :func:`fgrad_jax.forward_grad`.

    With ``ĝ = guess / |guess|`` (norm over all differentiated leaves), ``P = I − ĝĝᵀ`` and
    ``K = num_tangents`` isotropic tangents ``u_k``, the estimate is

        g = (∇f·ĝ) ĝ + λ (1/K) Σ_k (∇f·P u_k) P u_k,    λ = residual_scale,

    from one JVP over ``K + 1`` tangents (``ĝ`` and the ``u_k``). Its expectation is

        E[g] = ∇f − (1 − λ) (I − ĝĝᵀ) ∇f,

    exactly: unbiased along the guess, the rest of the gradient shrunk by ``λ``. So it is
    biased unless ``λ = 1`` (then it is an unbiased forward gradient whose noise lives only
    orthogonally to the guess) or the guess is parallel to ``∇f``. ``λ = 0`` is Fournier
    et al. (2023)'s projection on the guess. A zero guess gives the plain forward gradient
    of the ``u_k`` (unbiased). To keep the guess up to date during training, use
    :func:`fgrad_jax.guided_forward_gradient`.

    Args:
        guess: A pytree with the structure and shapes of the differentiated argument.
        residual_scale: ``λ`` in ``[0, 1]``.
        distribution: Law of the ``u_k``: ``"rademacher"`` or ``"normal"``.

    Returns:
        A tangent strategy.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import fgrad_jax
        >>> f = lambda w: jnp.dot(w, jnp.arange(4.0))
        >>> guess = jnp.arange(4.0)  # the exact direction: the estimate is the gradient
        >>> g = fgrad_jax.forward_grad(f, tangent=fgrad_jax.guided(guess, residual_scale=0.0))
        >>> bool(jnp.allclose(g(jax.random.key(0), jnp.ones(4)), jnp.arange(4.0), atol=1e-5))
        True
    """
    scale = _check_unit_interval(
        residual_scale, "residual_scale", "1 is unbiased, 0 is the projection on the guess"
    )
    return Guided(guess, scale, hashed_distribution(distribution, "the law of the isotropic part"))


class GuidedForwardGradientState(NamedTuple):
    """State of :func:`guided_forward_gradient`.

    Attributes:
        inner: The :class:`fgrad_jax.ForwardGradientState` (key, count, value and
            num_nonfinite, packed); :func:`fgrad_jax.forward_gradient_state` finds it.
        guess: Exponential moving average of past estimates (float32, the parameters'
            structure); zeros before the first step.
    """

    inner: ForwardGradientState
    guess: Any


def guided_forward_gradient(
    key: int | Array = 0,
    *,
    num_tangents: int = 1,
    residual_scale: float = 0.1,
    beta: float = 0.99,
    distribution: str = "rademacher",
) -> optax.GradientTransformationExtraArgs:
    """Forward gradient with tangents guided by a moving average of past estimates.

    Each step estimates ``∇ value_fn(params)`` with :func:`fgrad_jax.guided` tangents
    around the guess in the state, then updates the guess to
    ``beta · guess + (1 − beta) · estimate`` (only on steps whose loss and derivatives are
    finite; others are skipped and counted as in :func:`fgrad_jax.forward_gradient`). The
    first step has no guess and is a plain forward gradient.

    Bias, given the guess ``ĝ`` of the step (exact):
    ``E[g] = ∇f − (1 − λ)(I − ĝĝᵀ)∇f`` with ``λ = residual_scale``: the component of the
    gradient along the guess is estimated without bias and without noise (one JVP along
    ``ĝ``), the rest is shrunk by ``λ``. The guess itself improves because its orthogonal
    part is fed by the ``λ``-scaled isotropic residual, whose noise the average smooths.
    Each step costs one JVP over ``num_tangents + 1`` tangents.

    Args:
        key: An int seed or a JAX PRNG key.
        num_tangents: Number K of isotropic tangents per step (>= 1).
        residual_scale: ``λ`` in ``[0, 1]``; 1 is unbiased, 0 never leaves the first
            guess's direction (the guess cannot learn), small values trade bias for
            alignment with the gradient.
        beta: Decay of the moving average in ``[0, 1)``; the guess averages about
            ``(1 + beta) / (1 − beta)`` estimates.
        distribution: Law of the isotropic tangents: ``"rademacher"`` or ``"normal"``.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` with state
        :class:`GuidedForwardGradientState`; pass ``value_fn=`` to ``update``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> import fgrad_jax
        >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
        >>> tx = optax.chain(fgrad_jax.guided_forward_gradient(key=0, num_tangents=2), optax.sgd(0.1))
        >>> params = jnp.zeros(4)
        >>> state = tx.init(params)
        >>> for _ in range(200):
        ...     updates, state = tx.update(None, state, params, value_fn=loss)
        ...     params = optax.apply_updates(params, updates)
        >>> bool(loss(params) < 1e-2)
        True
    """
    scale = _check_unit_interval(
        residual_scale, "residual_scale", "1 is unbiased, 0 is the projection on the guess"
    )
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.number)):
        raise TypeError(f"beta must be a float in [0, 1); got {beta!r}.")
    if not 0.0 <= float(beta) < 1.0:
        raise ValueError(
            f"beta must be in [0, 1) (the moving average's decay; e.g. 0.99); got {beta!r}."
        )
    beta = float(beta)
    base = hashed_distribution(distribution, "the law of the isotropic part")
    seeded = forward_gradient(key, num_tangents=num_tangents, tangent=base)
    # The guess changes every step: each update puts the state's guess into this spec.
    spec = EstimatorSpec.create(
        tangent=Guided(None, scale, base), num_tangents=num_tangents, fn_name="value_fn"
    )

    def init_fn(params: optax.Params) -> GuidedForwardGradientState:
        guess = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return GuidedForwardGradientState(seeded.init(params), guess)

    def update_fn(
        updates: optax.Updates,
        state: GuidedForwardGradientState,
        params: optax.Params | None = None,
        *,
        value_fn: Callable[[optax.Params], Array] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GuidedForwardGradientState]:
        if value_fn is None:
            raise ValueError(
                "guided_forward_gradient needs the loss: call update(updates, state, params, "
                "value_fn=loss_fn), where value_fn(params) returns a scalar loss."
            )
        del extra_args
        check_updates(updates)
        guided_now = dataclasses.replace(spec, strategy=Guided(state.guess, scale, base))
        new_updates, inner = estimate_update(guided_now, state.inner, params, value_fn)
        finite = inner.num_nonfinite == state.inner.num_nonfinite

        def average(g, u, p):
            if not is_differentiable(p):
                return g
            new = beta * g + (1.0 - beta) * u.astype(jnp.float32)
            return jnp.where(finite, new, g)

        guess = jax.tree_util.tree_map(average, state.guess, new_updates, params)
        return new_updates, GuidedForwardGradientState(inner, guess)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

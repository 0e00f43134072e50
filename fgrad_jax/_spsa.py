"""Zeroth-order SPSA (central differences) as a tangent strategy, and its optax transformation.

The estimate is

    g = (1/n) Σ_i [(f(θ + ε z_i) − f(θ − ε z_i)) / (2ε)] z_i

with ``z_i`` drawn by the counter hash of ``_random`` (``HashedTangents.draw``). As in MeZO
(Malladi et al. 2023) the perturbations are never stored: each sample's ``z_i`` is drawn
where θ ± ε z_i is formed, and drawn again, bitwise the same, where the update is formed.
The samples run one after another (:func:`jax.lax.map`), so the working memory holds one
perturbed copy of the parameters whatever ``num_samples`` is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgrad_jax import _interpreter, _random
from fgrad_jax._spec import check_num_tangents
from fgrad_jax._strategy import Direction, Selection, TangentStrategy
from fgrad_jax._tangents import HashedTangents, hashed_distribution
from fgrad_jax._transform import forward_gradient

Array = jax.Array


def _check_epsilon(epsilon: Any) -> Any:
    if isinstance(epsilon, jax.core.Tracer):  # e.g. under optax.inject_hyperparams
        return epsilon
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.number, jax.Array)):
        raise TypeError(f"epsilon must be a positive float; got {epsilon!r}.")
    value = float(epsilon)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"epsilon must be a finite float > 0 (the perturbation size of the central "
            f"difference; MeZO uses 1e-3); got {epsilon!r}. Pass e.g. epsilon=1e-3."
        )
    return value


def _sample_counters(shape: tuple[int, ...], zero: Array, k: Array) -> Array:
    """The counters of sample ``k`` (bitwise ``_random.counters(shape, k * size)``).

    Built as a sum of broadcast per-axis iotas, one of them combined with ``zero`` (a fake
    zero from ``k``): no parameter-sized term is independent of the sample, so XLA cannot
    hoist one out of the loop over samples into a stored array.
    """
    size = max(math.prod(shape), 1)
    out = jnp.asarray(k * np.uint32(size), jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, (shape[axis],), 0) * np.uint32(stride)
        if axis == len(shape) - 1:
            iota = iota ^ zero
        out = out + jnp.expand_dims(iota, [d for d in range(len(shape)) if d != axis])
        stride *= shape[axis]
    return jnp.broadcast_to(out, shape)


@dataclasses.dataclass(frozen=True, eq=False)
class SPSA(TangentStrategy[Array]):
    """Central-difference (SPSA) estimates in place of JVPs; see :func:`fgrad_jax.spsa`.

    ``direction`` evaluates ``f(θ ± ε z_k)`` and returns ``(f₊ − f₋) / (2ε)`` as the
    "directional derivative" of sample ``k``. Its batching rule runs the samples one after
    another, so only one perturbed copy of the parameters is alive; the reported value is
    the mean of ``(f₊ + f₋) / 2`` over the samples, and ``aux`` is the first sample's at
    ``θ + ε z_1``. ``combine`` draws the ``z_k`` again from the seeds (as the counter-hash
    tangents do) instead of keeping them.

    Attributes:
        epsilon: Perturbation size ε (> 0).
        perturbation: The counter-hash law of ``z`` (normal or rademacher).
    """

    epsilon: Any
    perturbation: HashedTangents

    def prepare(self, key, primals, num_tangents, selection: Selection):
        del selection
        for p in primals:  # counter of sample k, element j: base + k * size + j (uint32)
            _random.check_counter_range((num_tangents, *p.shape))
        # The z_k are the hashed tangents of the same key (one stream, see leaf_streams).
        seeds, bases = _random.leaf_streams(key, [p.size for p in primals], num_tangents)
        return jnp.arange(num_tangents, dtype=jnp.uint32), (seeds, tuple(bases))

    def _one(self, fun: Callable, primals: list[Array], seeds: Array, k: Array, bases: tuple = ()):
        eps = jnp.asarray(self.epsilon, jnp.float32)
        # The counters of tangent k (bitwise those of HashedTangents.draw). The fake zero
        # from k makes the element counters depend on the sample, so that XLA does not hoist
        # them out of the loop over samples into a stored parameter-sized array.
        zero = _interpreter.fake_zero(k)
        counters = [
            _sample_counters(p.shape, zero, k) + np.uint32(b)
            for p, b in zip(primals, bases or (0,) * len(primals))
        ]

        def at(sign, after=None):
            # ``after``: a zero computed from the other evaluation's loss, so that this
            # one's perturbation (hence its whole forward pass) cannot start before that
            # one has finished: one perturbed copy and one forward working set alive at a
            # time, as in MeZO's in-place protocol, not two interleaved.
            late = _interpreter.fake_zero(after)
            moved = []
            for i, p in enumerate(primals):
                z = self.perturbation.at(seeds[i] ^ late, counters[i])
                moved.append((p.astype(jnp.float32) + sign * eps * z).astype(p.dtype))
            value, aux = fun(*moved)
            return value.astype(jnp.float32), aux

        plus, aux = at(1.0)
        minus, _ = at(-1.0, after=plus)
        return 0.5 * (plus + minus), (plus - minus) / (2 * eps), aux

    def direction(self, fun, primals, context, k) -> Direction:
        seeds, bases = context
        one = functools.partial(self._one, bases=bases)

        @jax.custom_batching.custom_vmap
        def sample(primals, seeds, k):
            return one(fun, primals, seeds, k)

        @sample.def_vmap
        def _samples(axis_size, in_batched, primals, seeds, k):
            primals_batched, seeds_batched, k_batched = in_batched
            if any(primals_batched) or seeds_batched or not k_batched:
                # Not the estimator's vmap over samples: plain vectorisation.
                axes = ([0 if b else None for b in primals_batched], 0 if seeds_batched else None)
                out = jax.vmap(
                    lambda p, s, kk: one(fun, p, s, kk), in_axes=(*axes, 0 if k_batched else None)
                )(primals, seeds, k)
                return out, jax.tree_util.tree_map(lambda _: True, out)
            # One sample at a time: one perturbed copy of the parameters alive, not K.
            values, derivs, auxs = jax.lax.map(lambda kk: one(fun, primals, seeds, kk), k)
            aux = jax.tree_util.tree_map(lambda a: a[0], auxs)
            out = (jnp.mean(values), derivs, aux)
            return out, (False, True, jax.tree_util.tree_map(lambda _: False, aux))

        value, deriv, aux = sample(list(primals), seeds, k)
        return Direction(value, deriv, aux, None)

    def combine(self, derivatives, primals, context, kept):
        # The hashed tangents' own redraw-from-seed update: the same z, drawn a second time.
        seeds, bases = context
        return self.perturbation.estimate_from_seeds(derivatives, primals, seeds, list(bases))


def spsa(epsilon: float = 1e-3, *, distribution: str = "rademacher") -> SPSA:
    """Central-difference (SPSA) estimates as a ``tangent=`` of :func:`fgrad_jax.forward_grad`.

    ``forward_grad(f, num_tangents=n, tangent=spsa(eps))`` returns
    ``(1/n) Σ_i [(f(θ + ε z_i) − f(θ − ε z_i)) / (2ε)] z_i``: two forward evaluations per
    sample, no JVP. With ``value_and_forward_grad`` the value is the mean of
    ``(f(θ + ε z_i) + f(θ − ε z_i)) / 2``, which is ``f(θ) + O(ε²)`` (computing ``f(θ)``
    itself would cost a third forward pass per step). For training use
    :func:`fgrad_jax.spsa_gradient`.

    Args:
        epsilon: Perturbation size ε > 0.
        distribution: Law of ``z``: ``"rademacher"`` (±1) or ``"normal"`` (MeZO's choice).

    Returns:
        A tangent strategy.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import fgrad_jax
        >>> f = lambda w: 0.5 * jnp.sum(w ** 2)
        >>> fd = fgrad_jax.forward_grad(f, tangent=fgrad_jax.spsa(0.1))
        >>> fg = fgrad_jax.forward_grad(f, tangent="rademacher")  # the same z for the same key
        >>> key, w = jax.random.key(0), jnp.arange(3.0)
        >>> bool(jnp.allclose(fd(key, w), fg(key, w), atol=1e-5))  # exact on quadratics
        True
    """
    return SPSA(
        _check_epsilon(epsilon), hashed_distribution(distribution, "the law of the perturbation z")
    )


def spsa_gradient(
    key: int | Array = 0,
    *,
    num_samples: int = 1,
    epsilon: float = 1e-3,
    distribution: str = "rademacher",
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Zeroth-order SPSA gradient estimate (MeZO, Malladi et al. 2023) as an optax transformation.

    ``update(updates, state, params, *, value_fn)`` has the contract of
    :func:`fgrad_jax.forward_gradient` and replaces ``updates`` by

        g = (1/n) Σ_i [(f(θ + ε z_i) − f(θ − ε z_i)) / (2ε)] z_i,

    ``f = value_fn``, ``n = num_samples``, ``z_i`` from the counter hash with
    ``E[z zᵀ] = I``. No derivative of ``value_fn`` is taken: two forward evaluations per
    sample. The ``z_i`` are drawn again from their seed for the update instead of stored,
    and the samples run one after another, so the step's working memory holds one
    perturbed copy of the parameters whatever ``num_samples`` is.

    ``E[g] = ∇f + O(ε²)`` (exactly ``∇f`` when ``f`` is quadratic, where the central
    difference is exact). With Rademacher ``z`` (``|z|² = d``),
    ``E|g|² = (d + n − 1)/n · |∇f|²`` for ``d`` parameters (MeZO's Lemma 2); with normal
    ``z``, ``(d + n + 1)/n · |∇f|²``.

    The state is a :class:`fgrad_jax.ForwardGradientState`: ``value`` is the mean of
    ``(f(θ + ε z_i) + f(θ − ε z_i)) / 2`` over the samples, ``f(θ) + O(ε²)`` (not
    ``f(θ)`` itself, which would cost a third forward pass). A step whose loss is not
    finite is skipped (zero updates) and counted in ``num_nonfinite``, as in
    :func:`fgrad_jax.forward_gradient`.

    Args:
        key: An int seed or a JAX PRNG key.
        num_samples: Number n of perturbations averaged per step (>= 1).
        epsilon: Perturbation size ε > 0. Too small loses the difference to float
            rounding (especially in bfloat16), too large adds the ``O(ε²)`` bias.
        distribution: ``"rademacher"`` (lowest variance) or ``"normal"`` (as in MeZO).
        mask: Which parameter leaves are perturbed and updated, as in
            :func:`fgrad_jax.forward_gradient` (a pytree of bools or a callable): frozen
            leaves (a pretrained base under LoRA adapters) get no perturbation and exact
            zero updates.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`; pass ``value_fn=`` to ``update``.

    Raises:
        ValueError: ``epsilon <= 0``, ``num_samples < 1`` or an unknown distribution.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> import fgrad_jax
        >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
        >>> tx = optax.chain(fgrad_jax.spsa_gradient(key=0, num_samples=4), optax.sgd(0.05))
        >>> @jax.jit
        ... def step(params, state):
        ...     updates, state = tx.update(None, state, params, value_fn=loss)
        ...     return optax.apply_updates(params, updates), state
        >>> params = jnp.zeros(4)
        >>> state = tx.init(params)
        >>> for _ in range(200):
        ...     params, state = step(params, state)
        >>> bool(loss(params) < 1e-2)
        True
    """
    num_samples = check_num_tangents(
        num_samples, "num_samples", "the number of perturbations averaged per estimate"
    )
    inner = forward_gradient(
        key,
        num_tangents=num_samples,
        tangent=spsa(epsilon, distribution=distribution),
        mask=mask,
    )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        if value_fn is None:
            raise ValueError(
                "spsa_gradient needs the loss: call update(updates, state, params, "
                "value_fn=loss_fn), where value_fn(params) returns a scalar loss (with "
                "nnx.Optimizer: optimizer.update(model, grads, value_fn=loss_fn))."
            )
        if params is None:
            raise ValueError(
                "spsa_gradient needs params: call update(updates, state, params, value_fn=...)."
            )
        return inner.update(updates, state, params, value_fn=value_fn, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)

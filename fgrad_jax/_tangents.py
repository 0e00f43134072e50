"""Tangent distributions for forward-gradient estimates.

Each family is a tangent strategy (``_strategy.TangentStrategy``), resolved once from the
``tangent=`` argument by :func:`resolve_tangent`: :class:`HashedTangents` (``"normal"``,
``"rademacher"``), :class:`DenseTangents` (``"sphere"``, ``"orthogonal"``),
:class:`UserTangents` (a callable) and ``_lowrank.LowRank`` (``"lowrank"``).

A *sampler* draws ``num_tangents`` directions for a list of floating-point leaves.
Every built-in distribution satisfies ``E[v vᵀ] = I`` over the flattened leaves, which is
exactly the condition for ``(∇f · v) v`` to be an unbiased estimate of ``∇f``.

Internal contract (``Sampler``)::

    sampler(key, leaves, num_tangents) -> list of arrays, one per leaf,
        each of shape ``(num_tangents, *leaf.shape)`` and dtype float32.

The caller casts the tangents to each leaf's dtype before the JVP and uses the same
(rounded) values in the estimate, so the estimate stays consistent with the derivative.

``"normal"`` and ``"rademacher"`` are :class:`HashedTangents`: elementwise counter-based
draws (``_random.py``) that cost a few integer operations per element instead of a threefry
evaluation, and that the estimator can redraw where the estimate is consumed instead of
storing them. Among distributions with independent zero-mean unit-variance components,
Rademacher has the smallest fourth moment (E v⁴ = 1, the minimum since E v⁴ >= (E v²)²),
hence the smallest variance of the estimate: ``E|g|² = n|∇f|²`` against ``(n+2)|∇f|²``
for Gaussian tangents. It is also the cheapest to draw; we recommend it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from fgrad_jax import _interpreter, _lowrank, _random, _sharding
from fgrad_jax._hashed import (  # noqa: F401  (HashedContext, _k_axis: re-exported)
    _NORMAL,
    _RADEMACHER,
    HASHED,
    HashedContext,
    HashedTangents,
    _k_axis,
    dense_jvp,
)
from fgrad_jax._strategy import Direction, Selection, TangentStrategy, mean_of_products

Array = jax.Array


class Sampler(Protocol):
    def __call__(self, key: Array, leaves: Sequence[Array], num_tangents: int) -> list[Array]: ...


TangentFn = Callable[[Array, Any], Any]
"""A user tangent: ``tangent(key, tree) -> tree``.

``tree`` is the differentiated argument (a pytree of arrays, used for its structure,
shapes and dtypes); the result is *one* tangent with the same structure and shapes. It
is called once per tangent (vectorised with :func:`jax.vmap` over split keys), so it
must be a traceable JAX function of ``key``. For the estimate to be unbiased the
direction must satisfy ``E[v vᵀ] = I`` over the floating-point leaves; leaves that are
not floating point are ignored.
"""


def hashed_distribution(name: Any, role: str) -> HashedTangents:
    """The counter-hash distribution called ``name``; ``role`` says what it is drawn for."""
    if name not in HASHED:
        raise ValueError(f"distribution must be one of {sorted(HASHED)} ({role}); got {name!r}.")
    return HASHED[name]


def _sample_sphere(key: Array, leaves: Sequence[Array], num_tangents: int) -> list[Array]:
    # Uniform direction on the sphere of radius sqrt(n): E[v vᵀ] = n · E[u uᵀ] = I. The
    # Gaussians are one (K, n) draw, stored once, normalised by one reduction and sliced
    # into the leaves: a draw (or a norm) per leaf is a generated kernel per leaf, and as a
    # fusable expression XLA copied each leaf's draw into all of its consumers (compile
    # time 8x jax.grad's on the transformer, 5x with the draws stored per leaf).
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    n = sum(sizes)
    _random.check_counter_range((num_tangents, n))
    seed = _random.seed_words(key, 1)[0]
    g = _interpreter.store_once(_random.normal(seed, (num_tangents, n)), seed)
    v = g * (jnp.sqrt(jnp.float32(n)) * jax.lax.rsqrt(jnp.sum(g * g, axis=1, keepdims=True)))
    # Stored again once normalised (exact), so that the leaves' slices are plain copies,
    # not each a copy of the scaling (the draw alone: 10 % less compile time). Its divisor
    # word is not the key's own (see _sample_orthogonal). Peak memory unchanged: g dies
    # once v is written, and v once it is sliced, as g did before.
    v = _interpreter.store_once(v, ~jax.random.key_data(key).reshape(-1))
    offsets = np.cumsum([0, *sizes])
    return [
        v[:, a:b].reshape((num_tangents, *leaf.shape))
        for a, b, leaf in zip(offsets[:-1], offsets[1:], leaves)
    ]


def _sample_orthogonal(key: Array, leaves: Sequence[Array], num_tangents: int) -> list[Array]:
    # K Haar-random orthonormal directions of R^n scaled by sqrt(n): each one alone has
    # E[v vᵀ] = I, so the mean of the K single-tangent estimates stays unbiased, and with
    # K = n it is Σ (∇f·q_k) q_k = ∇f exactly.
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    n = sum(sizes)
    if num_tangents > n:
        raise ValueError(
            f"tangent='orthogonal' needs num_tangents <= number of differentiated "
            f"parameters ({n}); got num_tangents={num_tangents}. Lower num_tangents."
        )
    z = jax.random.normal(key, (n, num_tangents), jnp.float32)
    q, r = jnp.linalg.qr(z)
    # Sign fix makes the QR factor Haar-distributed instead of biased by the algorithm.
    q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(jnp.float32)
    # Stored once before it is sliced (bitwise the same values): otherwise XLA copies the
    # scaling and the sign fix into each leaf's slice (transformer: 2,210 against 767
    # instructions for the draw alone). Not the key's own word, which picks the divisor of
    # the per-leaf stores (``_DrawnFirst.prepare``): XLA would merge the two.
    word = ~jax.random.key_data(key).reshape(-1)
    flat = _interpreter.store_once(q.T * jnp.sqrt(jnp.float32(n)), word)
    out, start = [], 0
    for leaf, size in zip(leaves, sizes):
        out.append(flat[:, start : start + size].reshape((num_tangents, *leaf.shape)))
        start += size
    return out


def _sample_lowrank(
    key: Array, leaves: Sequence[Array], num_tangents: int, rank: int = 1
) -> list[Array]:
    """Dense view of the low-rank tangents (the estimator itself never forms them)."""
    out = []
    for (kind, *f), leaf in zip(_lowrank.draw_lowrank(key, leaves, num_tangents, rank), leaves):
        if kind == "dense":
            out.append(f[0])
        else:
            u, w = f
            v = jnp.einsum("kmr,knr->kmn", u, w) * jnp.float32(1 / math.sqrt(rank))
            out.append(v.reshape((num_tangents, *leaf.shape)))
    return out


TANGENTS: dict[str, Sampler] = {
    "lowrank": _sample_lowrank,
    "normal": _NORMAL,
    "rademacher": _RADEMACHER,
    "sphere": _sample_sphere,
    "orthogonal": _sample_orthogonal,
}


def _user_sampler(fn: TangentFn, tree: Any, float_index: Sequence[int]) -> Sampler:
    def sampler(key: Array, leaves: Sequence[Array], num_tangents: int) -> list[Array]:
        def one(k):
            out = fn(k, tree)
            out_leaves = jax.tree_util.tree_leaves(out)
            tree_leaves = jax.tree_util.tree_leaves(tree)
            if len(out_leaves) != len(tree_leaves):
                raise ValueError(
                    "A tangent callable must return a pytree with the same structure as its "
                    f"second argument: got {len(out_leaves)} leaves, expected {len(tree_leaves)}."
                )
            picked = [jnp.asarray(out_leaves[i]) for i in float_index]
            for got, want in zip(picked, leaves):
                if got.shape != want.shape:
                    raise ValueError(
                        "A tangent callable must return leaves of the parameters' shapes: "
                        f"got {got.shape}, expected {want.shape}."
                    )
            return [p.astype(jnp.float32) for p in picked]

        keys = jax.random.split(key, num_tangents)
        if num_tangents == 1:
            # The same values as under vmap; vmap over one key compiled the user's draws
            # (threefry per leaf) about 8 % slower on the transformer.
            return [t[None] for t in one(keys[0])]
        return jax.vmap(one)(keys)

    return sampler


class _DrawnFirst(TangentStrategy[list[Array]]):
    """Tangents drawn in full before the JVP by a sampler, then plain :func:`jax.jvp`.

    The float32 draws are cast to each leaf's dtype for the JVP, and the rounded values are
    used in the estimate too, so it stays consistent with the derivative XLA computed.
    They are drawn in full on every device (``_sharding.replicated_like``): no collective
    for FSDP-sharded parameters.
    """

    def sampler_for(self, selection: Selection) -> Sampler:
        raise NotImplementedError

    def prepare(self, key, primals, num_tangents, selection: Selection):
        drawn = self.sampler_for(selection)(key, primals, num_tangents)
        # Stored once (bitwise the same values): the JVP and the estimate both read them.
        word = jax.random.key_data(key).reshape(-1)
        tangents = [
            _sharding.replicated_like(_interpreter.store_once(t.astype(p.dtype), word), p)
            for t, p in zip(drawn, primals)
        ]
        return tangents, tangents

    def direction(self, fun, primals, context, inputs) -> Direction:
        return dense_jvp(fun, primals, inputs)

    def combine(self, derivatives, primals, context, kept):
        return [mean_of_products(derivatives, t).astype(p.dtype) for t, p in zip(context, primals)]


@dataclasses.dataclass(frozen=True)
class DenseTangents(_DrawnFirst):
    """A built-in sampler ``sampler(key, leaves, K)`` (sphere, orthogonal)."""

    name: str
    sampler: Sampler

    def sampler_for(self, selection: Selection) -> Sampler:
        return self.sampler


@dataclasses.dataclass(frozen=True)
class UserTangents(_DrawnFirst):
    """A user's ``tangent(key, tree) -> tree``, called once per tangent (vmapped over keys)."""

    fn: TangentFn

    def sampler_for(self, selection: Selection) -> Sampler:
        return _user_sampler(self.fn, selection.tree, selection.indices)


STRATEGIES: dict[str, TangentStrategy] = {
    "lowrank": _lowrank.LowRank(1),
    "normal": _NORMAL,
    "orthogonal": DenseTangents("orthogonal", _sample_orthogonal),
    "rademacher": _RADEMACHER,
    "sphere": DenseTangents("sphere", _sample_sphere),
}

Tangent: TypeAlias = str | TangentStrategy | TangentFn
"""Every accepted ``tangent=`` value: a name in :data:`fgrad_jax.TANGENT_NAMES`,
:func:`fgrad_jax.lowrank` ``(rank)`` (or another tangent strategy), or a callable
``tangent(key, tree) -> tree`` with ``E[v vᵀ] = I``."""


def resolve_tangent(tangent: Tangent) -> TangentStrategy:
    """The strategy for ``tangent``; validates early, so a typo fails at construction."""
    if isinstance(tangent, TangentStrategy):
        return tangent
    if isinstance(tangent, str):
        if tangent not in STRATEGIES:
            raise ValueError(
                f"Unknown tangent {tangent!r}. Use one of {sorted(STRATEGIES)} or pass a "
                "callable tangent(key, tree) -> tree with E[v vᵀ] = I."
            )
        return STRATEGIES[tangent]
    if callable(tangent):
        return UserTangents(tangent)
    raise TypeError(
        f"tangent must be a name in {sorted(STRATEGIES)}, fgrad_jax.lowrank(rank) or a "
        f"callable tangent(key, tree) -> tree; got {type(tangent).__name__}."
    )

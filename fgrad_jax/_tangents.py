"""Tangent distributions for forward-gradient estimates.

A *sampler* draws ``num_tangents`` directions for a list of floating-point leaves.
Every built-in sampler satisfies ``E[v vᵀ] = I`` over the flattened leaves, which is
exactly the condition for ``(∇f · v) v`` to be an unbiased estimate of ``∇f``.

Internal contract (``Sampler``)::

    sampler(key, leaves, num_tangents) -> list of arrays, one per leaf,
        each of shape ``(num_tangents, *leaf.shape)`` and dtype float32.

The caller casts the tangents to each leaf's dtype before the JVP and uses the same
(rounded) values in the estimate, so the estimate stays consistent with the derivative.

``"normal"`` and ``"rademacher"`` are :class:`HashedTangent` s: elementwise counter-based
draws (``_random.py``) that cost a few integer operations per element instead of a threefry
evaluation, and that the estimator can redraw where the estimate is consumed instead of
storing them. Among distributions with independent zero-mean unit-variance components,
Rademacher has the smallest fourth moment (E v⁴ = 1, the minimum since E v⁴ >= (E v²)²),
hence the smallest variance of the estimate: ``E|g|² = n|∇f|²`` against ``(n+2)|∇f|²``
for Gaussian tangents. It is also the cheapest to draw; we recommend it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from fgrad_jax import _lowrank, _random

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


class HashedTangent:
    """A built-in elementwise distribution drawn by the counter-based hash of ``_random``.

    A draw is a pure elementwise function of two uint32 seed words and a counter per
    element (``at(seed, counters)``), so the estimator can draw the tangents for the JVP
    and draw them *again* (bitwise the same) where the estimate is consumed, instead of
    keeping them alive in between. Keeping them costs a memory round trip per tangent
    element, drawing again a second draw: the tangents are kept only while the
    differentiated parameters take at most ``store_limit_bytes`` (in float32), and only
    on a single device (see ``estimate_forward_grad``).
    """

    def __init__(self, name: str, at: Callable[[Array, Array], Array], store_limit_bytes: int):
        self.name = name
        self.at = at
        self.store_limit_bytes = store_limit_bytes

    def stores(self, leaves: Sequence[Array]) -> bool:
        """Whether the tangents of ``leaves`` are kept between the JVP and the update."""
        return 4 * sum(math.prod(leaf.shape) for leaf in leaves) <= self.store_limit_bytes

    def draw(self, seed: Array, shape: tuple[int, ...], offset: Array | None = None) -> Array:
        """Draws of ``shape``; ``offset = k * leaf.size`` gives tangent ``k`` of a leaf."""
        return self.at(seed, _random.counters(shape, offset))

    def draw_stacked(self, seed: Array, shape: tuple[int, ...], axis: int, ks: Array) -> Array:
        """Tangents ``ks`` of a leaf of ``shape``, stacked at ``axis``, computed in place."""
        return self.at(seed, _random.stacked_counters(shape, axis, ks))

    def __call__(self, key: Array, leaves: Sequence[Array], num_tangents: int) -> list[Array]:
        seeds = _random.seed_words(key, len(leaves))
        return [self.draw(seeds[i], (num_tangents, *leaf.shape)) for i, leaf in enumerate(leaves)]


# A Rademacher draw (one hash, a few integer ops) is always cheaper than a memory round trip.
_RADEMACHER = HashedTangent("rademacher", _random.rademacher_at, store_limit_bytes=0)
# A Gaussian draw costs about 0.5 ms per million on a 2-core CPU: kept while the parameters
# fit in cache-sized memory (MLP of 7.4 MB: 1.37x BP kept vs 1.71x drawn twice at B=64),
# drawn twice beyond (32 MB: 1.55x vs 1.91x, and the working memory stays flat in depth).
_NORMAL = HashedTangent("normal", _random.normal_at, store_limit_bytes=16 << 20)
HASHED: dict[str, HashedTangent] = {"rademacher": _RADEMACHER, "normal": _NORMAL}


def _sample_sphere(key: Array, leaves: Sequence[Array], num_tangents: int) -> list[Array]:
    # Uniform direction on the sphere of radius sqrt(n): E[v vᵀ] = n · E[u uᵀ] = I.
    gaussians = _NORMAL(key, leaves, num_tangents)
    n = sum(math.prod(leaf.shape) for leaf in leaves)
    sq_norm = sum(jnp.sum(g.reshape(num_tangents, -1) ** 2, axis=1) for g in gaussians)
    scale = jnp.sqrt(jnp.float32(n)) * jax.lax.rsqrt(sq_norm)
    return [g * scale.reshape((num_tangents,) + (1,) * (g.ndim - 1)) for g in gaussians]


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
    flat = q.T * jnp.sqrt(jnp.float32(n))
    out, start = [], 0
    for leaf, size in zip(leaves, sizes):
        out.append(flat[:, start : start + size].reshape((num_tangents, *leaf.shape)))
        start += size
    return out


def _sample_lowrank(
    key: Array, leaves: Sequence[Array], num_tangents: int, rank: int = 1
) -> list[Array]:
    """Dense view of the low-rank tangents (the estimator itself never forms them)."""
    seeds = _random.seed_words(key, len(leaves))
    out = []
    for (kind, *f), leaf in zip(_lowrank.draw_lowrank(seeds, leaves, num_tangents, rank), leaves):
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

        return jax.vmap(one)(jax.random.split(key, num_tangents))

    return sampler


def as_lowrank(tangent: Any) -> _lowrank.LowRank | None:
    """The low-rank spec of ``tangent`` (``"lowrank"`` is rank 1), or None."""
    if isinstance(tangent, _lowrank.LowRank):
        return tangent
    if isinstance(tangent, str) and tangent == "lowrank":
        return _lowrank.LowRank(1)
    return None


def resolve_tangent(tangent: str | TangentFn) -> str | TangentFn:
    """Validates ``tangent`` early, so a typo fails at construction, not at the first step."""
    if isinstance(tangent, _lowrank.LowRank):
        return tangent
    if isinstance(tangent, str):
        if tangent not in TANGENTS:
            raise ValueError(
                f"Unknown tangent {tangent!r}. Use one of {sorted(TANGENTS)} or pass a "
                "callable tangent(key, tree) -> tree with E[v vᵀ] = I."
            )
        return tangent
    if callable(tangent):
        return tangent
    raise TypeError(
        f"tangent must be a name in {sorted(TANGENTS)} or a callable tangent(key, tree) -> "
        f"tree; got {type(tangent).__name__}."
    )


def get_sampler(tangent: str | TangentFn, tree: Any, float_index: Sequence[int]) -> Sampler:
    if isinstance(tangent, str):
        return TANGENTS[tangent]
    return _user_sampler(tangent, tree, float_index)

"""Low-rank tangents carried through a structured forward-mode interpreter.

``tangent="lowrank"`` (or :func:`lowrank` ``(rank=r)``): every floating leaf with ``ndim >= 2``
(a Dense kernel ``(in, out)``, a conv kernel ``(*spatial, in, out)``, viewed as the matrix
``(prod(shape[:-1]), shape[-1])``) gets the tangent

    V = (1/sqrt(r)) Σ_{a<r} u_a w_aᵀ,   u_a ~ N(0, I_m), w_a ~ N(0, I_n) independent,

so ``E[V_ij V_i'j'] = (1/r) Σ_a E[u_ia u_i'a] E[w_ja w_j'a] = δ_ii' δ_jj'``: ``E[v vᵀ] = I``
and the estimate ``(∇f·v) v`` stays unbiased. Every other floating leaf gets a Gaussian
tangent. (The components of V are uncorrelated but not independent, and ``E V_ij⁴ = 9``
for r = 1 (``3 + 6/r`` in general), so the estimate's variance is higher than with dense
Gaussian tangents; its point is cost.)

The JVP never materialises V; its tangents are kept as :class:`LowRankTangent` factors:

* ``dot_general(x, W)`` with a low-rank tangent on a 2-D ``W`` contracted on its first axis
  (``x @ W``, what Flax's Dense and ``jnp.dot``/``@`` emit): tangent ``((x @ U) Wᵀ)/sqrt(r)``
  plus the dense ``dx @ W``: ``O(B m r + B r n)`` instead of ``O(B m n)``.
* ``conv_general_dilated(x, K)`` with the output-feature axis of ``K`` last (``HWIO``): one
  convolution with ``r`` output channels, then a ``(r, out)`` matmul.

The rules are registered into the structured-tangent interpreter (``_interpreter.py``),
which inlines ``jit`` and ``closed_call`` sub-jaxprs (so they also fire inside ``jnp``
functions and jitted Flax modules) and densifies the factors for every other primitive,
or for these two in any other layout (always correct, only slower).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgrad_jax import _interpreter, _random
from fgrad_jax._sharding import replicated_like
from fgrad_jax._strategy import Direction, Selection, TangentStrategy, mean_of_products

Array = jax.Array


class LowRankContext(NamedTuple):
    """Per leaf ``(kind, *factors)`` from :func:`draw_lowrank`, and the schedule."""

    drawn: list[Any]
    schedule: _interpreter.Schedule


@dataclass(frozen=True)
class LowRank(TangentStrategy[LowRankContext]):
    """Rank-``rank`` kernel tangents, kept factored through the JVP; pass as ``tangent=``.

    Hashable and static. ``schedule`` (an ``_interpreter.Schedule``) overrides the one
    chosen from the parameters' sharding; it orders XLA's work and never changes a value.
    """

    rank: int = 1
    schedule: _interpreter.Schedule | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if (
            isinstance(self.rank, bool)
            or not isinstance(self.rank, (int, np.integer))
            or self.rank < 1
        ):
            raise ValueError(f"lowrank(rank=...) needs a positive int rank; got {self.rank!r}.")

    def __repr__(self) -> str:
        return f"lowrank(rank={self.rank})"

    def prepare(self, key, primals, num_tangents, selection: Selection):
        del selection
        drawn = draw_lowrank(key, primals, num_tangents, self.rank)
        schedule = self.schedule or _interpreter.schedule_for(primals)
        return [tuple(factors) for _, *factors in drawn], LowRankContext(drawn, schedule)

    def direction(self, fun, primals, context: LowRankContext, inputs) -> Direction:
        drawn, schedule = context
        tangents = [
            LowRankTangent(f[0], f[1], p.shape, p.dtype)
            if kind == "lowrank"
            else f[0].astype(p.dtype)
            for (kind, *_), f, p in zip(drawn, inputs, primals)
        ]
        (value, aux), (deriv, _) = _interpreter.structured_jvp(
            fun, primals, tangents, schedule, RULES
        )
        return Direction(value, deriv, aux, None)

    def combine(self, derivatives, primals, context: LowRankContext, kept):
        return [
            combine_lowrank(derivatives, d, p, self.rank) for d, p in zip(context.drawn, primals)
        ]


def lowrank(rank: int = 1) -> LowRank:
    """The low-rank tangent distribution of rank ``rank`` (``tangent="lowrank"`` is rank 1).

    Example:
        >>> import jax, jax.numpy as jnp, fgrad_jax
        >>> f = lambda p: jnp.sum(jnp.tanh(jnp.ones((2, 3)) @ p["w"]))
        >>> g = fgrad_jax.forward_grad(f, tangent=fgrad_jax.lowrank(rank=2))
        >>> g(jax.random.key(0), {"w": jnp.ones((3, 4))})["w"].shape
        (3, 4)
    """
    return LowRank(int(rank))


@dataclass
class LowRankTangent(_interpreter.StructuredTangent):
    """The tangent ``(u @ w.T / sqrt(r)).reshape(shape)`` of a kernel, kept factored."""

    u: Array  # (m, r)
    w: Array  # (n, r)
    shape: tuple[int, ...]
    dtype: Any

    @property
    def rank(self) -> int:
        return self.u.shape[-1]

    def dense(self) -> Array:
        r = self.rank
        if r == 1:
            v = self.u[:, 0][:, None] * self.w[:, 0][None, :]
        else:
            v = (self.u @ self.w.T) * np.float32(1 / math.sqrt(r))
        return v.reshape(self.shape).astype(self.dtype)


def _scale(r: int) -> np.float32:
    return np.float32(1 / math.sqrt(r))


def _dot_rule(eqn, primals, tangents):
    """x @ W with a low-rank tangent on W; returns None when the layout is not handled."""
    lhs, rhs = primals
    tl, tr = tangents
    if not isinstance(tr, LowRankTangent) or isinstance(tl, LowRankTangent):
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if rhs.ndim != 2 or tuple(rc) != (0,) or tuple(lb) or tuple(rb) or tuple(lc) != (lhs.ndim - 1,):
        return None
    out = jax.lax.dot_general(
        lhs,
        rhs,
        ((lc, rc), (lb, rb)),
        precision=eqn.params.get("precision"),
        preferred_element_type=eqn.params.get("preferred_element_type"),
    )
    xu = jnp.matmul(lhs, tr.u.astype(lhs.dtype))  # (..., r)
    t_out = jnp.matmul(xu, (tr.w.T * _scale(tr.rank)).astype(lhs.dtype)).astype(out.dtype)
    if tl is not None:
        t_out = t_out + jax.lax.dot_general(
            tl,
            rhs,
            ((lc, rc), (lb, rb)),
            precision=eqn.params.get("precision"),
            preferred_element_type=eqn.params.get("preferred_element_type"),
        ).astype(out.dtype)
    return [out], [t_out]


def _conv_rule(eqn, primals, tangents):
    lhs, rhs = primals
    tl, tr = tangents
    if not isinstance(tr, LowRankTangent) or isinstance(tl, LowRankTangent):
        return None
    p = eqn.params
    dn = p["dimension_numbers"]
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
    if rhs_spec[0] != rhs.ndim - 1:  # output-feature axis of the kernel must be its last
        return None
    bind = {k: v for k, v in p.items()}
    out = jax.lax.conv_general_dilated_p.bind(lhs, rhs, **bind)
    r = tr.rank
    k_u = tr.u.reshape((*tr.shape[:-1], r)).astype(rhs.dtype)
    y = jax.lax.conv_general_dilated_p.bind(lhs, k_u, **bind)  # r output channels
    c = out_spec[1]
    y = jnp.moveaxis(y, c, -1) @ (tr.w.T * _scale(r)).astype(y.dtype)
    t_out = jnp.moveaxis(y, -1, c).astype(out.dtype)
    if tl is not None:
        t_out = t_out + jax.lax.conv_general_dilated_p.bind(tl, rhs, **bind)
    return [out], [t_out]


#: The rules that keep low-rank tangents factored, passed with each of LowRank's JVPs.
RULES = {"dot_general": (_dot_rule,), "conv_general_dilated": (_conv_rule,)}


def draw_lowrank(key: Array, primals: Sequence[Array], num_tangents: int, rank: int):
    """Per leaf: ``("lowrank", u (K, m, r), w (K, n, r))`` or ``("dense", v (K, *shape))``.

    All factors are consecutive ranges of one Gaussian stream (``_random.leaf_streams``),
    drawn as one kernel: one draw kernel per leaf made the step 5.7x ``jax.grad``'s to
    compile on the 6-block transformer (issue 20).
    """
    k = num_tangents
    sizes = [
        (math.prod(p.shape[:-1]) + p.shape[-1]) * rank if p.ndim >= 2 else math.prod(p.shape)
        for p in primals
    ]
    seeds, bases = _random.leaf_streams(key, sizes, k)
    if k * sum(sizes) < 2**32:
        flat = _interpreter.store_once(_random.normal(seeds[0], (k * sum(sizes),)), seeds[0])
        z = [flat[b : b + k * s].reshape(k, s) for b, s in zip(bases, sizes)]
    else:
        z = [_random.normal(seeds[i], (k, s)) for i, s in enumerate(sizes)]
    out: list[tuple[Any, ...]] = []
    for p, zi in zip(primals, z):
        if p.ndim >= 2:
            m, n = math.prod(p.shape[:-1]), p.shape[-1]
            u = zi[:, : m * rank].reshape(k, m, rank)
            w = zi[:, m * rank :].reshape(k, n, rank)
            out.append(("lowrank", u, w))
        else:
            out.append(("dense", zi.reshape((k, *p.shape))))
    # Materialise the (small) factors once per leaf: otherwise XLA fuses the Gaussian draw
    # of u and w into the (m, n) update loop and recomputes it for every kernel element.
    # The key's word (not the seed) picks the divisor, so that XLA does not merge this
    # store with the flat draw's and copy the draw into every leaf's kernel.
    # Replicated: every device draws them (no collective for FSDP-sharded parameters).
    word = jax.random.key_data(key).reshape(-1)
    return [
        (d[0], *(replicated_like(_interpreter.store_once(a, word), primals[i]) for a in d[1:]))
        for i, d in enumerate(out)
    ]


def combine_lowrank(derivs: Array, drawn, primal: Array, rank: int) -> Array:
    """``(1/K) Σ_k d_k v_k`` for one leaf, without forming any ``v_k`` on its own."""
    kind, *factors = drawn
    if kind == "dense":
        return mean_of_products(derivs, factors[0], divide=True).astype(primal.dtype)
    u, w = factors
    k = derivs.shape[0]
    coef = derivs * np.float32(1 / (k * math.sqrt(rank)))
    if k == 1 and rank == 1:
        g = (coef[0] * u[0, :, 0])[:, None] * w[0, :, 0][None, :]
    else:
        g = jnp.einsum("kmr,knr->mn", u * coef[:, None, None], w)
    return g.reshape(primal.shape).astype(primal.dtype)

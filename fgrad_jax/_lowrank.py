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

The JVP never materialises V. :func:`lowrank_jvp` evaluates the function's jaxpr with an
interpreter whose tangents are either dense arrays or :class:`LowRankTangent` factors:

* ``dot_general(x, W)`` with a low-rank tangent on a 2-D ``W`` contracted on its first axis
  (``x @ W``, what Flax's Dense and ``jnp.dot``/``@`` emit): tangent ``((x @ U) Wᵀ)/sqrt(r)``
  plus the dense ``dx @ W``: ``O(B m r + B r n)`` instead of ``O(B m n)``.
* ``conv_general_dilated(x, K)`` with the output-feature axis of ``K`` last (``HWIO``): one
  convolution with ``r`` output channels, then a ``(r, out)`` matmul.
* ``jit``/``pjit`` and ``closed_call`` sub-jaxprs are interpreted inline, so the above also
  fires inside ``jnp`` functions and jitted Flax modules.
* Every other primitive, and the two above in any other layout, is the fallback: low-rank
  tangents are densified and the primitive's own JVP rule runs (``jax.jvp`` of its bind).
  This is always correct, only slower. :data:`STATS` counts fallbacks for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from fgrad_jax import _random
from fgrad_jax._sharding import replicated_like

Array = jax.Array


@dataclass(frozen=True)
class LowRank:
    """Tangent spec for rank-``rank`` kernel tangents; pass as ``tangent=`` (hashable, static)."""

    rank: int = 1

    def __post_init__(self):
        if (
            isinstance(self.rank, bool)
            or not isinstance(self.rank, (int, np.integer))
            or self.rank < 1
        ):
            raise ValueError(f"lowrank(rank=...) needs a positive int rank; got {self.rank!r}.")

    def __repr__(self) -> str:
        return f"lowrank(rank={self.rank})"


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
class LowRankTangent:
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


class LazyTangent:
    """A dense tangent drawn where it is first used: ``make(zero)`` with a fake zero that
    depends on another input of the consuming operation (``_random.fake_zero``).

    Drawing every tangent up front lets XLA's scheduler keep all of them alive through the
    whole JVP (working memory grows with depth); a lazy tangent is drawn right before the
    layer that uses it.
    """

    def __init__(self, make: Callable[[Array], Array]):
        self.make = make
        self.value: Array | None = None

    def materialize(self, anchor: Array | None = None) -> Array:
        if self.value is None:
            self.value = self.make(_random.fake_zero(anchor if anchor_lazy_draws() else None))
        return self.value


def anchor_lazy_draws() -> bool:
    """Whether lazy draws get a data dependence on the consuming operation's other input.

    The anchor is one element of an activation. Under data parallelism (batch-sharded
    activations) reading it costs a small all-reduce per layer, which would break the
    forward gradient's "K+1 scalars per step" communication; so anchoring is only used when
    a single device is visible. Without it XLA may draw all tangents up front, and the
    step's working memory then holds all of them (about the size of the parameters).
    """
    return jax.device_count() == 1


STATS = {"structured": 0, "fallback_densified": 0}
TIE_PRIMAL = True  # see tie_to_tangent; a switch for A/B benchmarks


@jax.custom_jvp
@jax.custom_batching.custom_vmap
def tie_to_tangent(primal: Array, tangent: Array) -> Array:
    """``primal``, unchanged, but computed only once ``tangent`` exists (for the scheduler).

    XLA's scheduler is free to run the primal chain of a JVP far ahead of the tangent chain
    (the primal does not depend on it); every primal activation then stays alive until its
    tangent consumer runs, and the working memory grows with depth like backprop's stored
    activations. Adding a float zero computed from one element of the tangent
    (``_random.fake_zero``) makes the next layer's primal wait for this layer's tangent.
    Under :func:`jax.vmap` over the K tangents only the primal's batching is kept (the zero
    is read from the whole batched tangent), so the primal is still computed once; its
    derivative is the identity in ``primal``.
    """
    return primal + _random.fake_zero(tangent).astype(primal.dtype)


@tie_to_tangent.def_vmap
def _tie_vmap(axis_size, in_batched, primal, tangent):
    del axis_size
    return tie_to_tangent(primal, tangent), in_batched[0]


@tie_to_tangent.defjvp
def _tie_jvp(primals, tangents):
    return tie_to_tangent(*primals), tangents[0]


def _dense(t):
    if isinstance(t, LazyTangent):
        return t.materialize()
    return t.dense() if isinstance(t, LowRankTangent) else t


def _is_anchor(p) -> bool:
    dtype = getattr(p, "dtype", None)
    if dtype is None or getattr(p, "size", 0) == 0:
        return False
    return bool(jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_)


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
    STATS["structured"] += 1
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
    STATS["structured"] += 1
    return [out], [t_out]


_RULES = {"dot_general": _dot_rule, "conv_general_dilated": _conv_rule}
_INLINE = {"pjit", "jit", "closed_call", "core_call"}


def _bind_params(eqn):
    res = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict):  # older jax
        return list(res[0]), res[1]
    return [], res


def _fallback(eqn, primals, tangents):
    subfuns, bind_params = _bind_params(eqn)
    idx = [i for i, t in enumerate(tangents) if t is not None]
    if any(isinstance(tangents[i], LowRankTangent) for i in idx):
        STATS["fallback_densified"] += 1

    def g(*xs):
        full = list(primals)
        for i, x in zip(idx, xs):
            full[i] = x
        out = eqn.primitive.bind(*subfuns, *full, **bind_params)
        return list(out) if eqn.primitive.multiple_results else [out]

    outs, touts = jax.jvp(g, [primals[i] for i in idx], [_dense(tangents[i]) for i in idx])
    return outs, touts


def _eval(jaxpr, consts, primals, tangents):
    env: dict[Any, tuple[Any, Any]] = {}

    def read(v):
        if isinstance(v, jcore.Literal):
            return v.val, None
        return env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = (c, None)
    for v, p, t in zip(jaxpr.invars, primals, tangents):
        env[v] = (p, t)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        ps = [a for a, _ in ins]
        ts = [b for _, b in ins]
        name = eqn.primitive.name
        inline = (name in _INLINE and "jaxpr" in eqn.params) or (
            name == "closed_call" and "call_jaxpr" in eqn.params
        )
        if not inline and any(isinstance(t, LazyTangent) for t in ts):
            # Prefer another input's (dense) tangent as the anchor: the draws then follow
            # the tangent chain that consumes them, not the primal chain, which XLA may
            # run far ahead.
            anchor = next(
                (
                    t
                    for t in ts
                    if t is not None
                    and not isinstance(t, (LazyTangent, LowRankTangent))
                    and _is_anchor(t)
                ),
                None,
            )
            if anchor is None:
                anchor = next(
                    (p for p, t in zip(ps, ts) if not isinstance(t, LazyTangent) and _is_anchor(p)),
                    None,
                )
            ts = [t.materialize(anchor) if isinstance(t, LazyTangent) else t for t in ts]
        if all(t is None for t in ts):
            subfuns, bind_params = _bind_params(eqn)
            out = eqn.primitive.bind(*subfuns, *ps, **bind_params)
            outs = list(out) if eqn.primitive.multiple_results else [out]
            touts = [None] * len(outs)
        elif inline:
            closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            inner = closed.jaxpr if hasattr(closed, "jaxpr") else closed
            inner_consts = closed.consts if hasattr(closed, "consts") else ()
            outs, touts = _eval(inner, inner_consts, ps, ts)
        else:
            res = _RULES[name](eqn, ps, ts) if name in _RULES else None
            if res is None:
                res = _fallback(eqn, ps, ts)
            outs, touts = res
            if name in _RULES and TIE_PRIMAL and anchor_lazy_draws():
                # The expensive ops: the primal output waits for its tangent (see
                # tie_to_tangent), so the primal chain cannot run ahead of the tangent chain.
                outs = [
                    tie_to_tangent(o, t)
                    if t is not None
                    and not isinstance(t, LowRankTangent)
                    and jnp.issubdtype(jnp.result_type(o), jnp.floating)
                    and _is_anchor(t)
                    else o
                    for o, t in zip(outs, touts)
                ]
        for v, o, t in zip(eqn.outvars, outs, touts):
            env[v] = (o, t)
    outs = [read(v) for v in jaxpr.outvars]
    return [o for o, _ in outs], [t for _, t in outs]


def lowrank_jvp(fn: Callable, primals: Sequence[Array], tangents: Sequence[Any]):
    """``jax.jvp(fn, primals, tangents)`` where tangents may be :class:`LowRankTangent`.

    ``fn`` returns a pytree; returns ``(out, tangent_out)`` with dense output tangents
    (``None`` leaves where the output does not depend on the inputs are zeros).
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*primals)
    outs, touts = _eval(closed.jaxpr, closed.consts, list(primals), list(tangents))
    touts = [
        jnp.zeros(jnp.shape(o), jnp.result_type(o)) if t is None else _dense(t)
        for o, t in zip(outs, touts)
    ]
    treedef = jax.tree_util.tree_structure(out_shape)
    return jax.tree_util.tree_unflatten(treedef, outs), jax.tree_util.tree_unflatten(treedef, touts)


def draw_lowrank(seeds: Array, primals: Sequence[Array], num_tangents: int, rank: int):
    """Per leaf: ``("lowrank", u (K, m, r), w (K, n, r))`` or ``("dense", v (K, *shape))``."""
    out = []
    for i, p in enumerate(primals):
        if p.ndim >= 2:
            m, n = math.prod(p.shape[:-1]), p.shape[-1]
            z = _random.normal(seeds[i], (num_tangents, (m + n) * rank))
            u = z[:, : m * rank].reshape(num_tangents, m, rank)
            w = z[:, m * rank :].reshape(num_tangents, n, rank)
            out.append(("lowrank", u, w))
        else:
            out.append(("dense", _random.normal(seeds[i], (num_tangents, *p.shape))))
    # Materialise the (small) factors once: otherwise XLA fuses the Gaussian draw of u and w
    # into the (m, n) update loop and recomputes it for every kernel element.
    # Replicated: every device draws them (no collective for FSDP-sharded parameters).
    return [
        (d[0], *(replicated_like(_random.materialize(a, seeds[i]), primals[i]) for a in d[1:]))
        for i, d in enumerate(out)
    ]


def combine_lowrank(derivs: Array, drawn, primal: Array, rank: int) -> Array:
    """``(1/K) Σ_k d_k v_k`` for one leaf, without forming any ``v_k`` on its own."""
    kind, *factors = drawn
    k = derivs.shape[0]
    if kind == "dense":
        (v,) = factors
        acc = (
            sum(derivs[i] * v[i].astype(jnp.float32) for i in range(k))
            if k <= 16
            else jnp.tensordot(derivs, v, 1)
        )
        return (acc / np.float32(k)).astype(primal.dtype)
    u, w = factors
    coef = derivs * np.float32(1 / (k * math.sqrt(rank)))
    if k == 1 and rank == 1:
        g = (coef[0] * u[0, :, 0])[:, None] * w[0, :, 0][None, :]
    else:
        g = jnp.einsum("kmr,knr->mn", u * coef[:, None, None], w)
    return g.reshape(primal.shape).astype(primal.dtype)

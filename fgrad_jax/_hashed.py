"""Counter-hash tangents (``"normal"``, ``"rademacher"``): :class:`HashedTangents`.

Elementwise draws of ``_random.py``; every leaf's tangents are a range of one counter
stream (``_random.leaf_streams``), drawn either once for all leaves and stored, or lazily
per leaf inside the JVP and again for the update (see :class:`HashedTangents`).
Re-exported by ``_tangents.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from fgrad_jax import _interpreter, _random
from fgrad_jax._strategy import Direction, Selection, TangentStrategy, mean_of_products

Array = jax.Array


def _k_axis(leaf: Array) -> int:
    """Where the K tangents of a leaf are stacked: before a kernel's last (output) axis.

    Under vmap a batched ``x @ W`` folds K into W's free dimensions; with K next to the
    output axis, ``(in, K, out)`` is already the ``(in, K·out)`` matrix XLA multiplies, so
    no transposing copy of the K tangents is needed.
    """
    return leaf.ndim - 1 if leaf.ndim >= 2 else 0


# A contraction output from which the stored tangents' JVP goes through the interpreter,
# whose rules save a buffer of that size (see dense_jvp): a language model's MLP expansion
# or attention scores (GPT-2 small, batch 8: 96 and 384 MiB), not a small model's.
INTERPRET_ABOVE_BYTES = 16 << 20


def dense_jvp(fun: Callable[..., Any], primals: list[Array], tangents: Any) -> Direction:
    """The JVP along dense tangents drawn before it (stored).

    Plain :func:`jax.jvp` of the traced function, not the structured interpreter: with
    the tangents already stored there is no draw to place, and its program is smaller
    (transformer, Gaussian: 6,786 against 7,625 instructions, 1.68x against 1.8x
    ``jax.grad``'s compile time). Two exceptions go through the interpreter:

    * a contraction whose output outgrows its inputs by :data:`INTERPRET_ABOVE_BYTES` or
      more (a language model's attention scores or MLP expansion): the interpreter's
      joined product and primal-tangent ties save an output-sized buffer per such op,
      which plain ``jax.jvp`` keeps (GPT-2-small LoRA with a chunked cross-entropy: 2.94
      against 2.10 GiB, the forward pass 1.32 GiB). Below that size the smaller program
      wins (the transformer benchmark, largest such output 1 MiB: 18.9 MiB of temporaries
      plain, 14.4 MiB interpreted, at 12-18 % more compile time);
    * ``custom_vjp`` functions, which ``jax.jvp`` refuses.
    """
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*primals)
    treedef = jax.tree_util.tree_structure(out_shape)

    def interpreted():
        schedule = _interpreter.schedule_for(primals)
        return _interpreter.jvp_jaxpr(closed, primals, list(tangents), schedule)

    if _interpreter.has_custom_vjp(closed.jaxpr) or _interpreter.has_outgrowing_dot(
        closed.jaxpr, INTERPRET_ABOVE_BYTES
    ):
        outs, touts = interpreted()
    else:
        try:
            outs, touts = jax.jvp(jcore.jaxpr_as_fun(closed), tuple(primals), tuple(tangents))
        except TypeError as err:
            # A custom_vjp the interpreter cannot inline (inside a scan): its fallback
            # names the operation that hides it. Any other error is the user's to see.
            if "custom_vjp" not in str(err):
                raise
            outs, touts = interpreted()
    (value, aux), (deriv, _) = (
        jax.tree_util.tree_unflatten(treedef, outs),
        jax.tree_util.tree_unflatten(treedef, touts),
    )
    return Direction(value, deriv, aux, None)


class HashedContext(NamedTuple):
    """What :class:`HashedTangents` prepares: the seed words and counter base of each leaf
    (``_random.leaf_streams``), each leaf's lazy draw, the stored tangents (``None``
    when they are drawn lazily), and the interpreter's schedule."""

    seeds: Array
    bases: list[int]
    draws: list[Callable[[Array, Array], Array]]
    stored: list[Array] | None
    schedule: _interpreter.Schedule


@dataclasses.dataclass(frozen=True)
class HashedTangents(TangentStrategy[HashedContext]):
    """Elementwise tangents drawn by the counter-based hash of ``_random`` (normal, rademacher).

    A draw is a pure function of two uint32 seed words and a counter per element, and the
    leaves are consecutive ranges of one stream (``_random.leaf_streams``). Two ways of
    drawing the same values:

    * *stored*: the K tangents of all leaves are drawn as one flat array (one kernel),
      stored and sliced into the leaves, read by the JVP and the update. Compiles about as
      fast as one draw, but keeps K x parameters floats alive through the step.
    * *lazy*: each leaf's tangents are drawn inside the JVP right before the operation
      that uses them (``_interpreter.LazyTangent``) and drawn *again*, bitwise the same,
      for the update (MeZO's regenerate-from-seed trick): no parameter-sized buffer, which
      is what keeps the working memory flat in depth, at one generated kernel per leaf and
      use (compile time grows with the number of leaves).

    Stored while the store takes at most ``keep_below_bytes``: K x parameters x 8 bytes
    (the flat float32 draw and its per-leaf copies are alive together), and the
    computation runs on one device (on several, XLA's SPMD pipeline stores a kept draw
    twice); ``keep_below_bytes=0`` always draws lazily.

    Attributes:
        name: ``"normal"`` or ``"rademacher"``.
        at: ``at(seed, counters) -> float32 draws``.
        keep_below_bytes: Size of the store (K x parameters x 8 bytes) up to which the
            tangents are stored.
        schedule: Overrides the ``_interpreter.Schedule`` chosen from the parameters'
            sharding (orders XLA's work; never changes a value).
    """

    name: str
    at: Callable[[Array, Array], Array]
    keep_below_bytes: int
    schedule: _interpreter.Schedule | None = None

    def draw(self, seed: Array, shape: tuple[int, ...], offset: Array | None = None) -> Array:
        """Draws of ``shape``; ``offset = base + k * leaf.size`` gives tangent ``k`` of a leaf."""
        return self.at(seed, _random.counters(shape, offset))

    def keeps(
        self, leaves: Sequence[Array], schedule: _interpreter.Schedule, num_tangents: int = 1
    ) -> bool:
        """Whether the tangents of ``leaves`` are drawn once and stored (see the class)."""
        n = sum(math.prod(leaf.shape) for leaf in leaves)
        return (
            8 * num_tangents * n <= self.keep_below_bytes
            and schedule.anchor_draws
            and num_tangents * n < 2**32
        )

    def _flat(self, key: Array, leaves: Sequence[Array], num_tangents: int) -> list[Array]:
        """The float32 ``(K, *leaf.shape)`` tangents of all leaves from one stored draw
        (needs ``K·N < 2**32``, where ``leaf_streams`` gives every leaf the same seed)."""
        sizes = [math.prod(leaf.shape) for leaf in leaves]
        seeds, bases = _random.leaf_streams(key, sizes, num_tangents)
        total = num_tangents * sum(sizes)
        # One kernel for all leaves: XLA compiles a kernel per distinct fused draw, and
        # that, not the arithmetic, is what made the step slow to compile (issue 20).
        flat = _interpreter.store_once(self.draw(seeds[0], (total,)), seeds[0])
        return [
            flat[b : b + num_tangents * size].reshape((num_tangents, *leaf.shape))
            for b, size, leaf in zip(bases, sizes, leaves)
        ]

    def __call__(self, key: Array, leaves: Sequence[Array], num_tangents: int) -> list[Array]:
        """The dense ``(K, *leaf.shape)`` tangents the estimator draws for ``key``."""
        sizes = [math.prod(leaf.shape) for leaf in leaves]
        if num_tangents * sum(sizes) < 2**32:
            return self._flat(key, leaves, num_tangents)
        seeds, bases = _random.leaf_streams(key, sizes, num_tangents)
        return [
            self.draw(seeds[i], (num_tangents, *leaf.shape), _offset(bases[i]))
            for i, leaf in enumerate(leaves)
        ]

    def lazy_draw(self, leaf: Array, keep: bool, base: int = 0) -> Callable[[Array, Array], Array]:
        """``draw(seed, k)``: tangent ``k`` of ``leaf``, and all K of them in one draw under vmap.

        ``base`` is the leaf's first counter (``_random.leaf_streams``). Its batching rule
        draws the K tangents in one array with the K axis where the batched matmul wants it
        (``_k_axis``; with K first XLA added a transposing copy and fused the draw into it
        as a slow loop). Under that vmap ``seed`` carries the fake zero of the consuming op,
        so its K copies are equal and the first one is used.
        """
        shape, size, axis = leaf.shape, np.uint32(max(leaf.size, 1)), _k_axis(leaf)
        start = np.uint32(base)

        def finish(t, seed):
            # A kept draw is computed once into a buffer (otherwise XLA duplicates the
            # elementwise draw into each consumer).
            t = _interpreter.store_once(t, seed) if keep else t
            return t.astype(leaf.dtype)

        @jax.custom_batching.custom_vmap
        def draw(seed, k):
            return finish(self.draw(seed, shape, k * size + start), seed)

        @draw.def_vmap
        def _draw_all(axis_size, in_batched, seed, k):
            del axis_size
            seed_batched, k_batched = in_batched
            if seed_batched:
                seed = seed[0]
            if not k_batched:
                return draw(seed, k), False
            stacked = self.at(seed, _random.stacked_counters(shape, axis, k) + start)
            return jnp.moveaxis(finish(stacked, seed), axis, 0), True

        return draw

    def prepare(self, key, primals, num_tangents, selection: Selection):
        del selection
        sizes = [math.prod(p.shape) for p in primals]
        seeds, bases = _random.leaf_streams(key, sizes, num_tangents)
        for p in primals:  # the counter of tangent k, element j is base + k * size + j (uint32)
            _random.check_counter_range((num_tangents, *p.shape))
        schedule = self.schedule or _interpreter.schedule_for(primals)
        draws = [self.lazy_draw(p, False, b) for p, b in zip(primals, bases)]
        if self.keeps(primals, schedule, num_tangents):
            flat = self._flat(key, primals, num_tangents)
            # Each leaf stored again in its dtype: with slices of the flat buffer as the JVP's
            # operands the transformer compiled in 3x jax.grad's time, with the copies 1.75x.
            # The key's word, not the seed, picks the divisor, else XLA merges the two stores
            # and copies the draw into every leaf's kernel. Vectors (biases, norms) are not
            # copied: their slices fuse into their elementwise consumers, where a copy is a
            # kernel the step launches (tiny MLP pipelined: 37 -> 34 kernels, 1.29x -> 1.18x
            # backprop's step; the flat draw then lives until the estimate, within the 8
            # bytes per element that keep_below_bytes counts).
            word = jax.random.key_data(key).reshape(-1)
            stored = [
                _interpreter.store_once(t.astype(p.dtype), word)
                if p.ndim >= 2
                else t.astype(p.dtype)
                for t, p in zip(flat, primals)
            ]
            return stored, HashedContext(seeds, bases, draws, stored, schedule)
        context = HashedContext(seeds, bases, draws, None, schedule)
        return jnp.arange(num_tangents, dtype=jnp.uint32), context

    def direction(self, fun, primals, context: HashedContext, k) -> Direction:
        if context.stored is not None:  # k is then each leaf's stored tangent
            return dense_jvp(fun, primals, k)
        lazy = [
            _interpreter.LazyTangent(functools.partial(_draw_at, draw, seed, k))
            for draw, seed in zip(context.draws, context.seeds)
        ]
        (value, aux), (deriv, _) = _interpreter.structured_jvp(fun, primals, lazy, context.schedule)
        return Direction(value, deriv, aux, None)

    def combine(self, derivatives, primals, context: HashedContext, kept):
        if context.stored is None:
            return self.estimate_from_seeds(derivatives, primals, context.seeds, context.bases)
        return [
            mean_of_products(derivatives, t).astype(p.dtype)
            for t, p in zip(context.stored, primals)
        ]

    def estimate_from_seeds(
        self,
        derivatives: Array,
        primals: list[Array],
        seeds: Array,
        bases: Sequence[int] | None = None,
    ) -> list[Array]:
        """``(1/K) Σ_k d_k v_k`` per leaf, the ``v_k`` drawn again from their ``seeds``
        (and counter ``bases``, 0 if not given).

        Drawn where the estimate is consumed (under jit the draw fuses into the optimizer's
        update) instead of kept alive through the JVP. The fake zero from the derivatives
        stops CSE from merging the two draws into one stored buffer and orders the second
        draw after the JVP.
        """
        seeds_again = seeds ^ _interpreter.fake_zero(derivatives)
        k = derivatives.shape[0]
        bases = bases or [0] * len(primals)
        return [
            mean_of_products(
                derivatives,
                self.draw(seeds_again[i], (k, *p.shape), _offset(bases[i])).astype(p.dtype),
            ).astype(p.dtype)
            for i, p in enumerate(primals)
        ]


def _offset(base: int) -> Array | None:
    return np.uint32(base) if base else None  # type: ignore[return-value]


def _draw_at(draw: Callable[[Array, Array], Array], seed: Array, k: Array, zero: Array) -> Array:
    return draw(seed ^ zero, k)


# A Rademacher draw (one hash, a few integer ops) is cheaper than a memory round trip, but
# drawing lazily means kernels per leaf, which is what a small model's step costs at run
# time and (issue 20) at compile time. Stored up to 6 MiB of tangents (12 MiB of store; 1
# MiB of tangents before issue 20), which takes in the 6-block transformer (4.8 MB: compile
# 4.3x -> 1.8x jax.grad's) and leaves out the paper's MLP (7.5 MB: its step ran 1.18x slower
# stored than lazy, paired on the 2-core CPU) and the depth-32 MLP of the memory checks.
_RADEMACHER = HashedTangents("rademacher", _random.rademacher_at, keep_below_bytes=12 << 20)
# A Gaussian draw (a log, a sqrt, a polynomial) is stored while the store fits in cache-
# sized memory, drawn again beyond (docs/engineering_log.md has the measurements). 16 MiB
# of store is 8 MiB of tangents (16 MiB of tangents, kept per leaf, before issue 20).
_NORMAL = HashedTangents("normal", _random.normal_at, keep_below_bytes=16 << 20)
HASHED: dict[str, HashedTangents] = {"rademacher": _RADEMACHER, "normal": _NORMAL}


def hashed(distribution: str = "rademacher", store: str | int = "auto") -> HashedTangents:
    """The counter-hash tangents of ``tangent="rademacher"`` / ``"normal"``, with the trade
    between compile time and working memory chosen explicitly.

    The K tangents are either drawn once as one kernel and stored through the step
    (compile-lean: the program does not grow with the number of parameter leaves, but
    K x parameters floats stay alive), or drawn lazily inside the JVP right before each
    leaf's operation and again, bitwise the same, for the update (memory-lean: working
    memory flat in depth, one draw kernel per leaf, which is what compile time grows
    with). The estimates are the same either way.

    Args:
        distribution: ``"rademacher"`` or ``"normal"``.
        store: ``"auto"`` (the default of the plain names: stored while the store, K x
            parameters x 8 bytes, is at most 12 MiB for Rademacher and 16 MiB for the
            Gaussian), ``"always"`` (compile-lean), ``"never"`` (memory-lean), or a byte
            limit. Tangents are stored on one device only: under a multi-device sharding
            they are always drawn lazily.

    Returns:
        A tangent strategy for ``tangent=``.

    Example:
        >>> import jax, jax.numpy as jnp, fgrad_jax
        >>> f = lambda p: jnp.sum(jnp.tanh(p["w"]))
        >>> lean = fgrad_jax.forward_grad(f, tangent=fgrad_jax.hashed("normal", store="never"))
        >>> kept = fgrad_jax.forward_grad(f, tangent=fgrad_jax.hashed("normal", store="always"))
        >>> p = {"w": jnp.ones((3, 4))}
        >>> bool(jnp.allclose(lean(jax.random.key(0), p)["w"], kept(jax.random.key(0), p)["w"]))
        True
    """
    if distribution not in HASHED:
        raise ValueError(
            f"distribution must be one of {sorted(HASHED)}; got {distribution!r} (other "
            "tangents, e.g. tangent='sphere', have no lazy form)."
        )
    limits = {"always": 1 << 62, "never": 0, "auto": HASHED[distribution].keep_below_bytes}
    if isinstance(store, str) and store in limits:
        limit = limits[store]
    elif isinstance(store, int) and not isinstance(store, bool) and store >= 0:
        limit = store
    else:
        raise ValueError(
            f"store must be 'auto', 'always', 'never' or a byte limit >= 0; got {store!r}."
        )
    return dataclasses.replace(HASHED[distribution], keep_below_bytes=limit)

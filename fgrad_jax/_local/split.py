"""Patch-wise and group-wise local losses (Ren, Kornblith, Liao & Hinton 2023, Sec. 4).

A block whose output ``a`` has shape ``(B, S_1, ..., S_n, C)`` is split into a grid of
``P = P_1 ⋯ P_n`` spatial patches and ``G`` channel groups, and gets one loss column per
(patch, group). The columns follow the paper's feature aggregator (its released code,
``spatial_avg_group_linear``): in the forward pass every column sees the whole block, the
class scores of the default head (global average pool + linear), while its derivative
comes from its own patch's and group's activations only, the other patches and groups
entering through ``stop_gradient``::

    m_pg  = (1/S) Σ_{positions in patch p} a[..., channels of group g]       (B, C/G)
    z     = pool(sg(a)) K + b                                                (B, classes)
    z_pg  = sg(z) + (z - sg(z)) / (P G)  +  (m_pg - sg(m_pg)) sg(K_g)
    ℓ_pg  = loss(z_pg, y)   (value ℓ, the block's loss, for every column)

The column returned is ``ℓ_pg + sg(ℓ_pg / (P G) - ℓ_pg)``: value ``ℓ / (P G)`` (the
columns of a block sum to its loss) with the derivative of ``ℓ_pg``. Summed over the
columns, the derivatives are those of ``ℓ``: each ``a_pg`` is live in one column only and
the head's share is divided by ``P G``. So the objective, and ``jax.grad`` of the summed
columns, is the block-wise one; what changes is that with activity perturbation every
element of the block's dense/conv output is scored against its own column, whose
directional derivative holds the noise of its own patch and group only.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgrad_jax import _activity_trace, _interpreter

Array = jax.Array


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer; got {value!r}.")
    return int(value)


def check_spec(
    spec: Any, name: str, num_blocks: int, what: str = "blocks (one per module with parameters)"
) -> None:
    """Validates ``patches`` / ``groups`` as given to ``local_losses`` (shapes come later)."""
    entries = spec if isinstance(spec, list) else [spec]
    if isinstance(spec, list) and len(spec) != num_blocks:
        raise ValueError(
            f"{name} has {len(spec)} entries but the model has {num_blocks} {what}; give "
            "one entry per block, or one value for all."
        )
    for entry in entries:
        if entry is None:
            continue
        for v in entry if isinstance(entry, tuple) else (entry,):
            _positive(v, f"every entry of {name}")
        if name == "groups" and isinstance(entry, tuple):
            raise ValueError(f"groups takes an int per block (channel groups); got {entry!r}.")


def block_layout(
    i: int, shape: tuple[int, ...], patches: Any, groups: Any, head: str
) -> tuple[tuple[int, ...], int]:
    """``(patches per spatial axis, groups)`` of block ``i`` with output ``shape``.

    ``head`` is ``"default"``, ``"custom"`` or ``"none"`` (a last block whose output is
    already the class scores). A single value (not a list) applies to every block with a
    default head, patches only where the output has spatial axes; a per-block list is
    taken literally and errors where it does not fit.
    """
    explicit_p, explicit_g = isinstance(patches, list), isinstance(groups, list)
    p = patches[i] if explicit_p else patches
    g = (
        1
        if (groups[i] if explicit_g else groups) is None
        else int(groups[i] if explicit_g else groups)
    )
    n = max(len(shape) - 2, 0)
    if n == 0 and p is not None:
        if explicit_p and any(v != 1 for v in (p if isinstance(p, tuple) else (p,))):
            raise ValueError(
                f"patches: block {i}'s output has shape {shape}, with no spatial axes to "
                "split into patches (patches need outputs (B, H, W, C) or (B, L, C)). Give "
                f"None for block {i} in the patches list."
            )
        p = None
    grid = (1,) * n if p is None else (p if isinstance(p, tuple) else (p,) * n)
    if len(grid) != n:
        raise ValueError(
            f"patches: block {i}'s output has shape {shape}, with {n} spatial axes, but "
            f"patches={p!r} gives {len(grid)}; give one count per spatial axis or one int."
        )
    if int(np.prod(grid, dtype=np.int64)) * g == 1:
        return grid, 1
    asked = (explicit_p and np.prod(grid) > 1) or (explicit_g and g > 1)
    if head == "custom" or (head == "none" and asked):
        what = "a custom head" if head == "custom" else "no head (its output is the scores)"
        raise ValueError(
            f"Block {i} has {what}, but patch-/group-wise losses split the default head "
            f"(average pool + linear). Pass head=None for block {i}, or give patches/groups "
            f"as per-block lists with None / 1 for block {i}."
        )
    if head == "none":
        return (1,) * n, 1
    for k, (s, q) in enumerate(zip(shape[1:-1], grid)):
        if s % q:
            fits = [d for d in range(1, s + 1) if s % d == 0]
            raise ValueError(
                f"patches: spatial axis {k + 1} of block {i}'s output {shape} has size {s}, "
                f"not divisible into {q} patches; use a divisor of {s}: {fits}."
            )
    if shape[-1] % g:
        fits = [d for d in range(1, shape[-1] + 1) if shape[-1] % d == 0]
        raise ValueError(
            f"groups: block {i}'s output {shape} has {shape[-1]} channels (last axis), not "
            f"divisible into {g} groups; use a divisor of {shape[-1]}: {fits}."
        )
    return grid, g


def block_means(table: Array, sizes: Sequence[int]) -> Array:
    """``(L,)`` mean loss of every block from the ``(B, C)`` loss columns, block ``l``
    owning the next ``sizes[l]`` columns (its patch/group columns sum to its loss)."""
    means = jnp.mean(table.astype(jnp.float32), axis=0)
    ends = np.cumsum(sizes)
    return jnp.stack([jnp.sum(means[a:b]) for a, b in zip([0, *ends[:-1]], ends)])


def split_columns(
    kernel: Array,
    bias: Array,
    h: Array,
    y: Array,
    loss: Callable[[Array, Array], Array],
    grid: tuple[int, ...],
    groups: int,
) -> Array:
    """The ``(B, P G)`` loss columns of one split block (see the module docstring)."""
    sg = jax.lax.stop_gradient
    b, sizes, c = h.shape[0], h.shape[1:-1], h.shape[-1]
    num_p = int(np.prod(grid, dtype=np.int64))
    scale = np.float32(1.0 / (num_p * groups))
    pooled = jnp.mean(sg(h), axis=tuple(range(1, h.ndim - 1))) if h.ndim > 2 else sg(h)
    z = pooled @ kernel + bias
    z = sg(z) + (z - sg(z)) * scale.astype(z.dtype)
    split: list[int] = [b]
    for s, q in zip(sizes, grid):
        split += [q, s // q]
    split += [groups, c // groups]
    within = tuple(range(2, 2 * len(sizes) + 1, 2))
    m = jnp.sum(h.reshape(split), axis=within) / np.float32(np.prod(sizes, dtype=np.int64))
    m = m.reshape(b, num_p, groups, c // groups)
    k_g = sg(kernel).reshape(groups, c // groups, kernel.shape[-1])
    delta = jnp.einsum("bpgc,gck->bpgk", m - sg(m), k_g)
    logits = (z[:, None, None, :] + delta).reshape(b, num_p * groups, -1)
    cols = jax.vmap(loss, in_axes=(1, None), out_axes=1)(logits, y)
    return cols + sg(cols * scale.astype(cols.dtype) - cols)


def _column_ids(shape: tuple[int, ...], grid: tuple[int, ...], groups: int):
    n = len(shape) - 2
    pid = np.zeros((1,) * len(shape), np.int64)
    for k, (s, q) in enumerate(zip(shape[1:-1], grid)):
        idx = (np.arange(s) * q // s).reshape((1,) * (k + 1) + (s,) + (1,) * (n - k))
        pid = pid * q + idx
    gid = (np.arange(shape[-1]) * groups // shape[-1]).reshape((1,) * (n + 1) + (shape[-1],))
    return np.broadcast_to(pid, shape), np.broadcast_to(gid, shape)


_REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod")


class _Probe(_activity_trace.Trace):
    """An activity-perturbation trace whose site tangents are given (``pattern``) and whose
    weight-perturbed leaves get none: it pushes chosen output perturbations forward. With
    ``batch_constant``, reductions over the batch axis (batch statistics) pass no tangent."""

    def __init__(self, primals, batch, uses, pattern, batch_constant=False):
        super().__init__(None, None, primals, batch, uses, True)
        self.pattern = pattern
        if batch_constant:
            self.rules.update({name: [self._batch_reduction_rule] for name in _REDUCTIONS})

    def _batch_reduction_rule(self, eqn, primals, tangents):
        (x,) = primals
        if 0 not in eqn.params["axes"] or jnp.ndim(x) == 0 or jnp.shape(x)[0] != self.batch:
            return None
        return [eqn.primitive.bind(x, **eqn.params)], [None]

    def draw(self, shape, dtype):
        return self.pattern(len(self.sites), shape, dtype)  # called once per site, in order

    def weight_tangent(self, leaf):
        return jnp.zeros(jnp.shape(self.primals[leaf]), jnp.result_type(self.primals[leaf]))


class Separability(NamedTuple):
    """Which leaves of the split blocks activity perturbation scores per column."""

    split: frozenset[int]  # every dense/conv output of the leaf splits like its block's
    perturbed: frozenset[int]  # the leaves of split blocks that feed a dense/conv op


def separable_leaves(
    run: Callable[[list[Array]], list[Array]],
    leaves: list[Array],
    batch: int,
    block_of_leaf: Sequence[int],
    splits: Sequence[tuple[tuple[int, ...], int]],
    seed: int,
    batch_constant: bool = False,
) -> Separability:
    """The leaves whose every dense/conv output splits like its block's output.

    ``run(leaves)`` returns the blocks' outputs (tapped before their ``stop_gradient``) on a
    stand-in batch of ``batch`` examples; ``splits[b]`` is block ``b``'s (patch grid,
    groups). For every dense/conv op on a leaf of a split block, a random perturbation of
    one patch (one group) of the op's output is pushed forward through the rest of the
    block, one pattern per patch and per group, all in one vmapped JVP: the op can be
    scored per column only if every pattern stays inside its own patch (group) of the block
    output. A residual block's last conv passes (BatchNorm and additions keep channels
    apart); its first does not (the second conv mixes channels and positions), and a
    BatchNorm in training mode mixes positions, so patches stop there while groups pass,
    unless ``batch_constant`` (per-example scoring, which already leaves out how an
    example's activations move the batch statistics): then reductions over the batch axis
    carry no perturbation, and patches pass a BatchNorm as groups do.
    """
    closed = jax.make_jaxpr(run)(leaves)
    uses = _activity_trace.use_counts(closed.jaxpr, collections.Counter())
    views = lambda trace: [_activity_trace.View(trace, i, lambda w: w) for i in range(len(leaves))]
    finding = _Probe(leaves, batch, uses, lambda s, shape, dtype: jnp.zeros(shape, dtype))
    jax.eval_shape(
        lambda ls: _interpreter.jvp_jaxpr(closed, ls, views(finding), rules=finding.rules)[1],
        leaves,
    )
    sites = [(s.leaf, tuple(s.u.shape)) for s in finding.sites]
    out_shapes = [tuple(v.aval.shape) for v in closed.jaxpr.outvars]

    rows: list[tuple[int, int, int]] = []  # (site, 0 patch / 1 group, column index)
    fits: dict[int, bool] = {}
    for s, (leaf, shape) in enumerate(sites):
        b = block_of_leaf[leaf]
        if b >= len(splits):
            continue
        grid, g = splits[b]
        if int(np.prod(grid, dtype=np.int64)) * g == 1:
            continue
        tap = out_shapes[b]
        fits[s] = (
            len(shape) == len(tap)
            and not any(n % q for n, q in zip(shape[1:-1], grid))
            and shape[-1] % g == 0
        )
        if fits[s]:
            num_p = int(np.prod(grid, dtype=np.int64))
            rows += [(s, 0, j) for j in range(num_p if num_p > 1 else 0)]
            rows += [(s, 1, j) for j in range(g if g > 1 else 0)]
    leaky = {s for s, ok in fits.items() if not ok}
    if rows:
        site_ids = {s: _column_ids(sites[s][1], *splits[block_of_leaf[sites[s][0]]]) for s in fits}
        tap_ids = [_column_ids(out_shapes[b], *splits[b]) for b in range(len(splits))]

        def leak(row):
            def pattern(s, shape, dtype):
                if s not in site_ids:
                    return jnp.zeros(shape, dtype)
                noise = np.random.default_rng([seed, s]).standard_normal(shape).astype(dtype)
                ids = jnp.where(row[1] == 0, site_ids[s][0], site_ids[s][1])
                return jnp.where((row[0] == s) & (ids == row[2]), noise, 0)

            probe = _Probe(leaves, batch, uses, pattern, batch_constant)
            touts = _interpreter.jvp_jaxpr(closed, leaves, views(probe), rules=probe.rules)[1]
            total = jnp.float32(0)
            for b, t in enumerate(touts[: len(splits)]):
                ids = jnp.where(row[1] == 0, tap_ids[b][0], tap_ids[b][1])
                total = total + jnp.sum(jnp.where(ids != row[2], jnp.abs(t.astype(jnp.float32)), 0))
            return total

        table = np.asarray(rows, np.int32)
        leaks = np.asarray(jax.jit(jax.vmap(leak))(jnp.asarray(table)))
        # A non-finite leak counts as a leak: the probe cannot vouch for that op.
        leaky |= {int(s) for s, bad in zip(table[:, 0], ~(leaks == 0)) if bad}
    blocked = {sites[s][0] for s in leaky}
    checked = {sites[s][0] for s in fits}
    return Separability(frozenset(checked - blocked), frozenset(checked))

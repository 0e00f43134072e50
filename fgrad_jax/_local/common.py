"""What both forms of local losses share: the variables, the same-pass metrics, the
layout of the loss columns, and the tangent strategy's base distribution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgrad_jax._activity import PERTURB, Columns
from fgrad_jax._tangents import HASHED

Array = jax.Array
Path = tuple[str, ...]


# How activity perturbations are scored when the examples are coupled (BatchNorm in
# training mode): "correct" by the batch's summed derivative (unbiased), "per_example" by
# each example's own: the gradient with the batch statistics held constant (tested).
BATCH_COUPLING = ("correct", "per_example")


class LocalVariables(NamedTuple):
    """What :meth:`ModelLocalLosses.init` returns: ``params, state, local = local.init(...)``.

    Attributes:
        params: ``{"model": <the model's parameters>, "heads": [one dict per tapped block]}``:
            what the optimizer trains.
        state: The model's other variables (linen: every collection but ``params``, e.g.
            ``{"batch_stats": ...}``; nnx: every variable but ``nnx.Param``), updated by
            each step; ``{}`` when there are none.
        local: A copy of the :class:`ModelLocalLosses` that knows where the blocks end, the
            loss columns and the batch coupling for inputs shaped like the ``x`` given to
            ``init``; use it for the losses, the transformation and predictions.
    """

    params: dict[str, Any]
    state: Any
    local: Any


class LocalAux(NamedTuple):
    """What one local-loss pass reports besides the per-example losses.

    Attributes:
        state: The model state after this forward pass (new BatchNorm statistics, RNG
            counters): pass it to the next step.
        block_losses: ``(L,)`` mean loss of every block (the last is the model's own).
        loss: The model's own mean loss on the batch (its output under ``loss``).
        accuracy: Fraction of the batch whose largest output is the label (NaN when the
            labels are not integer class indices of shape ``(B,)``).
    """

    state: Any
    block_losses: Array
    loss: Array
    accuracy: Array


# ----------------------------------------------------------------------------- the losses


class Layout(NamedTuple):
    paths: tuple[Path, ...]  # the tapped modules, in call order
    blocks: tuple[int, ...]  # per leaf of params["model"]: its block
    splits: tuple[tuple[tuple[int, ...], int], ...]  # per tapped block: (patch grid, groups)
    split_leaves: frozenset[int]  # leaves of split blocks scored per patch/group column
    leaf_paths: tuple[str, ...]  # per leaf of params["model"]: "Block_0/Conv_0/kernel"
    aux: Any  # LocalAux of ShapeDtypeStructs (forward_gradient's aux_example)
    coupled: bool  # an example's losses depend on other examples (BatchNorm in training)

    def spec(self, block: int, split: bool) -> int | Columns:
        return column_spec(self.splits, block, split)


def column_spec(
    splits: Sequence[tuple[tuple[int, ...], int]], block: int, split: bool
) -> int | Columns:
    """Block ``block``'s loss columns, given every tapped block's ``(patch grid, groups)``:
    its one column, or the :class:`Columns` of its patches and groups (``split``: scored per
    column). ``block == len(splits)`` is the model's own loss, the last column."""
    sizes = [int(np.prod(grid, dtype=np.int64)) * g for grid, g in splits] + [1]
    start = sum(sizes[:block])
    if sizes[block] == 1:
        return start
    return Columns(start, *splits[block], split)


def accuracy(out: Array, y: Array) -> Array:
    if out.ndim != 2 or jnp.shape(y) != out.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
        return jnp.float32(jnp.nan)
    return jnp.mean((jnp.argmax(out, axis=-1) == y).astype(jnp.float32))


def local_tangent_base(perturb: str, tangent: str) -> Any:
    """The elementwise tangent law of a local-loss strategy, after checking the arguments."""
    if perturb not in PERTURB:
        raise ValueError(f"perturb must be one of {PERTURB}; got {perturb!r}.")
    if tangent not in HASHED:
        raise ValueError(f"tangent must be one of {sorted(HASHED)}; got {tangent!r}.")
    return HASHED[tangent]

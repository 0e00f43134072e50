"""A block list as local losses see it: each block one module with parameters and the
parameterless callables before and after it, drawn automatically or by nested lists."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
from flax import nnx

from fgrad_jax._flax import split_wrt

Array = jax.Array


@dataclasses.dataclass
class Block:
    """One parametrised layer and the parameterless callables that follow it."""

    layer: Any
    tail: list[Callable[[Array], Array]]
    pre: list[Callable[[Array], Array]] = dataclasses.field(default_factory=list)

    def apply(self, params: Any, h: Array) -> Array:
        for fn in self.pre:
            h = fn(h)
        h = self.layer_apply(params, h)
        for fn in self.tail:
            h = fn(h)
        return h

    def layer_apply(self, params: Any, h: Array) -> Array:
        if isinstance(self.layer, nn.Module):
            # cast: without mutable=, apply returns the output alone (not (out, state)).
            return cast(Array, self.layer.apply({"params": params}, h))
        graphdef, _, rest = split_wrt(self.layer, nnx.Param)
        return nnx.merge(graphdef, params, rest, copy=True)(h)


def has_params(layer: Any) -> bool:
    if isinstance(layer, nn.Module):
        return True
    if isinstance(layer, nnx.Module):
        return bool(jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param)))
    return False


def layer_list(blocks: Any) -> list[Any]:
    if isinstance(blocks, (nnx.Sequential, nn.Sequential)):
        return list(blocks.layers)
    if isinstance(blocks, (nnx.Module, nn.Module)) or not isinstance(blocks, Sequence):
        raise TypeError(
            "local_losses needs the model as an ordered sequence of blocks (an "
            "nnx.Sequential, an nn.Sequential, or a list of nnx/linen modules and "
            f"parameterless callables); got {type(blocks).__name__}. For a model class, say "
            "where its blocks end: local_losses(model, num_classes, boundaries=BlockClass)."
        )
    return list(blocks)


def explicit_block(index: int, entries: Sequence[Any]) -> Block:
    """One block given as a list: its one module with parameters and the callables
    before (``pre``) and after (``tail``) it."""
    owners = [j for j, entry in enumerate(entries) if has_params(entry)]
    if len(owners) != 1:
        raise ValueError(
            f"Block {index} holds {len(owners)} modules with parameters; each block of an "
            "explicit list needs exactly one (split it into that many blocks, or wrap the "
            "layers in one module)."
        )
    for entry in entries:
        if not callable(entry):
            raise TypeError(f"Block entries must be modules or callables; got {entry!r}.")
    j = owners[0]
    return Block(entries[j], list(entries[j + 1 :]), list(entries[:j]))


def automatic_blocks(layers: list[Any]) -> list[Block]:
    """Blocks starting at every module with parameters; parameterless entries join the block
    before them (the first block's ``pre`` when they come first)."""
    grouped: list[Block] = []
    leading: list[Callable[[Array], Array]] = []
    for layer in layers:
        if has_params(layer):
            grouped.append(Block(layer, []))
        elif not callable(layer):
            raise TypeError(f"Block entries must be modules or callables; got {layer!r}.")
        elif grouped:
            grouped[-1].tail.append(layer)
        else:
            leading.append(layer)
    if not grouped:
        raise ValueError(
            "local_losses needs at least one block with parameters; got "
            f"{len(layers)} entries and none has parameters. Pass the model's layers in "
            "order, e.g. nnx.Sequential(nnx.Linear(...), nnx.relu, nnx.Linear(...))."
        )
    grouped[0].pre = leading
    return grouped

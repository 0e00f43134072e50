"""Block-local losses (Ren et al. 2023, "local greedy" forward gradients) for unmodified models.

A model given as an ordered sequence of blocks is trained with one loss per block: block
``l`` sees ``stop_gradient`` of the previous block's output, an auxiliary head (global
average pool + linear, created here; or the user's) maps its output to class scores, and
``ℓ_l = loss(head_l(block_l(sg(h_{l-1}))), y)``. Block ``l``'s parameters and head affect
``ℓ_l`` only, so the estimate of each block's gradient is the forward gradient of its own
local loss. The per-example losses are returned as a ``(B, L)`` matrix and the tangent
strategy (:meth:`LocalLosses.tangent`) estimates every leaf from its own block's column:
one JVP gives L independent local estimates (no mixing of the blocks' noise).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fgrad_jax._activity import ActivityPerturbation, Columns
from fgrad_jax._flax import split_wrt
from fgrad_jax._local import split as _split
from fgrad_jax._local.common import LocalAux, accuracy, local_tangent_base
from fgrad_jax._local.heads import apply_head, head_kind, init_head
from fgrad_jax._transform import forward_gradient

Array = jax.Array

LOSSES: dict[str, Callable[[Array, Array], Array]] = {
    "softmax_cross_entropy": optax.softmax_cross_entropy_with_integer_labels,
}


@dataclasses.dataclass
class _Block:
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


def _const(value: Any, _: Any) -> Any:
    return value


def _has_params(layer: Any) -> bool:
    if isinstance(layer, nn.Module):
        return True
    if isinstance(layer, nnx.Module):
        return bool(jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param)))
    return False


def _layers(blocks: Any) -> list[Any]:
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


def _explicit_block(index: int, entries: Sequence[Any]) -> _Block:
    """One block given as a list: its one module with parameters and the callables
    before (``pre``) and after (``tail``) it."""
    owners = [j for j, entry in enumerate(entries) if _has_params(entry)]
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
    return _Block(entries[j], list(entries[j + 1 :]), list(entries[:j]))


def _automatic_blocks(layers: list[Any]) -> list[_Block]:
    """Blocks starting at every module with parameters; parameterless entries join the block
    before them (the first block's ``pre`` when they come first)."""
    grouped: list[_Block] = []
    leading: list[Callable[[Array], Array]] = []
    for layer in layers:
        if _has_params(layer):
            grouped.append(_Block(layer, []))
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


class LocalLosses:
    """A block sequence trained with block-local losses; made by :func:`local_losses`.

    The parameters (from :meth:`init`) are ``{"blocks": [...], "heads": [...]}``, one entry
    per block (a final block whose output already has shape ``(B, num_classes)`` gets no
    head: its local loss is the model's own loss, and its head entry is ``{}``).
    """

    def __init__(self, blocks, num_classes, loss, head, patches=None, groups=1):
        self.blocks = blocks
        self.num_classes = int(num_classes)
        self.loss = loss
        self.head = head
        self.patches, self.groups_per_block = patches, groups
        self._heads: list[Any] | None = None  # per block: None (none), "default" or a module
        self.layout: list[tuple[tuple[int, ...], int]] = []  # per block: (patch grid, groups)
        self._starts: list[int] = []  # per block: its first loss column
        self._not_separable: dict[int, str] = {}  # block -> why activations can't split it

    def init(self, key: Array, x: Array) -> dict[str, list[Any]]:
        """Parameters of the blocks (nnx: the modules' current values) and fresh heads."""
        keys = jax.random.split(key, 2 * len(self.blocks))
        params: list[Any] = []
        heads: list[Any] = []
        kinds: list[Any] = []
        h = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
        for i, block in enumerate(self.blocks):
            h_layer = h  # the layer's own input: after the callables that precede it
            for fn in block.pre:
                h_layer = jax.eval_shape(fn, h_layer)
            if isinstance(block.layer, nn.Module):
                variables = jax.eval_shape(block.layer.init, keys[2 * i], h_layer)
                if set(variables) - {"params"}:
                    raise ValueError(
                        f"Block {i} ({type(block.layer).__name__}) has variable collections "
                        f"{sorted(set(variables) - {'params'})}; local_losses supports linen "
                        "blocks with 'params' only (use an nnx module for mutable state)."
                    )
                zeros = jnp.zeros((1, *h_layer.shape[1:]), h_layer.dtype)  # one example
                p = block.layer.init(keys[2 * i], zeros)["params"]
            else:
                p = nnx.state(block.layer, nnx.Param)
            params.append(p)
            h = jax.eval_shape(block.apply, p, h)
            last = i == len(self.blocks) - 1
            kind = head_kind(self.head, i)
            if last and h.shape[1:] == (self.num_classes,) and kind == "default":
                kind = None  # the last block's output is already the class scores
            kinds.append(kind)
            heads.append(init_head(kind, keys[2 * i + 1], h, self.num_classes))
        self._heads = kinds
        self._split_layout(x, params)
        return {"blocks": params, "heads": heads}

    def _split_layout(self, x: Array, params: list[Any]) -> None:
        """Patch/group layout per block, its first column, and the activity-split check."""
        kinds = self._check_init()
        layout, starts, problems, start = [], [], {}, 0
        h = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
        for i, block in enumerate(self.blocks):
            h_layer = h
            for fn in block.pre:
                h_layer = jax.eval_shape(fn, h_layer)
            h = jax.eval_shape(block.apply, params[i], h)
            head = "none" if kinds[i] is None else "default" if kinds[i] == "default" else "custom"
            grid, g = _split.block_layout(i, h.shape, self.patches, self.groups_per_block, head)
            layout.append((grid, g))
            starts.append(start)
            start += int(np.prod(grid, dtype=np.int64)) * g
            if start - starts[-1] > 1:
                # Concrete stand-ins, evaluated now: init may run under jit/vmap, and the
                # check reads values.
                with jax.ensure_compile_time_eval():
                    zeros = jnp.zeros((1, *h_layer.shape[1:]), h_layer.dtype)  # one example
                    stand_in = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params[i])
                    why = _split.check_separable(
                        block.layer_apply, block.tail, stand_in, zeros, grid, g, 7919 + i,
                    )  # fmt: skip
                if why is not None:
                    problems[i] = why
        scalar = self.patches is not None and not isinstance(self.patches, list)
        if scalar and self.patches != 1 and all(int(np.prod(grid)) == 1 for grid, _ in layout):
            raise ValueError(
                f"patches={self.patches!r}: no block has a default head and an output "
                "with spatial axes (B, H, W, C) to split into patches. Use patches=None."
            )
        self.layout, self._starts, self._not_separable = layout, starts, problems

    def _head(self, i: int, params: Any, h: Array) -> Array:
        return apply_head(self._check_init()[i], params, h)

    def _check_init(self) -> list[Any]:
        if self._heads is None:
            raise ValueError("Call init(key, x) first: it creates the heads' parameters.")
        return self._heads

    def losses(
        self, params: Any, x: Array, y: Array, *, with_aux: bool = False
    ) -> Array | tuple[Array, LocalAux]:
        """Per-example local losses, shape ``(B, L)``: column ``l`` is block ``l``'s loss.

        A block split into ``P`` patches and ``G`` groups has ``P G`` columns instead
        (patch-major), each of value ``loss / (P G)`` with the derivative of its own
        patch's and group's loss; ``local.layout`` lists the split per block. With
        ``with_aux=True``: ``(losses, LocalAux)`` from the same pass (``state`` is ``{}``;
        ``loss`` and ``accuracy`` are those of the last block's class scores, the model's
        prediction)."""
        self._check_init()
        cols, h, scores = [], x, x
        for i, block in enumerate(self.blocks):
            h = block.apply(params["blocks"][i], jax.lax.stop_gradient(h))
            grid, g = self.layout[i]
            last = i == len(self.blocks) - 1
            if int(np.prod(grid)) * g == 1:
                scores = self._head(i, params["heads"][i], h)
                cols.append(self.loss(scores, y)[:, None])
                continue
            head = params["heads"][i]
            cols.append(
                _split.split_columns(head["kernel"], head["bias"], h, y, self.loss, grid, g)
            )
            if last and with_aux:
                scores = jax.lax.stop_gradient(self._head(i, head, h))
        table = jnp.concatenate(cols, axis=1)
        if not with_aux:
            return table
        block = _split.block_means(table, [int(np.prod(grid)) * g for grid, g in self.layout])
        return table, LocalAux({}, block, block[-1], accuracy(scores, y))

    def value_fn(
        self, x: Array, y: Array, *, with_aux: bool = False
    ) -> Callable[[Any], Array | tuple[Array, LocalAux]]:
        """``value_fn(params) -> (B, L)`` losses (``with_aux``: and the
        :class:`~fgrad_jax.LocalAux`), for ``update(..., value_fn=...)``."""
        return lambda params: self.losses(params, x, y, with_aux=with_aux)

    def predict(self, params: Any, x: Array) -> Array:
        """Class scores of the last block's head (or of the last block itself)."""
        self._check_init()
        h = x
        for i, block in enumerate(self.blocks):
            h = block.apply(params["blocks"][i], h)
        return self._head(len(self.blocks) - 1, params["heads"][-1], h)

    def groups(self, params: Any) -> dict[str, list[Any]]:
        """The loss column of every parameter leaf: its block's index, or for a block split
        into patches/groups a :class:`~fgrad_jax._activity.Columns` naming its columns."""
        self._check_init()

        def spec(part: str, i: int) -> Any:
            grid, g = self.layout[i]
            if int(np.prod(grid)) * g == 1:
                return self._starts[i]
            return Columns(self._starts[i], grid, g, part == "blocks")

        return {
            part: [
                jax.tree.map(functools.partial(_const, spec(part, i)), p)
                for i, p in enumerate(params[part])
            ]
            for part in ("blocks", "heads")
        }

    def _check_separable(self) -> None:
        for i, why in self._not_separable.items():
            grid, g = self.layout[i]
            raise ValueError(
                f"patches={grid} / groups={g} with perturb='activations': block {i} "
                f"({type(self.blocks[i].layer).__name__}) {why}, so its perturbations cannot "
                "be scored against their own patch/group. Fixes: list such layers as separate "
                "blocks, use pooling whose windows do not cross patch borders, give this block "
                "None / 1 in per-block patches/groups lists, or use perturb='weights' (same "
                "objective, no variance reduction)."
            )

    def _columns(self, params: Any) -> dict[str, list[Any]]:
        self._check_separable()
        return self.groups(params)

    def tangent(
        self, perturb: str = "activations", tangent: str = "rademacher"
    ) -> ActivityPerturbation:
        """The tangent strategy: every leaf estimated from its own block's loss column.

        ``perturb="activations"`` perturbs the outputs of each block's (and head's)
        dense/conv ops; ``"weights"`` gives every leaf a weight tangent. Pass it as
        ``tangent=`` to :func:`fgrad_jax.forward_grad` or :func:`fgrad_jax.forward_gradient`.
        """
        base = local_tangent_base(perturb, tangent)
        if perturb == "weights":
            return ActivityPerturbation(base, False, self.groups)
        if self._heads is not None:
            self._check_separable()
        return ActivityPerturbation(base, True, self._columns)

    def forward_gradient(
        self,
        key: int | Array = 0,
        *,
        num_tangents: int = 1,
        perturb: str = "activations",
        tangent: str = "rademacher",
        tangent_chunk: int | None = None,
        with_aux: bool = False,
    ) -> optax.GradientTransformationExtraArgs:
        """:func:`fgrad_jax.forward_gradient` with the local-loss tangents; the state's
        ``value`` is the sum over blocks of the mean local losses. ``tangent_chunk`` is
        :func:`fgrad_jax.forward_gradient`'s (``None``: automatic; ``num_tangents``: all
        tangents in one pass, for accelerators with memory to spare). ``with_aux=True``
        (with ``value_fn(x, y, with_aux=True)``): ``forward_gradient_state(opt_state).aux``
        is the step's :class:`~fgrad_jax.LocalAux` (per-block losses, the model's loss and
        accuracy)."""
        self._check_init()
        zero = jnp.float32(0)
        aux = lambda: LocalAux({}, jnp.zeros((len(self.blocks),), jnp.float32), zero, zero)
        return forward_gradient(
            key,
            num_tangents=num_tangents,
            tangent=self.tangent(perturb, tangent),
            tangent_chunk=tangent_chunk,
            has_aux=with_aux,
            aux_example=jax.eval_shape(aux) if with_aux else None,
        )

    def update_model(self, params: Any) -> None:
        """Writes the blocks' parameters back into the nnx modules (linen blocks: no-op)."""
        for block, p in zip(self.blocks, params["blocks"]):
            if isinstance(block.layer, nnx.Module):
                nnx.update(block.layer, p)


def block_list_losses(
    blocks: Any, num_classes: int, loss: Any, head: Any, patches: Any, groups: Any
) -> LocalLosses:
    """:func:`fgrad_jax.local_losses` for a block list (boundaries at the parameterised
    modules, or drawn by nested lists)."""
    layers = _layers(blocks)
    nested = [isinstance(layer, (list, tuple)) for layer in layers]
    if layers and all(nested):
        grouped = [_explicit_block(i, entries) for i, entries in enumerate(layers)]
    elif any(nested):
        raise TypeError(
            "blocks mixes lists and single layers: pass either a flat sequence of layers "
            "(boundaries drawn at every module with parameters) or a list of blocks, each a "
            "list with one module with parameters, e.g. [[conv, relu], [flatten, dense]]."
        )
    else:
        grouped = _automatic_blocks(layers)
    if isinstance(head, (list, tuple)) and len(head) != len(grouped):
        raise ValueError(
            f"head has {len(head)} entries but the model has {len(grouped)} blocks "
            "(one per module with parameters); give one head (or None) per block."
        )
    _split.check_spec(patches, "patches", len(grouped))
    _split.check_spec(groups, "groups", len(grouped))
    return LocalLosses(grouped, num_classes, loss, head, patches, groups)

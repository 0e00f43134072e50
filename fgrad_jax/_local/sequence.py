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

import copy
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fgrad_jax._activity import ActivityPerturbation
from fgrad_jax._local import split as _split
from fgrad_jax._local.common import LocalAux, accuracy, column_spec, local_tangent_base
from fgrad_jax._local.heads import apply_head, head_kind, init_head
from fgrad_jax._local.taps import probe_values, stand_in_batch
from fgrad_jax._transform import forward_gradient

Array = jax.Array

LOSSES: dict[str, Callable[[Array, Array], Array]] = {
    "softmax_cross_entropy": optax.softmax_cross_entropy_with_integer_labels,
}


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
        # Set only on the copy that init returns; never changed afterwards.
        self._heads: list[Any] | None = None  # per block: None (none), "default" or a module
        self._layout: list[tuple[tuple[int, ...], int]] | None = None  # (patch grid, groups)
        self._not_separable: dict[int, str] = {}  # block -> why activations can't split it
        self._split_leaves: frozenset[int] = frozenset()  # leaves scored per patch/group
        self._split_paths: tuple[str, ...] = ()

    @property
    def layout(self) -> list[tuple[tuple[int, ...], int]]:
        """Per block, ``(patches per spatial axis, channel groups)``: the split of its loss
        into columns (on the object :meth:`init` returns)."""
        self._check_init()
        assert self._layout is not None
        return list(self._layout)

    def init(self, key: Array, x: Array) -> tuple[dict[str, list[Any]], LocalLosses]:
        """Parameters of the blocks (nnx: the modules' current values) and fresh heads.

        Returns ``(params, local)``: ``local`` is a copy of this object that knows the
        heads and the loss columns for inputs shaped like ``x``; use it for everything
        else (``losses``, ``forward_gradient``, ``predict``). This object is not changed.
        """
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
                        f"{sorted(set(variables) - {'params'})}; a block list supports linen "
                        "blocks with 'params' only. For BatchNorm and other state, pass the "
                        "model class with boundaries= (local_losses(model, num_classes, "
                        "boundaries=BlockClass)), which updates the statistics."
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
        bound = copy.copy(self)
        bound._heads = kinds
        found = self._split_layout(kinds, x, params)
        bound._layout, bound._not_separable, bound._split_leaves = found
        paths = [
            jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        ]
        bound._split_paths = tuple(paths[n] for n in sorted(found[2]))
        return {"blocks": params, "heads": heads}, bound

    def _split_layout(
        self, kinds: list[Any], x: Array, params: list[Any]
    ) -> tuple[list[tuple[tuple[int, ...], int]], dict[int, str], frozenset[int]]:
        """Patch/group layout per block, why a split block cannot be scored per column (per
        block), and which leaves are (indices over all blocks)."""
        layout: list[tuple[tuple[int, ...], int]] = []
        h = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
        for i, block in enumerate(self.blocks):
            h = jax.eval_shape(block.apply, params[i], h)
            head = "none" if kinds[i] is None else "default" if kinds[i] == "default" else "custom"
            grid, g = _split.block_layout(i, h.shape, self.patches, self.groups_per_block, head)
            layout.append((grid, g))
        scalar = self.patches is not None and not isinstance(self.patches, list)
        if scalar and self.patches != 1 and all(int(np.prod(grid)) == 1 for grid, _ in layout):
            raise ValueError(
                f"patches={self.patches!r}: no block has a default head and an output "
                "with spatial axes (B, H, W, C) to split into patches. Use patches=None."
            )
        split_blocks = [i for i, (grid, g) in enumerate(layout) if int(np.prod(grid)) * g > 1]
        if not split_blocks:
            return layout, {}, frozenset()
        leaves, treedef = jax.tree_util.tree_flatten(params)
        block_of_leaf = [i for i, p in enumerate(params) for _ in jax.tree_util.tree_leaves(p)]

        def outputs(flat):
            h, outs = jnp.asarray(stand_in_batch(x)), []
            for block, p in zip(self.blocks, jax.tree_util.tree_unflatten(treedef, flat)):
                h = block.apply(p, jax.lax.stop_gradient(h))
                outs.append(h)
            return outs

        # Concrete stand-ins, evaluated now: init may run under jit/vmap, and the check
        # reads values.
        with jax.ensure_compile_time_eval():
            found = _split.separable_leaves(
                outputs, probe_values(leaves), 4, block_of_leaf, layout, seed=7919
            )
        problems = {}
        for i in split_blocks:
            mine = {n for n, b in enumerate(block_of_leaf) if b == i}
            if not mine & found.perturbed:
                problems[i] = (
                    "has no dense/conv operation on its parameters (patches and groups split "
                    "the outputs of a block's dense/conv operations)"
                )
            elif not mine & found.split:
                problems[i] = (
                    "mixes patches or groups after its dense/conv ops: a change in one patch "
                    "or group of their outputs moves others of the block output (e.g. "
                    "overlapping pooling, a norm over channels)"
                )
        return layout, problems, found.split

    def _head(self, i: int, params: Any, h: Array) -> Array:
        return apply_head(self._check_init()[i], params, h)

    def _check_init(self) -> list[Any]:
        if self._heads is None:
            raise ValueError(
                "This LocalLosses has no heads yet: use the object init returns, "
                "params, local = local.init(key, x)."
            )
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

    def columns(self, params: Any) -> dict[str, list[Any]]:
        """The loss column of every parameter leaf: its block's index, or for a block split
        into patches/groups a :class:`~fgrad_jax._activity.Columns` naming its columns."""
        self._check_init()
        layout = self.layout
        sizes = [len(jax.tree_util.tree_leaves(p)) for p in params["blocks"]]
        offsets = np.cumsum([0, *sizes[:-1]])

        def specs(part: str, i: int, tree: Any) -> Any:
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            split = [
                part == "blocks" and offsets[i] + n in self._split_leaves
                for n in range(len(leaves))
            ]
            return jax.tree_util.tree_unflatten(
                treedef, [column_spec(layout, i, bool(f)) for f in split]
            )

        return {
            part: [specs(part, i, p) for i, p in enumerate(params[part])]
            for part in ("blocks", "heads")
        }

    @property
    def split_params(self) -> tuple[str, ...]:
        """The block parameters (paths like ``[1]['kernel']``: block, then leaf) whose
        dense/conv outputs are scored per patch/group column; a split block's other
        parameters are scored by the block's whole loss (unbiased, without the variance
        reduction)."""
        self._check_init()
        return self._split_paths

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

    def tangent(
        self, perturb: str = "activations", tangent: str = "rademacher"
    ) -> ActivityPerturbation:
        """The tangent strategy: every leaf estimated from its own block's loss column.

        ``perturb="activations"`` perturbs the outputs of each block's (and head's)
        dense/conv ops; ``"weights"`` gives every leaf a weight tangent. Pass it as
        ``tangent=`` to :func:`fgrad_jax.forward_grad` or :func:`fgrad_jax.forward_gradient`.
        """
        base = local_tangent_base(perturb, tangent)
        self._check_init()
        if perturb == "weights":
            return ActivityPerturbation(base, "weights", self.columns)
        self._check_separable()
        return ActivityPerturbation(base, "activations", self.columns)

    def forward_gradient(
        self,
        key: int | Array = 0,
        *,
        num_tangents: int = 1,
        perturb: str = "activations",
        tangent: str = "rademacher",
        tangent_chunk: int | None = None,
        with_aux: bool = False,
        mask: Any = None,
        on_nonfinite: str = "zero",
    ) -> optax.GradientTransformationExtraArgs:
        """:func:`fgrad_jax.forward_gradient` with the local-loss tangents; the state's
        ``value`` is the sum over blocks of the mean local losses. ``tangent_chunk`` is
        :func:`fgrad_jax.forward_gradient`'s (``None``: automatic; ``num_tangents``: all
        tangents in one pass, for accelerators with memory to spare). ``with_aux=True``
        (with ``value_fn(x, y, with_aux=True)``): ``forward_gradient_state(opt_state).aux``
        is the step's :class:`~fgrad_jax.LocalAux` (per-block losses, the model's loss and
        accuracy). ``mask`` (over ``{"blocks": ..., "heads": ...}``, or a callable on it)
        and ``on_nonfinite`` are :func:`fgrad_jax.forward_gradient`'s: frozen leaves get no
        tangents and zero updates."""
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
            mask=mask,
            on_nonfinite=on_nonfinite,
        )

    def update_model(self, params: Any) -> None:
        """Writes the blocks' parameters back into the nnx modules (linen blocks: no-op)."""
        for block, p in zip(self.blocks, params["blocks"]):
            if isinstance(block.layer, nnx.Module):
                nnx.update(block.layer, p)

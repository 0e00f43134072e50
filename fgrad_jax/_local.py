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
from collections.abc import Callable, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fgrad_jax._activity import PERTURB, ActivityPerturbation
from fgrad_jax._flax import split_wrt
from fgrad_jax._tangents import HASHED
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
        if isinstance(self.layer, nn.Module):
            # cast: without mutable=, apply returns the output alone (not (out, state)).
            h = cast(Array, self.layer.apply({"params": params}, h))
        else:
            graphdef, _, rest = split_wrt(self.layer, nnx.Param)
            h = nnx.merge(graphdef, params, rest, copy=True)(h)
        for fn in self.tail:
            h = fn(h)
        return h


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
            "local_losses needs the model as an ordered sequence of blocks: an "
            "nnx.Sequential, an nn.Sequential, or a list of nnx/linen modules and "
            f"parameterless callables; got {type(blocks).__name__}."
        )
    return list(blocks)


def _default_head_init(key: Array, features: int, num_classes: int) -> dict[str, Array]:
    kernel = jax.random.normal(key, (features, num_classes)) / np.sqrt(features)
    return {"kernel": kernel.astype(jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}


def _pool(h: Array) -> Array:
    """Global average over every axis but the batch (first) and the features (last)."""
    if h.ndim == 1:
        return h[:, None]
    return jnp.mean(h, axis=tuple(range(1, h.ndim - 1))) if h.ndim > 2 else h


class LocalLosses:
    """A block sequence trained with block-local losses; made by :func:`local_losses`.

    The parameters (from :meth:`init`) are ``{"blocks": [...], "heads": [...]}``, one entry
    per block (a final block whose output already has shape ``(B, num_classes)`` gets no
    head: its local loss is the model's own loss, and its head entry is ``{}``).
    """

    def __init__(self, blocks, num_classes, loss, head):
        self.blocks = blocks
        self.num_classes = int(num_classes)
        self.loss = loss
        self.head = head
        self._heads: list[Any] | None = None  # per block: None (none), "default" or a module

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
                zeros = jnp.zeros(h_layer.shape, h_layer.dtype)
                p = block.layer.init(keys[2 * i], zeros)["params"]
            else:
                p = nnx.state(block.layer, nnx.Param)
            params.append(p)
            h = jax.eval_shape(block.apply, p, h)
            last = i == len(self.blocks) - 1
            spec = self.head[i] if isinstance(self.head, (list, tuple)) else self.head
            if last and h.shape[1:] == (self.num_classes,) and spec is None:
                kinds.append(None)
                heads.append({})
            elif spec is None:
                kinds.append("default")
                heads.append(
                    _default_head_init(
                        keys[2 * i + 1], h.shape[-1] if h.ndim > 1 else 1, self.num_classes
                    )
                )
            elif isinstance(spec, nn.Module):
                kinds.append(spec)
                heads.append(spec.init(keys[2 * i + 1], jnp.zeros(h.shape, h.dtype))["params"])
            else:
                kinds.append(spec)
                heads.append(nnx.state(spec, nnx.Param))
        self._heads = kinds
        return {"blocks": params, "heads": heads}

    def _head(self, i: int, params: Any, h: Array) -> Array:
        kind = self._check_init()[i]
        if kind is None:
            return h
        if kind == "default":
            return _pool(h) @ params["kernel"] + params["bias"]
        if isinstance(kind, nn.Module):
            return cast(Array, kind.apply({"params": params}, h))
        graphdef, _, rest = split_wrt(kind, nnx.Param)
        return nnx.merge(graphdef, params, rest, copy=True)(h)

    def _check_init(self) -> list[Any]:
        if self._heads is None:
            raise ValueError("Call init(key, x) first: it creates the heads' parameters.")
        return self._heads

    def losses(self, params: Any, x: Array, y: Array) -> Array:
        """Per-example local losses, shape ``(B, L)``: column ``l`` is block ``l``'s loss."""
        self._check_init()
        cols, h = [], x
        for i, block in enumerate(self.blocks):
            h = block.apply(params["blocks"][i], jax.lax.stop_gradient(h))
            cols.append(self.loss(self._head(i, params["heads"][i], h), y))
        return jnp.stack(cols, axis=1)

    def value_fn(self, x: Array, y: Array) -> Callable[[Any], Array]:
        """``value_fn(params) -> (B, L)`` losses, for ``update(..., value_fn=...)``."""
        return lambda params: self.losses(params, x, y)

    def predict(self, params: Any, x: Array) -> Array:
        """Class scores of the last block's head (or of the last block itself)."""
        self._check_init()
        h = x
        for i, block in enumerate(self.blocks):
            h = block.apply(params["blocks"][i], h)
        return self._head(len(self.blocks) - 1, params["heads"][-1], h)

    def groups(self, params: Any) -> dict[str, list[Any]]:
        """The block index of every parameter leaf (the loss column it is estimated from)."""
        return {
            part: [jax.tree.map(lambda _, i=i: i, p) for i, p in enumerate(params[part])]
            for part in ("blocks", "heads")
        }

    def tangent(
        self, perturb: str = "activations", tangent: str = "rademacher"
    ) -> ActivityPerturbation:
        """The tangent strategy: every leaf estimated from its own block's loss column.

        ``perturb="activations"`` perturbs the outputs of each block's (and head's)
        dense/conv ops; ``"weights"`` gives every leaf a weight tangent. Pass it as
        ``tangent=`` to :func:`fgrad_jax.forward_grad` or :func:`fgrad_jax.forward_gradient`.
        """
        if perturb not in PERTURB:
            raise ValueError(f"perturb must be one of {PERTURB}; got {perturb!r}.")
        if tangent not in HASHED:
            raise ValueError(f"tangent must be one of {sorted(HASHED)}; got {tangent!r}.")
        return ActivityPerturbation(HASHED[tangent], perturb == "activations", self.groups)

    def forward_gradient(
        self,
        key: int | Array = 0,
        *,
        num_tangents: int = 1,
        perturb: str = "activations",
        tangent: str = "rademacher",
    ) -> optax.GradientTransformationExtraArgs:
        """:func:`fgrad_jax.forward_gradient` with the local-loss tangents; the state's
        ``value`` is the sum over blocks of the mean local losses."""
        return forward_gradient(
            key, num_tangents=num_tangents, tangent=self.tangent(perturb, tangent)
        )

    def update_model(self, params: Any) -> None:
        """Writes the blocks' parameters back into the nnx modules (linen blocks: no-op)."""
        for block, p in zip(self.blocks, params["blocks"]):
            if isinstance(block.layer, nnx.Module):
                nnx.update(block.layer, p)


def local_losses(
    blocks: Any,
    num_classes: int,
    *,
    loss: str | Callable[[Array, Array], Array] = "softmax_cross_entropy",
    head: Any = None,
) -> LocalLosses:
    """Trains a sequence of blocks with block-local losses and forward gradients.

    Every module with parameters starts a block; parameterless callables (activations,
    pooling, reshapes) and parameterless nnx modules join the block before them (the first
    block if they come first). Each block gets a head mapping its output to class scores
    (default: mean over every axis but the first and last, then a linear layer, created by
    :meth:`LocalLosses.init`); the last block needs none when its output is already
    ``(B, num_classes)``. Heads are trained by forward gradients of their own block's loss
    too: nothing is backpropagated. The user's modules are not modified (nnx modules get
    new values only through :meth:`LocalLosses.update_model`).

    Args:
        blocks: An ``nnx.Sequential``, an ``nn.Sequential`` or a list of nnx modules, linen
            modules (with ``params`` only) and parameterless callables, in order.
        num_classes: Number of classes of the heads' outputs.
        loss: ``"softmax_cross_entropy"`` (integer labels) or ``loss(logits, labels) ->
            (B,)`` per-example losses.
        head: ``None`` (default heads), a linen module used as every block's head (each
            with its own parameters), or a list with one entry per block (``None``, a linen
            module or an nnx module).

    Returns:
        A :class:`LocalLosses`.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import fgrad_jax
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
        >>> x, y = jnp.ones((16, 4)), jnp.zeros(16, jnp.int32)
        >>> local = fgrad_jax.local_losses(model, num_classes=3)
        >>> params = local.init(jax.random.key(0), x)
        >>> tx = optax.chain(local.forward_gradient(key=0), optax.adam(1e-2))
        >>> state = tx.init(params)
        >>> updates, state = tx.update(None, state, params, value_fn=local.value_fn(x, y))
        >>> params = optax.apply_updates(params, updates)
        >>> local.predict(params, x).shape
        (16, 3)
    """
    layers = _layers(blocks)
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
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"Unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable.")
        loss = LOSSES[loss]
    if isinstance(head, (list, tuple)) and len(head) != len(grouped):
        raise ValueError(
            f"head has {len(head)} entries but the model has {len(grouped)} blocks "
            "(one per module with parameters); give one head (or None) per block."
        )
    return LocalLosses(grouped, num_classes, loss, head)

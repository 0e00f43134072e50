"""The one entry point of local losses: :func:`local_losses` (block list or model class)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from fgrad_jax._local import split as _split
from fgrad_jax._local.blocks import automatic_blocks, explicit_block, layer_list
from fgrad_jax._local.model import ModelLocalLosses
from fgrad_jax._local.sequence import LOSSES, LocalLosses

Array = jax.Array


def local_losses(
    blocks: Any,
    num_classes: int,
    *,
    loss: str | Callable[[Array, Array], Array] = "softmax_cross_entropy",
    head: Any = None,
    patches: int | tuple[int, ...] | list[Any] | None = None,
    groups: int | list[int | None] = 1,
    boundaries: Any = None,
    batch_coupling: str = "correct",
) -> LocalLosses | ModelLocalLosses:
    """Trains a sequence of blocks with block-local losses and forward gradients.

    Every module with parameters starts a block; parameterless callables (activations,
    pooling, reshapes) and parameterless nnx modules join the block before them (the first
    block if they come first). To draw the boundaries yourself, pass a list of blocks, each
    a list holding exactly one module with parameters and the callables around it: e.g.
    ``[[conv1, relu, pool], [conv2, relu, pool], [flatten, dense, relu], [dense_out]]`` puts
    the flatten in the dense block, so that the second conv block keeps a spatial output
    that ``patches=`` can split. Each block gets a head mapping its output to class scores
    (default: mean over every axis but the first and last, then a linear layer, created by
    :meth:`LocalLosses.init`, which returns the parameters and a copy of the object that
    knows the heads and loss columns); the last block needs none when its output is already
    ``(B, num_classes)``. Heads are trained by forward gradients of their own block's loss
    too: nothing is backpropagated. The user's modules are not modified (nnx modules get
    new values only through :meth:`LocalLosses.update_model`).

    Args:
        blocks: An ``nnx.Sequential``, an ``nn.Sequential`` or a list of nnx modules, linen
            modules (with ``params`` only) and parameterless callables, in order; or a
            list of such lists, one per block (explicit boundaries, see above).
        num_classes: Number of classes of the heads' outputs.
        loss: ``"softmax_cross_entropy"`` (integer labels) or ``loss(logits, labels) ->
            (B,)`` per-example losses.
        head: ``None`` (default heads), a linen module used as every block's head (each
            with its own parameters), or a list with one entry per block (``None``, a linen
            module or an nnx module).
        patches: Ren et al.'s patch-wise losses: ``None`` (default: one loss per block), an
            int or a tuple (patches per spatial axis) for every block whose output has
            spatial axes and a default head, or a list with one entry per block. Each
            patch gets its own loss column (see ``docs/local_losses.md``).
        boundaries: For a model class (linen or nnx, used unchanged): which submodules'
            outputs end a block: a class, a tuple of classes, a path or list of paths, or a
            predicate ``(path, module) -> bool``. Returns a :class:`ModelLocalLosses`.
        batch_coupling: With ``boundaries``, when BatchNorm in training mode couples the
            examples: ``"correct"`` (default) scores each activity perturbation by the
            whole batch's derivative (unbiased, higher variance); ``"per_example"`` by its
            own example's: lower variance, and an estimate of the gradient with the batch
            statistics held constant (so ``patches=`` pass BatchNorm; see
            ``docs/local_losses.md``).
        groups: Group-wise losses: the channels (last axis) of every block with a default
            head split into this many groups, each with its own loss column; or a list with
            one int per block. Default 1 (no split).

    Returns:
        A :class:`LocalLosses` (a block list) or a :class:`ModelLocalLosses` (a model with
        ``boundaries``); neither changes after construction: ``init`` returns a new,
        initialised copy.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import fgrad_jax
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
        >>> x, y = jnp.ones((16, 4)), jnp.zeros(16, jnp.int32)
        >>> local = fgrad_jax.local_losses(model, num_classes=3)
        >>> params, local = local.init(jax.random.key(0), x)  # local: knows the heads
        >>> tx = optax.chain(local.forward_gradient(key=0), optax.adam(1e-2))
        >>> state = tx.init(params)
        >>> updates, state = tx.update(None, state, params, value_fn=local.value_fn(x, y))
        >>> params = optax.apply_updates(params, updates)
        >>> local.predict(params, x).shape
        (16, 3)

        Patch- and group-wise losses on a conv net (one column per patch and group):

        >>> cnn = nnx.Sequential(nnx.Conv(1, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.relu)
        >>> split = fgrad_jax.local_losses(cnn, num_classes=3, patches=2, groups=4)
        >>> xs = jnp.ones((4, 8, 8, 1))
        >>> p, split = split.init(jax.random.key(0), xs)
        >>> split.layout, split.losses(p, xs, jnp.zeros(4, jnp.int32)).shape
        ([((2, 2), 4)], (4, 16))
    """
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"Unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable.")
        loss = LOSSES[loss]
    if boundaries is None and batch_coupling != "correct":
        raise ValueError(
            "batch_coupling applies to models given with boundaries=; a block list is "
            "scored per example (its blocks must not couple the examples)."
        )
    if boundaries is not None:
        for spec, name in ((patches, "patches"), (groups, "groups")):
            _split.check_spec(spec, name, len(spec) if isinstance(spec, list) else 1)
        return ModelLocalLosses(
            blocks, num_classes, loss, boundaries, batch_coupling, patches, groups, head
        )
    return block_list_losses(blocks, num_classes, loss, head, patches, groups)


def block_list_losses(
    blocks: Any, num_classes: int, loss: Any, head: Any, patches: Any, groups: Any
) -> LocalLosses:
    """:func:`fgrad_jax.local_losses` for a block list (boundaries at the parameterised
    modules, or drawn by nested lists)."""
    layers = layer_list(blocks)
    nested = [isinstance(layer, (list, tuple)) for layer in layers]
    if layers and all(nested):
        grouped = [explicit_block(i, entries) for i, entries in enumerate(layers)]
    elif any(nested):
        raise TypeError(
            "blocks mixes lists and single layers: pass either a flat sequence of layers "
            "(boundaries drawn at every module with parameters) or a list of blocks, each a "
            "list with one module with parameters, e.g. [[conv, relu], [flatten, dense]]."
        )
    else:
        grouped = automatic_blocks(layers)
    if isinstance(head, (list, tuple)) and len(head) != len(grouped):
        raise ValueError(
            f"head has {len(head)} entries but the model has {len(grouped)} blocks "
            "(one per module with parameters); give one head (or None) per block."
        )
    _split.check_spec(patches, "patches", len(grouped))
    _split.check_spec(groups, "groups", len(grouped))
    return LocalLosses(grouped, num_classes, loss, head, patches, groups)

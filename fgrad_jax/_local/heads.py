"""The auxiliary heads of local losses: class scores from a block's output."""

from __future__ import annotations

from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgrad_jax._flax import split_wrt

Array = jax.Array


def default_head_init(key: Array, features: int, num_classes: int) -> dict[str, Array]:
    kernel = jax.random.normal(key, (features, num_classes)) / np.sqrt(features)
    return {"kernel": kernel.astype(jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}


def pool(h: Array) -> Array:
    """Global average over every axis but the batch (first) and the features (last)."""
    if h.ndim == 1:
        return h[:, None]
    return jnp.mean(h, axis=tuple(range(1, h.ndim - 1))) if h.ndim > 2 else h


def init_head(kind: Any, key: Array, h: Any, num_classes: int) -> Any:
    """Parameters of a head: ``kind`` is ``None`` (no head: ``{}``), ``"default"``
    (average pool + linear), a linen module (initialised on ``h``'s shape) or an nnx
    module (its current values)."""
    if kind is None:
        return {}
    if kind == "default":
        return default_head_init(key, h.shape[-1] if len(h.shape) > 1 else 1, num_classes)
    if isinstance(kind, nn.Module):
        return kind.init(key, jnp.zeros(h.shape, h.dtype))["params"]
    return nnx.state(kind, nnx.Param)


def apply_head(kind: Any, params: Any, h: Array) -> Array:
    """Class scores of the head ``kind`` (as in :func:`init_head`) on the block output."""
    if kind is None:
        return h
    if kind == "default":
        return pool(h) @ params["kernel"] + params["bias"]
    if isinstance(kind, nn.Module):
        return cast(Array, kind.apply({"params": params}, h))
    graphdef, _, rest = split_wrt(kind, nnx.Param)
    return nnx.merge(graphdef, params, rest, copy=True)(h)


def head_kind(head: Any, i: int) -> Any:
    """Block ``i``'s entry of ``head=`` (one head for all, or a list): ``"default"`` for None."""
    spec = head[i] if isinstance(head, (list, tuple)) else head
    return "default" if spec is None else spec

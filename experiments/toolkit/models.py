"""The model zoo of the experiments: the paper's 2-D test functions (Fig. 2), a plain-JAX ReLU
MLP (a list of ``{"w", "b"}`` layers, the runtime benchmarks' model), the classification
experiments' Flax linen models (the CNN follows the DSSC-projects/veni reimplementation: the
paper does not print its architecture) and a Flax nnx transformer encoder.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def beale(p: jax.Array) -> jax.Array:
    """Beale's function; minimum 0 at ``(3, 0.5)``."""
    x, y = p[0], p[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def rosenbrock(p: jax.Array) -> jax.Array:
    """Rosenbrock's function ``(1 - x)^2 + 100 (y - x^2)^2``; minimum 0 at ``(1, 1)``."""
    x, y = p[0], p[1]
    return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


FUNCTIONS = {"beale": beale, "rosenbrock": rosenbrock}
MINIMA = {"beale": (3.0, 0.5), "rosenbrock": (1.0, 1.0)}
# Plot windows of the contour figures.
WINDOWS = {"beale": ((-1.0, 4.0), (-1.5, 2.0)), "rosenbrock": ((-2.0, 2.0), (-1.0, 3.0))}


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    """Dense layers with ReLU between them; LeCun-normal kernels, zero biases."""
    pairs = zip(jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes))
    return [
        {"w": jax.random.normal(k, (m, n), jnp.float32) / math.sqrt(m), "b": jnp.zeros(n)}
        for k, (m, n) in pairs
    ]


def mlp_loss(params: list[dict[str, jax.Array]], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean cross-entropy of the plain-JAX MLP on ``batch = (x, labels)``."""
    x, y = batch
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    logp = jax.nn.log_softmax(x @ params[-1]["w"] + params[-1]["b"])
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def synthetic_batch(
    key: jax.Array, batch_size: int, in_shape: Sequence[int], classes: int = 10
) -> tuple[jax.Array, jax.Array]:
    """Standard-normal inputs and uniform labels (timings do not depend on the data)."""
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch_size, *in_shape), jnp.float32)
    y = jax.random.randint(ky, (batch_size,), 0, classes)
    return x, y


class LogReg(nn.Module):
    """Multinomial logistic regression."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """ReLU MLP; ``widths=(1024, 1024)`` gives the paper's 1024-1024-10."""

    widths: tuple[int, ...] = (1024, 1024)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Four 3x3 convolutions (SAME, ReLU), a 2x2 max-pool after every second, dense to the
    classes. Input ``(N, H, W)`` greyscale images; on 28x28 MNIST the dense layer sees
    7x7x``channels`` features, on the 8x8 digits 2x2x``channels``."""

    channels: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x[..., None]  # (N, H, W, 1)
        for i in range(4):
            x = nn.relu(nn.Conv(self.channels, (3, 3), padding="SAME")(x))
            if i % 2 == 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def mlp_problem(sizes: Sequence[int], batch_size: int) -> tuple[Any, tuple[jax.Array, jax.Array]]:
    """``(params, batch)``: the MLP ``sizes`` and a synthetic batch, both from ``key(0)``."""
    kp, kb = jax.random.split(jax.random.key(0))
    return init_mlp(kp, sizes), synthetic_batch(kb, batch_size, (sizes[0],))


def classifier_loss(model: nn.Module):
    """``loss(params, (x, labels))``: cross-entropy of a linen classifier."""

    def loss(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: self-attention, then a 4x-wide GELU MLP."""

    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=width, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x, mask=None):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class Transformer(nnx.Module):
    """``cfg.depth`` blocks of width ``cfg.width`` with ``cfg.heads`` heads, mean-pooled over
    the sequence into a 10-class head. ``cfg`` is any object with those three attributes."""

    def __init__(self, cfg: Any, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg.width, cfg.heads, rngs) for _ in range(cfg.depth)])
        self.head = nnx.Linear(cfg.width, 10, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=1))


def landscape(name: str, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xs, ys, zs)``: the 2-D function ``name`` on an ``n x n`` grid over its plot window."""
    fn = FUNCTIONS[name]
    (x0, x1), (y0, y1) = WINDOWS[name]
    xs, ys = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    grid = jnp.stack([jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)])
    zs = np.asarray(jax.vmap(jax.vmap(fn, in_axes=1), in_axes=2)(grid)).T
    return xs, ys, zs

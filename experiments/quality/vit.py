"""The quality benchmark's ``vit``: a small Vision Transformer (LayerNorm, attention) as a
user writes it, trained unchanged; local losses end a block at every ``EncoderBlock``.

28x28 images in 4x4 patches (49 tokens of width 64, learned position embeddings), four
pre-norm encoder blocks (4 heads, MLP 128), a final LayerNorm, mean over tokens, a dense
classifier. LayerNorm normalises each example by itself, so the examples stay independent
and the activity perturbations are scored per example, unbiasedly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class EncoderBlock(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual connection."""

    width: int = 64
    heads: int = 4
    mlp: int = 128

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x))
        h = nn.Dense(self.width)(nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x))))
        return x + h


class ViT(nn.Module):
    """Patch embedding, ``depth`` encoder blocks, mean over tokens, classifier."""

    num_classes: int
    width: int = 64
    depth: int = 4
    patch: int = 4

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        del train  # no dropout or batch statistics: the same call trains and evaluates
        x = nn.Conv(self.width, (self.patch, self.patch), (self.patch, self.patch))(x)
        x = x.reshape(x.shape[0], -1, self.width)
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        for _ in range(self.depth):
            x = EncoderBlock(self.width)(x)
        return nn.Dense(self.num_classes)(jnp.mean(nn.LayerNorm()(x), axis=1))


# Local-loss variants on the vit, by the method name's infix.
VIT_LOCAL: dict[str, dict] = {"": {"boundaries": EncoderBlock}}

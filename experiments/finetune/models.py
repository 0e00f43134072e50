"""The benchmark's linen models, with optional LoRA adapters on every dense layer.

With ``lora_rank=0`` a model has exactly the parameters of its pretrained checkpoint; with
``lora_rank=r`` every :class:`LoRADense` adds ``lora_a`` (in x r) and ``lora_b`` (r x out,
zeros), so the adapted model starts as the pretrained one. The classifier is named
``head`` in both models.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.finetune.configs import ModelConfig

Array = jax.Array


class LoRADense(nn.Module):
    """``Dense`` (named ``base``) plus a rank-``rank`` adapter ``(x @ lora_a) @ lora_b``."""

    features: int
    rank: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.Dense(self.features, name="base")(x)
        if self.rank:
            a = self.param(
                "lora_a", nn.initializers.normal(x.shape[-1] ** -0.5), (x.shape[-1], self.rank)
            )
            b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
            y = y + (x @ a) @ b
        return y


class CNN(nn.Module):
    """Two 3x3 convolutions (ReLU, 2x2 max-pool each), a hidden dense layer, the head: the
    layout of Flax's MNIST example (the quality benchmark's ``cnn`` at ``features=(32, 64)``,
    ``dense=256``)."""

    cfg: ModelConfig
    lora_rank: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, c in enumerate(self.cfg.features):
            x = nn.relu(nn.Conv(c, (3, 3), padding="SAME", name=f"conv_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(LoRADense(self.cfg.dense, self.lora_rank, name="dense")(x))
        return nn.Dense(10, name="head")(x)


class Block(nn.Module):
    """Pre-norm encoder block; attention projections and MLP are :class:`LoRADense`."""

    cfg: ModelConfig
    lora_rank: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, w = x.shape
        h = self.cfg.heads
        qkv = LoRADense(3 * w, self.lora_rank, name="qkv")(nn.LayerNorm()(x))
        q, k, v = jnp.split(qkv.reshape(b, t, 3 * h, w // h), 3, axis=2)
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(w // h), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, w)
        x = x + LoRADense(w, self.lora_rank, name="out")(o)
        y = nn.gelu(LoRADense(self.cfg.mlp, self.lora_rank, name="mlp_in")(nn.LayerNorm()(x)))
        return x + LoRADense(w, self.lora_rank, name="mlp_out")(y)


class ViT(nn.Module):
    """Patch embedding, learned positions, ``depth`` blocks, final LayerNorm, mean over
    tokens, head (the quality benchmark's ``vit`` layout, attention written out)."""

    cfg: ModelConfig
    lora_rank: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p, w = self.cfg.patch, self.cfg.width
        x = nn.Conv(w, (p, p), (p, p), name="embed")(x)
        x = x.reshape(x.shape[0], -1, w)
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        for i in range(self.cfg.depth):
            x = Block(self.cfg, self.lora_rank, name=f"block_{i}")(x)
        return nn.Dense(10, name="head")(jnp.mean(nn.LayerNorm(name="final_norm")(x), axis=1))


def build(cfg: ModelConfig, lora_rank: int = 0) -> nn.Module:
    """The linen module of ``cfg`` (inputs ``(N, 28, 28, 1)``, 10 logits)."""
    if cfg.name == "cnn":
        return CNN(cfg, lora_rank)
    if cfg.name == "vit":
        return ViT(cfg, lora_rank)
    raise ValueError(f"unknown model {cfg.name!r}")

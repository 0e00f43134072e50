"""Presets of the fine-tuning benchmark, as dataclasses."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model to pretrain and fine-tune.

    Attributes:
        name: ``"cnn"`` or ``"vit"`` (also the prefix of the settings' names).
        features: CNN: channels of the two 3x3 convolutions (each followed by a 2x2 max-pool).
        dense: CNN: width of the hidden dense layer before the head.
        width: ViT: token width.
        depth: ViT: number of encoder blocks.
        heads: ViT: attention heads.
        mlp: ViT: hidden width of each block's MLP.
        patch: ViT: patch size (28x28 images).
    """

    name: str
    features: tuple[int, int] = (32, 64)
    dense: int = 256
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp: int = 128
    patch: int = 4


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """A fine-tuning method.

    Attributes:
        name: Key in ``finetune.json`` (``backprop`` is the full backprop reference; SPSA
            methods start with ``spsa``).
        estimator: ``"backprop"``, ``"fg"`` (forward gradient, Rademacher tangents) or
            ``"spsa"`` (central differences, MeZO).
        trained: ``"full"`` (every parameter), ``"lora"`` (LoRA adapters on every dense
            layer and the head; the rest frozen) or ``"head"`` (the classifier only).
        optimizer: ``"adam"`` or ``"sgd"`` (MeZO's choice: no optimizer state).
        learning_rates: The sweep; the rate with the best validation accuracy is reported.
        samples: Tangents per step (fg) or perturbation samples per step (spsa).
    """

    name: str
    estimator: str
    trained: str
    optimizer: str
    learning_rates: tuple[float, ...]
    samples: int = 1

    def forward_passes_per_step(self) -> int:
        """Forward passes of one step: 1 for backprop (plus its backward pass), K for a
        forward gradient with K tangents (one forward-mode pass per tangent stream, sharing
        one primal), 2n for SPSA with n samples (f(θ+εz) and f(θ−εz))."""
        if self.estimator == "fg":
            return self.samples
        if self.estimator == "spsa":
            return 2 * self.samples
        return 1


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes and budgets of one run.

    Attributes:
        name: Preset name.
        models: Models to pretrain and fine-tune.
        methods: Fine-tuning methods.
        settings: Data regimes: ``"fewshot"`` (``shots`` examples per class) and/or
            ``"full"`` (every training example).
        pretrain_steps: Backprop steps of pretraining on Fashion-MNIST (Adam 1e-3).
        pretrain_batch: Pretraining batch size.
        steps: Fine-tuning steps (the same for every method).
        batch: Fine-tuning batch size (also the batch of the memory measurement).
        eval_every: Steps between evaluations (the accuracy-vs-forward-passes curve).
        shots: Examples per class in the few-shot setting.
        validation: Digits training examples held out to choose the learning rate.
        lora_rank: Rank of the LoRA adapters.
        epsilon: SPSA perturbation size.
        seed: Seed of data order, adapters and tangents.
    """

    name: str
    models: tuple[ModelConfig, ...]
    methods: tuple[MethodConfig, ...]
    settings: tuple[str, ...] = ("fewshot", "full")
    pretrain_steps: int = 1000
    pretrain_batch: int = 128
    steps: int = 300
    batch: int = 32
    eval_every: int = 25
    shots: int = 16
    validation: int = 200
    lora_rank: int = 4
    epsilon: float = 1e-3
    seed: int = 0


def _methods(lrs: dict[str, tuple[float, ...]], fg_k: int, spsa_n: int) -> tuple[MethodConfig, ...]:
    return (
        MethodConfig("backprop", "backprop", "full", "adam", lrs["bp"]),
        MethodConfig("backprop_lora", "backprop", "lora", "adam", lrs["bp_lora"]),
        MethodConfig("fg_full", "fg", "full", "adam", lrs["fg"], fg_k),
        MethodConfig("fg_lora", "fg", "lora", "adam", lrs["fg_lora"], fg_k),
        MethodConfig("fg_head", "fg", "head", "adam", lrs["fg_lora"], fg_k),
        MethodConfig("fg_full_sgd", "fg", "full", "sgd", lrs["spsa"], fg_k),
        MethodConfig("spsa_full", "spsa", "full", "sgd", lrs["spsa"], spsa_n),
        MethodConfig("spsa_lora", "spsa", "lora", "sgd", lrs["spsa_lora"], spsa_n),
    )


_QUICK_LRS = {
    "bp": (3e-4, 1e-3, 3e-3),
    "bp_lora": (3e-3, 1e-2, 3e-2),
    "fg": (3e-5, 1e-4, 3e-4, 1e-3),
    "fg_lora": (3e-3, 1e-2, 3e-2, 1e-1),
    "spsa": (1e-5, 1e-4, 1e-3, 3e-3),
    "spsa_lora": (1e-3, 3e-3, 1e-2, 3e-2),
}

PRESETS: dict[str, Preset] = {
    "test": Preset(
        name="test",
        models=(ModelConfig("cnn", features=(4, 8), dense=16),),
        methods=_methods({k: v[1:2] for k, v in _QUICK_LRS.items()}, fg_k=2, spsa_n=1),
        pretrain_steps=4,
        pretrain_batch=16,
        steps=4,
        batch=8,
        eval_every=2,
        validation=50,
        lora_rank=2,
    ),
    "quick": Preset(
        name="quick",
        models=(
            ModelConfig("cnn", features=(8, 16), dense=64),
            ModelConfig("vit", width=32, depth=2, heads=4, mlp=64, patch=7),
        ),
        methods=_methods(_QUICK_LRS, fg_k=4, spsa_n=2),
        pretrain_steps=300,
        pretrain_batch=64,
        steps=400,
        batch=16,
        eval_every=50,
    ),
    "full": Preset(
        name="full",
        models=(ModelConfig("cnn"), ModelConfig("vit")),
        methods=_methods(
            {k: (v[0] / 3, *v, v[-1] * 3) for k, v in _QUICK_LRS.items()}, fg_k=16, spsa_n=8
        ),
        pretrain_steps=5000,
        steps=2000,
        eval_every=100,
    ),
}

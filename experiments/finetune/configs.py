"""Presets of the fine-tuning benchmark, as dataclasses."""

from __future__ import annotations

import dataclasses
import functools


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
        perturb: ``"weights"`` or ``"activations"`` (fg only: Ren et al.'s activity
            perturbation, tangents at the outputs of the trained dense layers).
        steps_factor: The method's steps as a multiple of the preset's ``steps`` (MeZO
            gives methods without a backward pass many more steps than backprop; the
            comparison stays fair in forward passes, which every record reports).
        local: fg only, ViT only: block-local losses (:func:`fgrad_jax.local_losses` with
            ``boundaries=`` the encoder block): a zero-initialised head on every block's
            output, each block (and its head) estimated from its own loss, the model's head
            from the model's loss; the CNN settings skip the method.
        local_rows: With ``local``, Ren et al.'s patch-wise losses: every block's loss
            split into one per row of the token grid (``28 // patch`` rows; the quick ViT:
            4 rows of 4 tokens). The adapters after attention (``out``, ``mlp_in``,
            ``mlp_out``) are then estimated from their own row's loss; ``qkv``'s, whose
            output attention mixes across rows, from the block's whole loss.
        head_lr: Multiplier of the learning rate on the heads (the model's and the
            block-local ones) when more than the head is trained: head-only methods choose
            rates 10x those of LoRA, and one rate for both starves one of them.
        schedule: ``"constant"`` (MeZO's) or ``"cosine"``: the rate decays from the swept
            value to 0 over the run along a half cosine (long runs, where a constant rate
            leaves the estimate's noise in the last steps).
    """

    name: str
    estimator: str
    trained: str
    optimizer: str
    learning_rates: tuple[float, ...]
    samples: int = 1
    perturb: str = "weights"
    steps_factor: int = 1
    local: bool = False
    local_rows: bool = False
    head_lr: float = 1.0
    schedule: str = "constant"

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
        steps: Fine-tuning steps of a method with ``steps_factor=1`` (backprop).
        batch: Fine-tuning batch size (also the batch of the memory measurement).
        evals: Evaluations along each run (the accuracy-vs-forward-passes curve), every
            ``steps * steps_factor / evals`` steps.
        shots: Examples per class in the few-shot setting.
        validation: Digits training examples held out to choose the learning rate.
        lora_rank: Rank of the LoRA adapters.
        epsilon: SPSA perturbation size.
        head_init: ``"zero"``: every method starts from a fresh zero head for the digits
            (the pretrained head maps to Fashion-MNIST's classes, near or below chance
            on digits); ``"pretrained"`` keeps it.
        seed: Seed of data order, adapters and tangents.
        tangent_chunk: ``tangent_chunk`` of the forward-gradient methods: ``1`` runs the K
            tangents one after another, so the step holds one tangent's copy of the
            activations (the benchmark measures fine-tuning in inference memory; the
            library's default runs all K at once below 1 GiB of intermediates, e.g. the
            ViT's `fg_local_lora_act` at 7.53x a forward pass instead of 2.70x). ``None``:
            the library's default.
    """

    name: str
    models: tuple[ModelConfig, ...]
    methods: tuple[MethodConfig, ...]
    settings: tuple[str, ...] = ("fewshot", "full")
    pretrain_steps: int = 1000
    pretrain_batch: int = 128
    steps: int = 300
    batch: int = 32
    evals: int = 8
    shots: int = 16
    validation: int = 200
    lora_rank: int = 4
    epsilon: float = 1e-3
    head_init: str = "zero"
    seed: int = 0
    tangent_chunk: int | None = 1


def _methods(
    lrs: dict[str, tuple[float, ...]],
    fg_k: int,
    spsa_n: int,
    factor: int,
    full_factor: int,
    extra: bool = False,
) -> tuple[MethodConfig, ...]:
    """The methods of a preset; ``factor`` is the steps factor of the head and LoRA methods
    without a backward pass, ``full_factor`` that of full fine-tuning without one (its
    steps cost the most); each forward-gradient method and its SPSA counterpart get the
    same factor, so they compare at equal forward passes. ``extra`` adds forward-gradient
    full fine-tuning with Adam (weights and activity perturbation), left out of the quick
    preset for time."""
    M = MethodConfig
    # Forward-gradient methods with Adam decay their rate (measured at quick sizes, same
    # grids: +0.9 to +9.2 points in all 14 pairs, engineering log); with plain SGD
    # (fg_full_sgd: -0.3 to -10.6), backprop and SPSA (MeZO's choice) it stays constant.
    F = functools.partial(MethodConfig, schedule="cosine")
    methods = [
        M("backprop", "backprop", "full", "adam", lrs["bp"]),
        M("backprop_lora", "backprop", "lora", "adam", lrs["bp_lora"]),
        # Linear probe: the best a head-only method can reach on the frozen features.
        M("backprop_head", "backprop", "head", "adam", lrs["bp_head"]),
        M("fg_full_sgd", "fg", "full", "sgd", lrs["full_sgd"], fg_k, steps_factor=full_factor),
        F("fg_lora", "fg", "lora", "adam", lrs["fg_lora"], fg_k, steps_factor=factor),
        F("fg_lora_act", "fg", "lora", "adam", lrs["fg_lora"], fg_k, "activations", factor),
        F("fg_head", "fg", "head", "adam", lrs["fg_head"], fg_k, steps_factor=factor),
        F("fg_head_act", "fg", "head", "adam", lrs["fg_head_act"], fg_k, "activations", factor),
        M("spsa_full", "spsa", "full", "sgd", lrs["full_sgd"], spsa_n, steps_factor=full_factor),
        M("spsa_lora", "spsa", "lora", "sgd", lrs["spsa_lora"], spsa_n, steps_factor=factor),
        M("spsa_head", "spsa", "head", "sgd", lrs["spsa_head"], spsa_n, steps_factor=factor),
        # Block-local losses on the ViT (the CNN skips it), one per row of tokens, the
        # heads at 10x the adapters' rate.
        F(
            "fg_local_lora_act",
            "fg",
            "lora",
            "adam",
            lrs["fg_lora"],
            fg_k,
            "activations",
            factor,
            local=True,
            local_rows=True,
            head_lr=10.0,
        ),
    ]
    if extra:
        methods += [
            F("fg_full", "fg", "full", "adam", lrs["fg_full"], fg_k, steps_factor=full_factor),
            F(
                "fg_full_act",
                "fg",
                "full",
                "adam",
                lrs["fg_full"],
                fg_k,
                "activations",
                full_factor,
            ),
        ]
    return tuple(methods)


# Two rates around the best of the zero-head runs at these budgets (engineering log; the
# LoRA rates of the forward gradient one step up since the cosine schedule, 2026-12-05);
# three for the head-only methods, whose steps cost little.
_QUICK_LRS = {
    "bp": (1e-3, 3e-3),
    "bp_lora": (3e-3, 1e-2),
    "bp_head": (1e-2, 3e-2),
    "full_sgd": (3e-4, 1e-3),
    "fg_full": (1e-4, 3e-4),
    "fg_lora": (3e-3, 1e-2),
    "fg_head": (1e-2, 3e-2),
    "fg_head_act": (3e-3, 1e-2, 3e-2),
    "spsa_lora": (1e-3, 3e-3),
    "spsa_head": (1e-3, 3e-3, 1e-2),
}

PRESETS: dict[str, Preset] = {
    "test": Preset(
        name="test",
        models=(ModelConfig("cnn", features=(4, 8), dense=16),),
        methods=_methods({k: v[1:2] for k, v in _QUICK_LRS.items()}, 2, 1, 2, 2, extra=True),
        pretrain_steps=4,
        pretrain_batch=16,
        steps=4,
        batch=8,
        evals=2,
        validation=50,
        lora_rank=2,
    ),
    "quick": Preset(
        name="quick",
        models=(
            ModelConfig("cnn", features=(8, 16), dense=64),
            ModelConfig("vit", width=32, depth=2, heads=4, mlp=64, patch=7),
        ),
        methods=_methods(_QUICK_LRS, fg_k=4, spsa_n=2, factor=4, full_factor=2),
        pretrain_steps=300,
        pretrain_batch=64,
        steps=400,
        batch=16,
        evals=8,
    ),
    "full": Preset(
        name="full",
        models=(ModelConfig("cnn"), ModelConfig("vit")),
        methods=_methods(
            {k: (v[0] / 3, *v, v[-1] * 3) for k, v in _QUICK_LRS.items()},
            fg_k=16,
            spsa_n=8,
            factor=10,
            full_factor=10,
            extra=True,
        ),
        pretrain_steps=5000,
        steps=2000,
        evals=20,
    ),
}

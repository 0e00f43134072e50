"""The quality benchmark's configuration: :class:`QualityConfig` and its presets,
``<preset>.json`` (the fields that differ from the defaults)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from experiments.toolkit import from_dict

# The methods the targets of issue 10 name come first (a --max-minutes budget cuts the last).
ALL_METHODS = (
    "backprop", "fg_normal_k4", "local_a_splitall_k64", "local_a_splitall_k32",
    "local_a_split_k32", "local_a_split_k64", "fg_act_k16",
    "local_a_split_k16", "local_a_k1", "fg_act_k1", "local_w_k1", "spsa_k1", "guided_k1",
    "fg_rademacher_k4", "fg_lowrank_k4", "fg_normal_k1", "fg_rademacher_k1", "fg_lowrank_k1",
    "fg_normal_k16", "fg_rademacher_k16", "fg_lowrank_k16", "local_a_k16", "fg_act_k32",
)  # fmt: skip


@dataclasses.dataclass
class QualityConfig:
    """Configuration of the quality benchmark.

    Attributes:
        preset: Name of the preset the other fields came from.
        out_dir: Output directory.
        data_dir: Directory of the four Fashion-MNIST IDX files (default: the Debian package's).
        models: Models to train: ``mlp`` (784-256-256-10), ``cnn`` (Flax MNIST example),
            ``resnet`` (ResNet-18, ``quality/resnet.py``), ``vit`` (``quality/vit.py``).
        methods: Method names trained on the MLP (see experiments/quality/methods.py).
        cnn_methods: Method names trained on the CNN (``None``: the same as ``methods``).
        resnet_methods: Method names trained on the ResNet (backprop, ``fg_<tangent>_k<K>``,
            ``local_a[_<variant>]_k<K>``, ``local_w_k<K>``, ``local_bp[_<variant>]``). The
            default: backprop, the weight-perturbed recipe, the unbiased local recipe and
            the best local one (a block per residual block, a column per channel and position,
            K = 256).
        epochs: Training epochs of every method.
        sweep_epochs: Epochs of the learning-rate sweep (seed ``seeds[0]``, held-out split).
        batch_size: Minibatch size.
        train_size: Training images of the MLP (``None``: all but the held-out split).
        cnn_train_size: Training images of the CNN (``None``: as ``train_size``).
        resnet_train_size: Training images of the ResNet (``None``: as ``train_size``).
        vit_methods: Method names trained on the ViT (as for the ResNet).
        vit_train_size: Training images of the ViT (``None``: as ``resnet_train_size``).
        val_size: Held-out training images for the sweep (and the cosine batches).
        test_size: Test images (``None``: all 10,000).
        seeds: Seeds of the final runs (vmapped together).
        diag_per_epoch: Cosine-to-true-gradient measurements per epoch (also the number of
            compiled calls per epoch).
        cnn_diag_per_epoch: As ``diag_per_epoch`` for the CNN (``None``: the same).
        diag_batches: Fixed held-out batches the cosine is averaged over.
        eval_batch: Batch size of the accuracy evaluation (must divide the split sizes).
        cnn_scan: Run the CNN's steps in a compiled lax.scan (``False``: a Python loop over a
            compiled step, much faster for convolutions on XLA:CPU; ``None``: a loop on CPU,
            a scan elsewhere).
        max_minutes: Stop starting new (model, method) runs after this many minutes; the
            skipped ones are listed in quality.json and the report.
        lrs: Learning rates of every method's sweep (``None``: the per-family grids,
            ``quality.train.LR_GRIDS``).
        tangents_at_once: Pass ``tangent_chunk=K`` (all K tangents in one pass) instead of
            the library's automatic chunks, which bound memory at the cost of a loop.
        bn_refresh: Before each evaluation of a model with running statistics (the
            ResNet's BatchNorm), re-estimate them at the evaluated weights by this many
            training-mode forward passes over training batches, for every method alike
            (the training state is unchanged; ``test_acc_stale`` keeps the accuracy with
            the statistics as training left them). 0: no refresh.
    """

    preset: str = "quick"
    out_dir: str = "runs/quality_quick"
    data_dir: str | None = None
    models: tuple[str, ...] = ("mlp", "cnn")
    methods: tuple[str, ...] = ALL_METHODS
    cnn_methods: tuple[str, ...] | None = None
    resnet_methods: tuple[str, ...] = (
        "backprop",
        "fg_normal_k4",
        "local_a_k16",
        "local_a_respositions_k256",
    )
    epochs: int = 10
    sweep_epochs: int = 1
    batch_size: int = 128
    train_size: int | None = None
    cnn_train_size: int | None = None
    resnet_train_size: int | None = None
    vit_methods: tuple[str, ...] = ("backprop", "fg_normal_k4", "local_a_k16")
    vit_train_size: int | None = None
    val_size: int = 5000
    test_size: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    diag_per_epoch: int = 4
    cnn_diag_per_epoch: int | None = None
    diag_batches: int = 2
    eval_batch: int = 1000
    cnn_scan: bool | None = True
    max_minutes: float | None = None
    lrs: tuple[float, ...] | None = None
    tangents_at_once: bool = False
    bn_refresh: int = 64


CONFIGS = Path(__file__).parent
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.json"))


def load_preset(preset: str) -> QualityConfig:
    """``configs/<preset>.json``: the fields that differ from :class:`QualityConfig`'s."""
    data = json.loads((CONFIGS / f"{preset}.json").read_text())
    return from_dict(QualityConfig, {"preset": preset, **data})

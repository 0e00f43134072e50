"""Classification experiments (paper Sec. 5): logistic regression, MLP and CNN.

SGD (backprop) vs FGD with batch 64 and ``eta_i = eta_0 exp(-i k)``, ``k = 1e-4``, at a
shared learning rate (the paper's) and each at its own tuned rate; R_f, R_b and memory;
T_f/T_b to a common loss threshold.

Models (Flax linen):

* ``logreg``: multinomial logistic regression, one dense layer to 10 classes.
* ``mlp``: 1024-1024-10 with ReLU (the paper's "MLP with 1024-1024-10 units").
* ``cnn``: the paper says only that it uses a convolutional network on MNIST; we assume
  the architecture of the DSSC-projects/veni reimplementation: four 3x3 convolutions with
  64 channels and ReLU (SAME padding), a 2x2 max-pool after every second convolution, then
  one dense layer to 10 classes. On 28x28 MNIST the dense layer sees 7x7x64 features; on
  the 8x8 digits of the quick preset, 2x2x64.

Batches are drawn with replacement, ``sample i = randint(fold_in(data_key, step))``, so a
run is a pure function of its seed (exact resume, identical batches for FGD and SGD).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from toolkit import (
    CNN,
    MLP,
    Arm,
    LogReg,
    add_estimates,
    add_overrides,
    apply_overrides,
    classifier_loss,
    environment,
    format_entry,
    measure_runtime,
    num_params,
    pick_tuned,
    summarise_pair,
    time_per_iter,
    to_jsonable,
    train_arms,
    write_json,
)

from fgrad_jax import datasets


@dataclasses.dataclass
class ClassifyConfig:
    """Configuration of one classification experiment.

    Attributes:
        name: ``"logreg"``, ``"mlp"`` or ``"cnn"``.
        dataset: ``"digits"`` (scikit-learn, offline), ``"mnist"`` or ``"fashion_mnist"``.
        data_dir: Directory of IDX files (MNIST: default cache; see fgrad_jax.datasets).
        lrs: Shared learning rates, each compared FGD vs SGD (paper: logreg 1e-4, MLP 2e-5
            and 2e-4).
        steps: Iterations (paper: logreg 25,000, MLP 20,000).
        batch: Minibatch size (64, from the reimplementations).
        decay_k: ``k`` of ``eta_i = eta_0 exp(-i k)`` (1e-4).
        seeds: Runs per arm (paper: 5), vmapped as one program.
        width: Hidden width of the MLP.
        channels: Channels of the CNN.
        chunk: Iterations per timed chunk.
        log_every: Steps per JSONL record.
        smooth_window: Moving-average window of the loss curves.
        tune_factors: Multipliers of ``lrs[0]`` swept per method.
        tune_seeds: Seeds per swept learning rate.
        tune_steps: Iterations of the sweep runs (0: ``steps``).
        runtime_rounds: Rounds of the R_f/R_b measurement.
        checkpoint_every: Checkpoint every this many chunks (0: no checkpoints).
        run_axis: ``"vmap"`` (seeds as one vectorised program) or ``"map"`` (a
            ``lax.map`` loop in one program).
        scan: Whether a chunk is one ``lax.scan`` (fast for dense models) or a Python loop
            over one compiled step. ``None`` (auto): a Python loop for the CNN on CPU,
            because XLA:CPU runs convolution backward passes inside loops far slower than
            outside (docs/engineering_log.md); ``lax.scan`` otherwise.
        tangent: FGD's tangent distribution (``"normal"``: the paper's; see
            ``fgrad_jax.TANGENT_NAMES``).
        seed: Base seed.
    """

    name: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    lrs: tuple[float, ...] = (2e-5, 2e-4)
    steps: int = 20000
    batch: int = 64
    decay_k: float = 1e-4
    seeds: int = 5
    width: int = 1024
    channels: int = 64
    chunk: int = 500
    log_every: int = 50
    smooth_window: int = 200
    tune_factors: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    tune_seeds: int = 2
    tune_steps: int = 0
    runtime_rounds: int = 15
    checkpoint_every: int = 4
    run_axis: str = "vmap"
    scan: bool | None = None
    tangent: str = "normal"
    seed: int = 0


_PAPER = dict(
    dataset="mnist",
    seeds=5,
    chunk=500,
    log_every=50,
    smooth_window=500,
    tune_factors=(1.0, 10.0, 100.0, 1000.0),
    tune_steps=10000,
)
PRESETS: dict[str, dict[str, ClassifyConfig]] = {
    # The paper's settings on MNIST (steps, lrs, batch, decay, seeds). CNN: steps and lr
    # are not retrieved from the paper; we use the MLP's.
    "paper": {
        "logreg": ClassifyConfig("logreg", lrs=(1e-4,), steps=25000, **_PAPER),
        "mlp": ClassifyConfig("mlp", lrs=(2e-5, 2e-4), steps=20000, **_PAPER),
        "cnn": ClassifyConfig("cnn", lrs=(2e-4,), steps=20000, **_PAPER),
    },
    # Small and offline: the 8x8 digits on 2 CPU cores. Same models (MLP 1024-1024-10,
    # CNN with 64 channels), fewer steps and seeds. Shared rates: logreg 1e-2 and CNN 1e-3
    # (the paper's barely move the loss in a few hundred steps), MLP the paper's 2e-4
    # (FGD diverges on this MLP at 2e-3). See docs/reproducing.md.
    "quick": {
        "logreg": ClassifyConfig(
            "logreg",
            "digits",
            lrs=(1e-2,),
            steps=2000,
            seeds=3,
            chunk=250,
            log_every=10,
            smooth_window=100,
            tune_factors=(0.1, 1.0, 10.0, 30.0),
            tune_seeds=2,
            runtime_rounds=15,
            checkpoint_every=2,
        ),
        "mlp": ClassifyConfig(
            "mlp",
            "digits",
            lrs=(2e-4,),
            steps=600,
            seeds=2,
            chunk=100,
            log_every=10,
            smooth_window=50,
            tune_factors=(0.1, 1.0, 10.0, 100.0),
            tune_seeds=1,
            tune_steps=300,
            runtime_rounds=10,
            checkpoint_every=2,
        ),
        "cnn": ClassifyConfig(
            "cnn",
            "digits",
            lrs=(1e-3,),
            steps=200,
            seeds=2,
            chunk=50,
            log_every=5,
            smooth_window=30,
            tune_factors=(0.2, 2.0, 20.0),
            tune_seeds=1,
            tune_steps=100,
            runtime_rounds=8,
            checkpoint_every=2,
            run_axis="vmap",
        ),
    },
    # Tiny: for the tests.
    "test": {
        "logreg": ClassifyConfig(
            "logreg",
            "digits",
            lrs=(3e-2,),
            steps=100,
            seeds=2,
            chunk=50,
            log_every=10,
            smooth_window=20,
            tune_factors=(1.0, 3.0),
            tune_seeds=1,
            runtime_rounds=2,
            checkpoint_every=1,
        ),
        "mlp": ClassifyConfig(
            "mlp",
            "digits",
            lrs=(2e-2,),
            steps=40,
            seeds=2,
            width=64,
            chunk=20,
            log_every=5,
            smooth_window=10,
            tune_factors=(1.0, 3.0),
            tune_seeds=1,
            runtime_rounds=2,
            checkpoint_every=0,
        ),
        "cnn": ClassifyConfig(
            "cnn",
            "digits",
            lrs=(2e-2,),
            steps=40,
            seeds=2,
            channels=8,
            chunk=10,
            log_every=5,
            smooth_window=5,
            run_axis="vmap",
            tune_factors=(1.0, 3.0),
            tune_seeds=1,
            runtime_rounds=2,
            checkpoint_every=0,
        ),
    },
}


def load_data(cfg: ClassifyConfig) -> datasets.Dataset:
    """Loads the configured data set."""
    if cfg.dataset == "digits":
        return datasets.load_digits()
    if cfg.dataset == "mnist":
        return datasets.load_mnist(cfg.data_dir)
    if cfg.dataset == "fashion_mnist":
        return datasets.load_fashion_mnist(cfg.data_dir)
    return datasets.load_idx_dataset(cfg.dataset)


def make_model(cfg: ClassifyConfig, num_classes: int) -> nn.Module:
    """The configured Flax model."""
    if cfg.name == "logreg":
        return LogReg(num_classes)
    if cfg.name == "mlp":
        return MLP((cfg.width, cfg.width), num_classes)
    if cfg.name == "cnn":
        return CNN(cfg.channels, num_classes)
    raise ValueError(f"unknown model {cfg.name!r}")


def make_problem(cfg: ClassifyConfig, data: datasets.Dataset):
    """Returns ``(loss_fn, init_params, sample_batch, model)`` for :func:`toolkit.train_arms`."""
    model = make_model(cfg, data.num_classes)
    x = jnp.asarray(data.train_images)
    y = jnp.asarray(data.train_labels)
    n = x.shape[0]

    loss_fn = classifier_loss(model)

    def init_params(key):
        return model.init(key, x[:1])

    def sample_batch(key):
        idx = jax.random.randint(key, (cfg.batch,), 0, n)
        return x[idx], y[idx]

    return loss_fn, init_params, sample_batch, model


def _accuracy(model, params_stacked, images, labels, batch: int = 1000) -> list[float]:
    """Test accuracy of each run; the test set goes through in batches, since the CNN's
    activations for 10,000 28x28 images and every run at once exceed a small host's memory."""

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(0, None, None))
    def correct(p, x, y):
        return (model.apply(p, x).argmax(-1) == y).sum()

    hits = 0
    for i in range(0, len(labels), batch):
        x, y = jnp.asarray(images[i : i + batch]), jnp.asarray(labels[i : i + batch])
        hits = hits + np.asarray(correct(params_stacked, x, y))
    # In float32, as the mean of a boolean array on the device was (same numbers as before).
    return [float(np.float32(h) / np.float32(len(labels))) for h in hits]


def use_scan(cfg: ClassifyConfig) -> bool:
    """Resolves ``cfg.scan`` (``None``: no ``lax.scan`` for the CNN on CPU)."""
    if cfg.scan is not None:
        return bool(cfg.scan)
    return not (cfg.name == "cnn" and jax.default_backend() == "cpu")


def config_hash(cfg: ClassifyConfig) -> str:
    """Short hash of the configuration (checkpoints of another config are never reused)."""
    return hashlib.sha256(json.dumps(to_jsonable(cfg), sort_keys=True).encode()).hexdigest()[:10]


def run(
    cfg: ClassifyConfig,
    out: str | Path,
    progress: bool = True,
    checkpoint_root: str | Path | None = None,
    stop_after_chunks: int | None = None,
):
    """Runs one classification experiment.

    Args:
        cfg: The configuration.
        out: Output directory (JSONL under ``out/runs/<name>/``).
        progress: Show progress bars.
        checkpoint_root: Where orbax checkpoints go (default ``out/checkpoints``); the
            subdirectory is named by the config's hash, so a rerun resumes.
        stop_after_chunks: Simulate an interruption after this many chunks of the shared
            comparison (returns ``None``); for testing resume.

    Returns:
        The experiment's entry of ``results.json`` (or ``None`` when stopped).
    """
    t_start = time.perf_counter()
    out = Path(out)
    run_dir = out / "runs" / cfg.name
    data = load_data(cfg)
    loss_fn, init_params, sample_batch, model = make_problem(cfg, data)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    arms = []
    for lr in cfg.lrs:
        tag = f"_lr{lr:g}" if len(cfg.lrs) > 1 else ""
        arms += [
            Arm(f"fgd{tag}", "fgd", [lr] * cfg.seeds, seeds),
            Arm(f"sgd{tag}", "sgd", [lr] * cfg.seeds, seeds),
        ]
    ckpt = None
    if cfg.checkpoint_every:
        root = Path(checkpoint_root) if checkpoint_root is not None else out / "checkpoints"
        ckpt = root / f"{cfg.name}-{config_hash(cfg)}"
    res = train_arms(
        arms,
        loss_fn,
        init_params,
        sample_batch,
        num_steps=cfg.steps,
        decay_k=cfg.decay_k,
        chunk=cfg.chunk,
        log_every=cfg.log_every,
        out_dir=run_dir,
        checkpoint_dir=ckpt,
        checkpoint_every=max(1, cfg.checkpoint_every),
        progress=progress,
        stop_after_chunks=stop_after_chunks,
        desc=f"{cfg.name} shared lr",
        run_axis=cfg.run_axis,
        scan=use_scan(cfg),
        tangent=cfg.tangent,
    )
    if res is None:
        return None

    key = jax.random.key(cfg.seed)
    params1 = init_params(key)
    batch1 = sample_batch(jax.random.fold_in(key, 7))
    rt = measure_runtime(
        loss_fn,
        params1,
        batch1,
        lr=cfg.lrs[0],
        decay_k=cfg.decay_k,
        rounds=cfg.runtime_rounds,
        seed=cfg.seed,
        tangent=cfg.tangent,
    )
    per_iter = time_per_iter(rt)

    shared = []
    for lr in cfg.lrs:
        tag = f"_lr{lr:g}" if len(cfg.lrs) > 1 else ""
        s = summarise_pair(res[f"fgd{tag}"], res[f"sgd{tag}"], cfg.smooth_window)
        s["lr"] = lr
        add_estimates(s, per_iter)
        for m in ("fgd", "sgd"):
            s[f"test_accuracy_{m}"] = float(
                np.mean(
                    _accuracy(model, res[f"{m}{tag}"].params, data.test_images, data.test_labels)
                )
            )
        shared.append(s)

    tuned = tune(cfg, loss_fn, init_params, sample_batch, run_dir, progress, per_iter)
    first = shared[0]
    return {
        "R_f": rt["R_f"],
        "R_b": rt["R_b"],
        "fg_over_bp": rt["fg_over_bp"],
        "paired_ratio": rt["paired_ratio"],
        "T_f": first["T_f"],
        "T_b": first["T_b"],
        "T_ratio": first["T_ratio"],
        "initial_loss": first["initial_loss"],
        "final_loss_fgd": first["final_loss_fgd"],
        "final_loss_sgd": first["final_loss_sgd"],
        "shared_lr": shared,
        "tuned": tuned,
        "runtime": rt,
        "num_params": num_params(params1),
        "dataset": {
            "name": data.name,
            "train": int(data.train_images.shape[0]),
            "test": int(data.test_images.shape[0]),
            "image_shape": list(data.train_images.shape[1:]),
        },
        "model": repr(model),
        "scan": use_scan(cfg),
        "wall_time_s": time.perf_counter() - t_start,
        "config": to_jsonable(cfg),
    }


def tune(cfg, loss_fn, init_params, sample_batch, run_dir, progress, per_iter) -> dict:
    """Per-method learning-rate sweep (lrs x seeds vmapped as one program per method)."""
    lrs = [cfg.lrs[0] * f for f in cfg.tune_factors]
    steps = cfg.tune_steps or cfg.steps
    grid_lrs = [lr for lr in lrs for _ in range(cfg.tune_seeds)]
    grid_seeds = [cfg.seed + 1000 + r for _ in lrs for r in range(cfg.tune_seeds)]
    res = train_arms(
        [
            Arm("tune_fgd", "fgd", grid_lrs, grid_seeds),
            Arm("tune_sgd", "sgd", grid_lrs, grid_seeds),
        ],
        loss_fn,
        init_params,
        sample_batch,
        num_steps=steps,
        decay_k=cfg.decay_k,
        chunk=min(cfg.chunk, steps),
        log_every=cfg.log_every,
        out_dir=run_dir,
        progress=progress,
        desc=f"{cfg.name} lr sweep",
        run_axis=cfg.run_axis,
        scan=use_scan(cfg),
        tangent=cfg.tangent,
    )
    t = pick_tuned(res, lrs, cfg.tune_seeds, cfg.smooth_window, per_iter)
    t["steps"] = steps
    return t


def fit_steps(cfg: ClassifyConfig) -> ClassifyConfig:
    """After ``steps`` was overridden: a chunk that divides it, a sweep no longer than it."""
    return dataclasses.replace(
        cfg,
        chunk=math.gcd(cfg.chunk, cfg.steps),
        tune_steps=min(cfg.tune_steps or cfg.steps, cfg.steps),
    )


def main(name: str, argv=None) -> dict | None:
    """Command line of ``experiments/<logreg|mlp|cnn>.py``."""
    p = argparse.ArgumentParser(description=f"{name}: SGD vs FGD (Baydin et al. 2022, Sec. 5)")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--out", default=f"out/{name}")
    add_overrides(p, ClassifyConfig, ["dataset", "data_dir", "lrs", "steps", "seeds", "tangent"])
    p.add_argument("--checkpoint-root", help="orbax checkpoint root (default OUT/checkpoints)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = apply_overrides(PRESETS[a.preset][name], a)
    if a.steps:
        cfg = fit_steps(cfg)
    entry = run(cfg, a.out, progress=not a.no_progress, checkpoint_root=a.checkpoint_root)
    write_json(
        Path(a.out) / f"{name}.json",
        {"experiments": {name: entry}, "environment": environment(cfg)},
    )
    from toolkit.plots import plot_loss

    plot_loss(Path(a.out), name, entry)
    print(format_entry(name, entry))
    return entry

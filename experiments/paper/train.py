"""The paper's experiments (Baydin et al. 2022): what each one trains and measures.

Beale and Rosenbrock (Fig. 2: FGD vs gradient descent from a fixed start point, runs
differing only in tangents); classification (Sec. 5: logistic regression, the MLP
1024-1024-10 and a CNN, SGD vs FGD with ``eta_i = eta_0 exp(-i k)`` at a shared rate and each
at its own tuned rate); depth scaling (Fig. 6: R_f, R_b and memory of an MLP vs its depth).
What is measured and how: docs/reproducing.md. Every experiment trains with the one loop of
:func:`experiments.toolkit.train.train_arms`; the presets are ``configs/<preset>.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.toolkit import (
    CNN,
    FUNCTIONS,
    MINIMA,
    MLP,
    Arm,
    LogReg,
    add_estimates,
    classifier_loss,
    landscape,
    measure_runtime,
    num_params,
    pick_tuned,
    summarise_pair,
    time_per_iter,
    to_jsonable,
    train_arms,
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
        chunk, log_every: Iterations per timed chunk, steps per JSONL record.
        smooth_window: Moving-average window of the loss curves.
        tune_factors: Multipliers of ``lrs[0]`` swept per method.
        tune_seeds, tune_steps: Seeds per swept rate, iterations of the sweep (0: ``steps``).
        runtime_rounds: Rounds of the R_f/R_b measurement.
        checkpoint_every: Checkpoint every this many chunks (0: no checkpoints).
        run_axis: ``"vmap"`` or ``"map"`` (see :func:`toolkit.train_arms`).
        scan: A chunk as one ``lax.scan`` or, ``False``, a Python loop over one compiled
            step; ``None``: a loop for the CNN on CPU, where XLA:CPU runs convolution
            backward passes inside loops far slower (docs/engineering_log.md).
        tangent: FGD's tangent distribution (``"normal"``: the paper's).
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


def load_data(cfg: ClassifyConfig) -> datasets.Dataset:
    """Loads the configured data set."""
    if cfg.dataset == "digits":
        return datasets.load_digits()
    if cfg.dataset == "mnist":
        return datasets.load_mnist(cfg.data_dir)
    if cfg.dataset == "fashion_mnist":
        return datasets.load_fashion_mnist(cfg.data_dir)
    return datasets.load_idx_dataset(cfg.dataset)


def make_problem(cfg: ClassifyConfig, data: datasets.Dataset):
    """Returns ``(loss_fn, init_params, sample_batch, model)`` for :func:`toolkit.train_arms`."""
    k = data.num_classes
    models = {"logreg": LogReg(k), "mlp": MLP((cfg.width,) * 2, k), "cnn": CNN(cfg.channels, k)}
    if cfg.name not in models:
        raise ValueError(f"unknown model {cfg.name!r}")
    model = models[cfg.name]
    x, y = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)

    def sample_batch(key):
        idx = jax.random.randint(key, (cfg.batch,), 0, x.shape[0])
        return x[idx], y[idx]

    return classifier_loss(model), (lambda key: model.init(key, x[:1])), sample_batch, model


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


def _runtime(cfg, loss_fn, params, batch, lr, **kw) -> dict:
    """R_f, R_b and memory of the experiment's own step (:func:`toolkit.measure_runtime`)."""
    kw |= {"rounds": cfg.runtime_rounds, "seed": cfg.seed, "tangent": cfg.tangent}
    return measure_runtime(loss_fn, params, batch, lr=lr, **kw)


def _shared_arms(lrs, seeds) -> list[Arm]:
    """FGD and SGD at each shared learning rate (named by the rate when there are several)."""
    return [
        Arm(f"{m}{f'_lr{lr:g}' if len(lrs) > 1 else ''}", m, [lr] * len(seeds), seeds)
        for lr in lrs
        for m in ("fgd", "sgd")
    ]


def _headline(rt: dict, first: dict) -> dict:
    """The entry's summary: the runtime ratios and the first shared-rate comparison."""
    return {
        **{k: rt[k] for k in ("R_f", "R_b", "fg_over_bp", "paired_ratio")},
        **{k: first[k] for k in ("T_f", "T_b", "T_ratio", "initial_loss")},
        **{k: first[k] for k in ("final_loss_fgd", "final_loss_sgd")},
    }


def tune(cfg, base_lr, runs, problem, smooth_window, per_iter, **kw) -> dict:
    """Per-method learning-rate sweep (rates x ``runs`` seeds vmapped as one program per
    method, ``kw`` for :func:`toolkit.train_arms`); compares each method at its own best rate
    (:func:`toolkit.pick_tuned`)."""
    lrs = [base_lr * f for f in cfg.tune_factors]
    grid_lrs = [lr for lr in lrs for _ in range(runs)]
    grid_seeds = [cfg.seed + 1000 + r for _ in lrs for r in range(runs)]
    arms = [Arm(f"tune_{m}", m, grid_lrs, grid_seeds) for m in ("fgd", "sgd")]
    res = train_arms(arms, *problem, desc=f"{cfg.name} lr sweep", **kw)
    return pick_tuned(res, lrs, runs, smooth_window, per_iter)


def run(cfg: ClassifyConfig, out: str | Path, progress: bool = True) -> dict:
    """Runs one classification experiment; returns its entry of ``results.json``.

    JSONL goes under ``out/runs/<name>/``, orbax checkpoints under ``out/checkpoints`` in a
    directory named by the config's hash, so a rerun resumes.
    """
    t_start = time.perf_counter()
    out = Path(out)
    run_dir = out / "runs" / cfg.name
    data = load_data(cfg)
    loss_fn, init_params, sample_batch, model = make_problem(cfg, data)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    ckpt = None
    if cfg.checkpoint_every:
        # Named by the config's hash: checkpoints of another config are never reused.
        digest = hashlib.sha256(json.dumps(to_jsonable(cfg), sort_keys=True).encode()).hexdigest()
        ckpt = out / "checkpoints" / f"{cfg.name}-{digest[:10]}"
    problem = (loss_fn, init_params, sample_batch)
    kw = {"decay_k": cfg.decay_k, "log_every": cfg.log_every, "out_dir": run_dir}
    kw |= {"progress": progress, "tangent": cfg.tangent, "run_axis": cfg.run_axis}
    kw["scan"] = use_scan(cfg)
    first = {"num_steps": cfg.steps, "chunk": cfg.chunk, "checkpoint_dir": ckpt}
    first["checkpoint_every"] = max(1, cfg.checkpoint_every)
    arms, desc = _shared_arms(cfg.lrs, seeds), f"{cfg.name} shared lr"
    res = train_arms(arms, *problem, desc=desc, **first, **kw)

    key = jax.random.key(cfg.seed)
    params1 = init_params(key)
    batch1 = sample_batch(jax.random.fold_in(key, 7))
    rt = _runtime(cfg, loss_fn, params1, batch1, cfg.lrs[0], decay_k=cfg.decay_k)
    per_iter = time_per_iter(rt)

    shared = []
    for lr in cfg.lrs:
        tag = f"_lr{lr:g}" if len(cfg.lrs) > 1 else ""
        s = summarise_pair(res[f"fgd{tag}"], res[f"sgd{tag}"], cfg.smooth_window)
        s["lr"] = lr
        add_estimates(s, per_iter)
        for m in ("fgd", "sgd"):
            acc = _accuracy(model, res[f"{m}{tag}"].params, data.test_images, data.test_labels)
            s[f"test_accuracy_{m}"] = float(np.mean(acc))
        shared.append(s)

    steps = cfg.tune_steps or cfg.steps
    kw |= {"num_steps": steps, "chunk": min(cfg.chunk, steps)}
    tuned = tune(cfg, cfg.lrs[0], cfg.tune_seeds, problem, cfg.smooth_window, per_iter, **kw)
    tuned["steps"] = steps
    shape = data.train_images.shape
    dataset = {"name": data.name, "train": int(shape[0]), "test": int(data.test_images.shape[0])}
    dataset["image_shape"] = list(shape[1:])
    return {
        **_headline(rt, shared[0]),
        "shared_lr": shared,
        "tuned": tuned,
        "runtime": rt,
        "num_params": num_params(params1),
        "dataset": dataset,
        "model": repr(model),
        "scan": use_scan(cfg),
        "wall_time_s": time.perf_counter() - t_start,
        "config": to_jsonable(cfg),
    }


@dataclasses.dataclass
class FunctionConfig:
    """Configuration of a Beale or Rosenbrock experiment.

    Attributes:
        name: ``"beale"`` or ``"rosenbrock"``.
        lr: Shared learning rate (paper: Beale 0.01, Rosenbrock 5e-4).
        steps: Iterations (paper: 1,000 and 25,000).
        runs: Number of runs (paper: 10), vmapped; GD is deterministic, so its runs are
            identical and only FGD's differ.
        start: Starting point (assumed; the paper does not state it).
        decay_k: Learning-rate decay ``k`` (0: constant, as in the paper's Fig. 2).
        chunk, log_every, tune_factors, runtime_rounds, tangent, seed: As in
            :class:`ClassifyConfig`.
        tune_runs: Runs per learning rate in the sweep.
    """

    name: str = "beale"
    lr: float = 0.01
    steps: int = 1000
    runs: int = 10
    start: tuple[float, float] = (1.0, 1.0)
    decay_k: float = 0.0
    chunk: int = 100
    log_every: int = 1
    tune_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    tune_runs: int = 5
    runtime_rounds: int = 15
    tangent: str = "normal"
    seed: int = 0


def _problem(cfg: FunctionConfig):
    """``(loss_fn, init_params, None)``: the function from the fixed start point, no batches."""
    fn, start = FUNCTIONS[cfg.name], jnp.asarray(cfg.start, jnp.float32)
    return (lambda p, batch: fn(p)), (lambda key: start), None


def run_function(cfg: FunctionConfig, out: str | Path, progress: bool = True) -> dict:
    """Runs one 2-D experiment (shared-rate comparison, tuned comparison, runtime ratios);
    JSONL goes to ``out/runs/<name>/``. Returns the experiment's entry of ``results.json``."""
    run_dir = Path(out) / "runs" / cfg.name
    problem = _problem(cfg)
    t0 = time.perf_counter()
    kw = {"num_steps": cfg.steps, "decay_k": cfg.decay_k, "chunk": cfg.chunk, "out_dir": run_dir}
    kw |= {"progress": progress, "tangent": cfg.tangent}
    arms = _shared_arms([cfg.lr], [cfg.seed + i for i in range(cfg.runs)])
    desc = f"{cfg.name} shared lr"
    res = train_arms(arms, *problem, log_every=cfg.log_every, record_params=True, desc=desc, **kw)
    xs, ys, zs = landscape(cfg.name)
    np.savez(run_dir / "landscape.npz", xs=xs, ys=ys, zs=zs)
    shared = summarise_pair(res["fgd"], res["sgd"], smooth_window=1)
    shared["lr"] = cfg.lr
    final_points = {m: np.asarray(res[m].traj[:, -1]).tolist() for m in ("fgd", "sgd")}
    rt = _runtime(cfg, problem[0], problem[1](None), None, cfg.lr, decay_k=cfg.decay_k)
    per_iter = time_per_iter(rt)
    add_estimates(shared, per_iter)
    tuned = tune(
        cfg, cfg.lr, cfg.tune_runs, problem, 1, per_iter, log_every=cfg.steps // 10 or 1, **kw
    )
    return {
        **_headline(rt, shared),
        "shared_lr": [shared],
        "tuned": tuned,
        "runtime": rt,
        "final_points": final_points,
        "minimum": MINIMA[cfg.name],
        "num_params": 2,
        "wall_time_s": time.perf_counter() - t0,
        "config": to_jsonable(cfg),
    }


@dataclasses.dataclass
class DepthConfig:
    """Configuration of the depth-scaling experiment.

    Attributes:
        width: Hidden width (paper: 1024).
        depths: Numbers of hidden layers (paper: 1 to 100).
        batch: Batch size.
        in_dim: Input features (784 = MNIST).
        num_classes: Output classes.
        lr: Learning rate of the timed steps (irrelevant to the timing).
        runtime_rounds, tangent, seed: As in :class:`ClassifyConfig`.
    """

    width: int = 1024
    depths: tuple[int, ...] = (1, 2, 5, 10, 20, 40, 60, 80, 100)
    batch: int = 64
    in_dim: int = 784
    num_classes: int = 10
    lr: float = 2e-5
    runtime_rounds: int = 15
    tangent: str = "normal"
    seed: int = 0


def run_depth(cfg: DepthConfig, progress: bool = True) -> dict:
    """Measures every depth; returns ``{"rows": [...], "config": ...}``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    key = jax.random.key(cfg.seed)
    kx, ky, kp = jax.random.split(key, 3)
    x = jax.random.uniform(kx, (cfg.batch, cfg.in_dim), jnp.float32)
    y = jax.random.randint(ky, (cfg.batch,), 0, cfg.num_classes)
    rows = []
    for depth in tqdm(cfg.depths, desc="depth", disable=not progress, leave=False):
        model = MLP((cfg.width,) * depth, cfg.num_classes)
        params = model.init(kp, x)
        rt = _runtime(cfg, classifier_loss(model), params, (x, y), cfg.lr)
        rows.append({"depth": depth, "num_params": num_params(params), **rt})
    return {"rows": rows, "config": to_jsonable(cfg), "wall_time_s": time.perf_counter() - t0}

"""Data, pretraining (checkpointed with orbax), fine-tuning loops and step memory."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp  # type: ignore[import-untyped]
from flax.traverse_util import flatten_dict, unflatten_dict

import fgrad_jax
from experiments.finetune import models
from experiments.finetune.configs import MethodConfig, ModelConfig, Preset

Array = jax.Array
Params = Any


def xent(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --------------------------------------------------------------------------- data


def fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(x_train, y_train, x_test, y_test)``, images ``(N, 28, 28, 1)``."""
    ds = fgrad_jax.datasets.load_fashion_mnist(channel_axis=True)
    return ds.train_images, ds.train_labels, ds.test_images, ds.test_labels


def digits_28(preset: Preset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits resized (bilinear) to 28x28: ``train`` (all but the
    validation examples), ``fewshot`` (``shots`` per class from ``train``), ``val``,
    ``test`` (360 images, the library's fixed stratified split)."""
    ds = fgrad_jax.datasets.load_digits()

    def resize(x: np.ndarray) -> np.ndarray:
        up = jax.image.resize(jnp.asarray(x), (x.shape[0], 28, 28), "linear")
        return np.asarray(up, np.float32)[..., None]

    rng = np.random.default_rng(preset.seed)
    order = rng.permutation(len(ds.train_labels))
    val, train = order[: preset.validation], order[preset.validation :]
    x, y = resize(ds.train_images), ds.train_labels
    fewshot = np.concatenate([train[y[train] == c][: preset.shots] for c in range(10)])
    return {
        "full": (x[train], y[train]),
        "fewshot": (x[fewshot], y[fewshot]),
        "val": (x[val], y[val]),
        "test": (resize(ds.test_images), ds.test_labels),
    }


# --------------------------------------------------------------------------- pretraining


def pretrain(
    cfg: ModelConfig, preset: Preset, ckpt_dir: str, log: Callable[[str], None] = print
) -> tuple[Params, dict]:
    """Backprop pretraining on Fashion-MNIST (Adam 1e-3), saved once with orbax at
    ``ckpt_dir/<preset>_<model>`` and restored from there on later runs.

    Returns:
        ``(params, info)``: the pretrained parameters (``lora_rank=0``) and
        ``{"fashion_test_acc", "seconds", "restored"}``.
    """
    module: Any = models.build(cfg)
    path = os.path.abspath(os.path.join(ckpt_dir, f"{preset.name}_{cfg.name}"))
    checkpointer = ocp.StandardCheckpointer()
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    x_tr, y_tr, x_te, y_te = fashion_mnist()
    t0 = time.perf_counter()
    if os.path.isdir(path):
        params = checkpointer.restore(path, abstract)
        restored = True
    else:
        params = module.init(jax.random.key(preset.seed), jnp.asarray(x_tr[:1]))["params"]
        tx = optax.adam(1e-3)
        rng = np.random.default_rng(preset.seed)
        idx = rng.integers(0, len(y_tr), (preset.pretrain_steps, preset.pretrain_batch))

        @jax.jit
        def run(params, xs, ys):
            def body(carry, batch):
                params, opt = carry
                grads = jax.grad(lambda p: xent(module.apply({"params": p}, batch[0]), batch[1]))(
                    params
                )
                updates, opt = tx.update(grads, opt, params)
                return (optax.apply_updates(params, updates), opt), None

            (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), (xs, ys))
            return params

        params = run(params, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
        restored = False
    acc = accuracy(module, params, x_te[:2000], y_te[:2000])
    info = {"fashion_test_acc": acc, "seconds": time.perf_counter() - t0, "restored": restored}
    log(f"pretrained {cfg.name}: Fashion-MNIST test acc {acc:.4f} ({info['seconds']:.1f} s)")
    return params, info


def accuracy(module: Any, params: Params, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of a linen classifier."""
    logits = jax.jit(module.apply)({"params": params}, jnp.asarray(x))
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))


# --------------------------------------------------------------------------- fine-tuning


def is_trained(path: tuple[str, ...], trained: str) -> bool:
    """Whether the leaf at ``path`` (a flattened linen parameter path) is trained."""
    if trained == "full":
        return True
    if trained == "lora":
        return path[-1] in ("lora_a", "lora_b") or path[0] == "head"
    if trained == "head":
        return path[0] == "head"
    raise ValueError(f"unknown trained set {trained!r}")


def adapted_params(
    cfg: ModelConfig, pretrained: Params, method: MethodConfig, preset: Preset
) -> tuple[Any, dict, dict]:
    """``(module, trainable, frozen)``: flat dicts of the pretrained parameters plus fresh
    adapters (``lora_a`` ~ N(0, 1/in), ``lora_b`` = 0) for LoRA methods."""
    rank = preset.lora_rank if method.trained == "lora" else 0
    module = models.build(cfg, rank)
    shapes = flatten_dict(
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    )
    flat = flatten_dict(pretrained)
    key = jax.random.key(preset.seed + 1)
    for i, (path, s) in enumerate(sorted(shapes.items())):
        if path[0] == "head" and preset.head_init == "zero":
            # A new label set: the pretrained head's rows are Fashion-MNIST classes.
            flat[path] = jnp.zeros(s.shape, s.dtype)
        elif path[-1] == "lora_a":
            z = jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype)
            flat[path] = z / np.sqrt(s.shape[0])
        elif path[-1] == "lora_b":
            flat[path] = jnp.zeros(s.shape, s.dtype)
    trainable = {k: v for k, v in flat.items() if is_trained(k, method.trained)}
    frozen = {k: v for k, v in flat.items() if not is_trained(k, method.trained)}
    if method.local:
        # One zero head per encoder block (as the model's head starts at zero).
        n = len(local_model(module, method.local_rows).block_paths)
        for i in range(n):
            trainable[(LOCAL, str(i), "kernel")] = jnp.zeros((cfg.width, 10), jnp.float32)
            trainable[(LOCAL, str(i), "bias")] = jnp.zeros((10,), jnp.float32)
    return module, trainable, frozen


LOCAL = "local_heads"
"""First key of the block-local heads' leaves in the flat parameter dicts."""

_LOCAL: dict[tuple, Any] = {}


def local_model(module: Any, rows: bool = False) -> Any:
    """The initialised :func:`fgrad_jax.local_losses` of a ViT (a block ends at every
    encoder ``Block``; ``rows``: each block's loss split into one per row of the token
    grid), analysed once per model, LoRA rank and split."""
    key = (module.cfg, module.lora_rank, rows)
    if key not in _LOCAL:
        patches = 28 // module.cfg.patch if rows else None
        local = fgrad_jax.local_losses(module, 10, boundaries=models.Block, patches=patches)
        _, _, _LOCAL[key] = local.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
    return _LOCAL[key]


def model_params(flat: dict) -> Any:
    """The linen parameter tree of a flat dict (block-local heads left out)."""
    return unflatten_dict({k: v for k, v in flat.items() if k[0] != LOCAL})


def local_tree(flat: dict) -> dict:
    """``{"model": ..., "heads": [...]}``, the parameters of :func:`local_model`, from a flat
    dict holding the model's leaves and the block-local heads."""
    n = len({k[1] for k in flat if k[0] == LOCAL})
    heads = [{n_: flat[(LOCAL, str(i), n_)] for n_ in ("kernel", "bias")} for i in range(n)]
    return {"model": model_params(flat), "heads": heads}


def flat_of_local_tree(tree: dict) -> dict:
    """Inverse of :func:`local_tree`."""
    flat = dict(flatten_dict(tree["model"]))
    for i, h in enumerate(tree["heads"]):
        flat.update({(LOCAL, str(i), n): v for n, v in h.items()})
    return flat


def step_rate(method: MethodConfig, lr: Array | float, i: Array, steps: int) -> Array | float:
    """The learning rate of step ``i`` (from 0) of ``steps`` under ``method.schedule``."""
    if method.schedule == "constant":
        return lr
    if method.schedule != "cosine":
        raise ValueError(
            f"{method.name}: schedule={method.schedule!r}; use 'constant' or 'cosine'."
        )
    return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * i.astype(jnp.float32) / steps))


def scaled(updates: dict, lr: Array, method: MethodConfig) -> dict:
    """``-lr * updates``, times ``method.head_lr`` on the heads' leaves."""
    return {
        k: -lr * (method.head_lr if k[0] in ("head", LOCAL) else 1.0) * u
        for k, u in updates.items()
    }


def make_step(module: Any, method: MethodConfig, preset: Preset) -> tuple[Callable, Callable]:
    """``(init, step)`` of one method; ``step(trainable, opt_state, frozen, x, y, lr)``
    returns ``(trainable, opt_state, loss)``. Only ``trainable`` is estimated and updated
    (the frozen leaves are closed over by the loss: no tangents, no optimizer state)."""

    if method.local:
        return _local_step(module, method, preset)

    def loss(trainable, frozen, x, y):
        params = unflatten_dict({**frozen, **trainable})
        return xent(module.apply({"params": params}, x), y)

    def per_example(trainable, frozen, x, y):
        params = unflatten_dict({**frozen, **trainable})
        logits = module.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    opt = optax.scale_by_adam() if method.optimizer == "adam" else optax.identity()
    if method.estimator == "backprop":
        tx = opt
    elif method.estimator == "fg":
        # The memory-lean form (tangents redrawn, never stored): this benchmark measures
        # fine-tuning in inference memory; "rademacher" would store K x parameters x 8
        # bytes on these small models, for the same estimates.
        est = fgrad_jax.forward_gradient(
            key=preset.seed,
            num_tangents=method.samples,
            tangent=fgrad_jax.hashed("rademacher", store="never"),
            perturb=method.perturb,
            tangent_chunk=preset.tangent_chunk,
        )
        tx = optax.chain(est, opt)
    elif method.estimator == "spsa":
        est = fgrad_jax.spsa_gradient(
            key=preset.seed, num_samples=method.samples, epsilon=preset.epsilon
        )
        tx = optax.chain(est, opt)
    else:
        raise ValueError(f"unknown estimator {method.estimator!r}")

    def step(trainable, opt_state, frozen, x, y, lr):
        if method.estimator == "backprop":
            value, grads = jax.value_and_grad(loss)(trainable, frozen, x, y)
            updates, opt_state = tx.update(grads, opt_state, trainable)
        else:
            fn = per_example if method.perturb == "activations" else loss
            updates, opt_state = tx.update(
                None, opt_state, trainable, value_fn=lambda t: fn(t, frozen, x, y)
            )
            value = jnp.mean(fgrad_jax.forward_gradient_state(opt_state).value)
        return optax.apply_updates(trainable, scaled(updates, lr, method)), opt_state, value

    return tx.init, step


def _local_step(module: Any, method: MethodConfig, preset: Preset) -> tuple[Callable, Callable]:
    """:func:`make_step` for block-local losses: the estimate runs on the whole tree of
    :func:`local_model` with ``mask=`` the trained leaves (the frozen ones get no tangents),
    the optimizer on the trained leaves only. ``estimator="backprop"``: the exact gradient
    of the same local objective (a reference: what the objective reaches without noise)."""
    local = local_model(module, method.local_rows)

    def mask(tree):
        flat = flatten_dict(tree["model"])
        return {
            "model": unflatten_dict({k: is_trained(k, method.trained) for k in flat}),
            "heads": jax.tree.map(lambda _: True, tree["heads"]),
        }

    est = local.forward_gradient(
        preset.seed,
        num_tangents=method.samples,
        perturb=method.perturb,
        mask=mask,
        tangent_chunk=preset.tangent_chunk,
    )
    opt = optax.scale_by_adam() if method.optimizer == "adam" else optax.identity()

    def init(trainable):
        return est.init(trainable), opt.init(trainable)

    def step(trainable, opt_state, frozen, x, y, lr):
        est_state, opt_s = opt_state
        if method.estimator == "backprop":  # the exact gradient of the local objective
            flat = jax.grad(
                lambda t: local.losses(local_tree({**frozen, **t}), x, y, {})[0].mean(0).sum()
            )(trainable)
        else:
            full = local_tree({**frozen, **trainable})
            grads, est_state = est.update(None, est_state, full, value_fn=local.value_fn(x, y))
            flat = flat_of_local_tree(grads)
        updates, opt_s = opt.update({k: flat[k] for k in trainable}, opt_s, trainable)
        value = fgrad_jax.forward_gradient_state(est_state).value
        return (
            optax.apply_updates(trainable, scaled(updates, lr, method)),
            (est_state, opt_s),
            value,
        )

    return init, step


_FORWARD: dict[tuple, Any] = {}


def step_memory(
    module: Any, method: MethodConfig, preset: Preset, trainable: dict, frozen: dict, x, y
) -> dict:
    """XLA's memory analysis of one compiled step (parameters and optimizer state donated)
    and of a plain forward pass (logits) of the same batch. ``peak`` counts arguments +
    outputs + temporaries − aliased (donated) bytes: everything the compiled program needs
    resident at once, parameters and batch included."""
    init, step = make_step(module, method, preset)
    state = init(trainable)
    compiled = (
        jax.jit(step, donate_argnums=(0, 1)).lower(trainable, state, frozen, x, y, 1e-3).compile()
    )
    key = (type(module).__name__, module.cfg, module.lora_rank, x.shape)
    if key not in _FORWARD:
        # The forward pass is the same for every method on a model (and LoRA rank):
        # compiled once per run, the largest fixed cost of a quick run being compiles.
        params = model_params({**frozen, **trainable})
        fwd = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x).compile()
        _FORWARD[key] = fwd
    fwd = _FORWARD[key]

    def needs(c):
        m = c.memory_analysis()
        return {
            "temp": int(m.temp_size_in_bytes),
            "argument": int(m.argument_size_in_bytes),
            "output": int(m.output_size_in_bytes),
            "alias": int(m.alias_size_in_bytes),
            "peak": int(
                m.temp_size_in_bytes
                + m.argument_size_in_bytes
                + m.output_size_in_bytes
                - m.alias_size_in_bytes
            ),
        }

    return {"step": needs(compiled), "inference": needs(fwd)}


def finetune(
    cfg: ModelConfig,
    pretrained: Params,
    method: MethodConfig,
    preset: Preset,
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Fine-tunes with every learning rate of the sweep (one ``vmap``-ed program, compiled
    once and run on each setting), ``preset.steps * method.steps_factor`` steps evaluated
    ``preset.evals`` times.

    Returns:
        ``{SETTING: record}`` with ``test_acc`` (at the rate with the best final validation
        accuracy), ``peak_bytes``, ``inference_bytes``, ``forward_passes``, ``seconds`` (run
        time of the sweep over its number of rates, compile excluded), and the curve,
        sweep and memory details.
    """
    if method.local and cfg.name != "vit":
        return {}
    module, trainable, frozen = adapted_params(cfg, pretrained, method, preset)
    init, step = make_step(module, method, preset)
    steps = preset.steps * method.steps_factor
    n_evals = preset.evals
    eval_every = steps // n_evals
    evals = tuple(jnp.asarray(a) for a in (*data["val"], *data["test"]))

    def evaluate(trainable, frozen, evals):
        params = model_params({**frozen, **trainable})
        x_val, y_val, x_te, y_te = evals

        def acc(x, y):
            return jnp.mean(jnp.argmax(module.apply({"params": params}, x), -1) == y)

        return acc(x_val, y_val), acc(x_te, y_te)

    # Everything is an argument (no array constants: XLA would constant-fold the model).
    rate = functools.partial(step_rate, method, steps=steps)
    rate(0.0, jnp.int32(0))  # a bad schedule fails here, before anything is compiled

    def run(lr, trainable, frozen, xs, ys, evals):
        def chunk(carry, batch):
            def body(c, b):
                t, s, _ = step(c[0], c[1], frozen, b[0], b[1], rate(lr, b[2]))
                return (t, s), None

            carry, _ = jax.lax.scan(body, carry, batch)
            return carry, evaluate(carry[0], frozen, evals)

        shape = (n_evals, eval_every)
        index = jnp.arange(n_evals * eval_every).reshape(shape)
        batches = (xs.reshape(shape + xs.shape[1:]), ys.reshape(shape + ys.shape[1:]), index)
        _, (val, test) = jax.lax.scan(chunk, (trainable, init(trainable)), batches)
        val0, test0 = evaluate(trainable, frozen, evals)  # the pretrained model, step 0
        return jnp.concatenate([val0[None], val]), jnp.concatenate([test0[None], test])

    lrs = jnp.asarray(method.learning_rates, jnp.float32)
    sweep = jax.jit(jax.vmap(run, in_axes=(0, None, None, None, None, None)))
    rng = np.random.default_rng(preset.seed)
    out = {}
    compiled = None
    mem: dict = {}
    for setting in preset.settings:
        x, y = data[setting]
        idx = rng.integers(0, len(y), (n_evals * eval_every, preset.batch))
        xs, ys = jnp.asarray(x[idx]), jnp.asarray(y[idx])
        if compiled is None:
            t0 = time.perf_counter()
            compiled = sweep.lower(lrs, trainable, frozen, xs, ys, evals).compile()
            compile_s = time.perf_counter() - t0
            mem = step_memory(module, method, preset, trainable, frozen, xs[0], ys[0])
        assert compiled is not None
        t0 = time.perf_counter()
        val, test = jax.block_until_ready(compiled(lrs, trainable, frozen, xs, ys, evals))
        seconds = (time.perf_counter() - t0) / len(method.learning_rates)
        val, test = np.asarray(val), np.asarray(test)
        best = int(np.argmax(val[:, -1]))
        passes = method.forward_passes_per_step()
        record = {
            "test_acc": float(test[best, -1]),
            "peak_bytes": mem["step"]["peak"],
            "inference_bytes": mem["inference"]["peak"],
            "forward_passes": passes * n_evals * eval_every,
            "steps": n_evals * eval_every,
            "seconds": seconds,
            "compile_seconds": compile_s,
            "learning_rate": method.learning_rates[best],
            "schedule": method.schedule,
            "val_acc": float(val[best, -1]),
            "sweep": {
                str(lr): {"val_acc": float(val[i, -1]), "test_acc": float(test[i, -1])}
                for i, lr in enumerate(method.learning_rates)
            },
            "curve": {
                "forward_passes": [passes * eval_every * i for i in range(n_evals + 1)],
                "test_acc": [float(a) for a in test[best]],
            },
            "pretrained_test_acc": float(test[best, 0]),
            "estimator": method.estimator,
            "trained": method.trained,
            "optimizer": method.optimizer,
            "perturb": method.perturb,
            "samples": method.samples,
            "local": method.local,
            "backward_passes": n_evals * eval_every if method.estimator == "backprop" else 0,
            "trained_parameters": int(sum(v.size for v in trainable.values())),
            "memory": mem,
        }
        out[f"{cfg.name}_{setting}"] = record
        log(
            f"{method.name:>14} {cfg.name}_{setting:<8} test {record['test_acc']:.4f} "
            f"(lr {record['learning_rate']:g}) peak/inference "
            f"{record['peak_bytes'] / record['inference_bytes']:.2f} "
            f"{seconds:.1f} s/run, compile {compile_s:.1f} s"
        )
    return out

"""The quality benchmark's methods and trainer: every gradient estimator of fgrad_jax trained
with Adam (cosine decay to 0 over the run) on the same models, data order and epochs, several
seeds as one vmapped program. Methods are named by strings (:func:`parse_method`; the table in
docs/quality.md).

Every run ``r`` (a learning rate and a seed) starts from ``init(fold_in(key(seed), 0))``,
draws its tangents from ``fold_in(key(seed), 1)`` and shuffles the training set at epoch
``e`` with ``fold_in(fold_in(key(seed), 2), e)``: identical data order for every method.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fgrad_jax
from experiments.quality.resnet import _xent, local_estimator, make_resnet_method
from experiments.toolkit.train import make_chunk
from fgrad_jax import diagnostics

Array = jax.Array


def _flatten(x: Array) -> Array:
    return x.reshape(x.shape[0], -1)


def _avg_pool(x: Array) -> Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def model_layers(name: str, num_classes: int = 10) -> list[Any]:
    """The ordered layers of a benchmark model (linen modules and parameterless callables).

    ``"mlp"``: 784-256-256-10 ReLU on flat ``(B, 784)`` inputs. ``"cnn"``: the Flax MNIST example's CNN, conv32 3x3 -
    avgpool - conv64 3x3 - avgpool - dense256 - dense10 (ReLU after each conv and the first
    dense). The same list is the global model (applied in order) and the blocks of the
    local-loss methods (every module with parameters starts a block).

    Example:
        >>> len(model_layers("mlp"))
        5
    """
    if name == "mlp":
        return [nn.Dense(256), nn.relu, nn.Dense(256), nn.relu, nn.Dense(num_classes)]
    if name == "cnn":
        return [
            nn.Conv(32, (3, 3)), nn.relu, _avg_pool,
            nn.Conv(64, (3, 3)), nn.relu, _avg_pool, _flatten,
            nn.Dense(256), nn.relu, nn.Dense(num_classes),
        ]  # fmt: skip
    raise ValueError(f"unknown model {name!r}; use 'mlp' or 'cnn'.")


class _Model:
    """A list of layers as one model: ``init(key, x) -> params`` and ``apply(params, x)``."""

    def __init__(self, layers: list[Any]):
        self.layers = layers
        self.mods = [layer for layer in layers if isinstance(layer, nn.Module)]

    def init(self, key: Array, x: Array) -> list[Any]:
        params, keys = [], jax.random.split(key, len(self.mods))
        for layer in self.layers:
            if isinstance(layer, nn.Module):
                params.append(layer.init(keys[len(params)], x)["params"])
                x = layer.apply({"params": params[-1]}, x)
            else:
                x = layer(x)
        return params

    def apply(self, params: list[Any], x: Array) -> Array:
        j = 0
        for layer in self.layers:
            if isinstance(layer, nn.Module):
                x = layer.apply({"params": params[j]}, x)
                j += 1
            else:
                x = layer(x)
        return x


# Patch-/group-wise local losses (Ren et al. 2023) per benchmark model, one entry per block:
# the CNN's first conv block (14 x 14 x 32 after pooling) in 2 x 2 patches and 4 groups, the
# dense 256 blocks in 4 groups; the block ending in a flatten and the output block unsplit.
SPLITS: dict[str, dict[str, Any]] = {
    "mlp": {"groups": [4, 4, 1]},
    "cnn": {"patches": [2, None, None, None], "groups": [4, 1, 4, 1]},
}
# Every block split: the CNN's blocks drawn explicitly with the flatten in the dense block
# (the same function), so that the second conv block (7 x 7 x 64) keeps its spatial axes and
# is split into 7 x 7 patches (one per position) and 4 groups, as Ren et al. split every block.
SPLITS_ALL: dict[str, dict[str, Any]] = {
    "mlp": SPLITS["mlp"],
    "cnn": {"patches": [2, 7, None, None], "groups": [4, 4, 4, 1]},
}


def model_blocks(name: str, num_classes: int = 10) -> list[Any]:
    """The benchmark model's layers as explicit local-loss blocks (``local_a_splitall``):
    the MLP's automatic blocks; the CNN's with the flatten at the start of the dense block.

    Example:
        >>> [len(b) for b in model_blocks("cnn")]
        [3, 3, 3, 1]
    """
    layers = model_layers(name, num_classes)
    if name == "mlp":
        return layers
    return [layers[0:3], layers[3:6], layers[6:9], layers[9:]]


_PATTERNS = {
    "fg": re.compile(r"fg_(normal|rademacher|lowrank)_k(\d+)$"),
    "fg_act": re.compile(r"fg_act_k(\d+)$"),
    "local": re.compile(r"local_([wa])(_[a-z][a-z0-9]*)?_k(\d+)$"),
    "local_bp": re.compile(r"local_bp(_[a-z]+)?$"),
    "guided": re.compile(r"guided_k(\d+)$"),
    "spsa": re.compile(r"spsa_k(\d+)$"),
}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A parsed method name: its family, tangent law, perturbation, number K of tangents
    and, for local losses, the variant infix (``"_split_"`` for ``local_a_split_k16`` and
    ``local_bp_split``, ``""`` for none)."""

    name: str
    family: str
    tangent: str = "normal"
    perturb: str = "weights"
    k: int = 1
    variant: str = ""

    @property
    def forward_only(self) -> bool:
        """No backward pass anywhere in its update: everything but backprop and
        ``local_bp[_<variant>]``, the exact gradient of the local losses (backprop inside
        each block): the ceiling of the local recipes, a reference."""
        return self.family not in ("backprop", "local_bp")


def parse_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of a method name (see the module docstring).

    Example:
        >>> parse_method("fg_rademacher_k4")
        MethodSpec(name='fg_rademacher_k4', family='fg', tangent='rademacher', perturb='weights', k=4, variant='')
    """
    if name == "backprop":
        return MethodSpec(name, "backprop")
    if m := _PATTERNS["fg"].match(name):
        return MethodSpec(name, "fg", m.group(1), "weights", int(m.group(2)))
    if m := _PATTERNS["fg_act"].match(name):
        return MethodSpec(name, "fg", "rademacher", "activations", int(m.group(1)))
    if m := _PATTERNS["local"].match(name):
        perturb = "weights" if m.group(1) == "w" else "activations"
        variant = f"{m.group(2)}_" if m.group(2) else ""
        return MethodSpec(name, "local", "rademacher", perturb, int(m.group(3)), variant)
    if m := _PATTERNS["local_bp"].match(name):
        return MethodSpec(name, "local_bp", variant=f"{m.group(1)}_" if m.group(1) else "")
    if m := _PATTERNS["guided"].match(name):
        return MethodSpec(name, "guided", "rademacher", "weights", int(m.group(1)))
    if m := _PATTERNS["spsa"].match(name):
        return MethodSpec(name, "spsa", "rademacher", "weights", int(m.group(1)))
    raise ValueError(
        f"unknown method {name!r}; use backprop, fg_<normal|rademacher|lowrank>_k<K>, "
        "fg_act_k<K>, local_<w|a>[_<variant>]_k<K>, local_bp[_<variant>], guided_k<K> or "
        "spsa_k<K> (variants: split, splitall; on the resnet also layer, channels, resgroups, "
        "resgroups16, reschannels, respositions)."
    )


@dataclasses.dataclass
class Method:
    """A method on a model, as pure functions (all vmappable over runs): ``init(key)``,
    ``estimator(key)`` (the gradient transformation that replaces the updates by the
    method's estimate; ``None`` for backprop), ``objective(params, x, y)`` (its
    ``value_fn``: per-example losses for activity perturbation, ``(B, L)`` for local losses)
    and ``predict(params, x)``. A model with mutable state (BatchNorm statistics) has
    ``init_state(key)``, ``objective(params, x, y, model_state) -> (out, aux)``, an
    estimator with ``has_aux``, ``new_state(aux)`` and ``predict(params, x, model_state)``.
    """

    spec: MethodSpec
    init: Callable[[Array], Any]
    estimator: Callable[[Array], optax.GradientTransformationExtraArgs] | None
    objective: Callable[..., Any]
    predict: Callable[..., Array]
    model: str = ""
    init_state: Callable[[Array], Any] | None = None
    new_state: Callable[[Any], Any] | None = None

    def value_fn(self, x: Array, y: Array, model_state: Any) -> Callable[[Any], Any]:
        """What the estimator's ``update`` is given as ``value_fn`` at this batch."""
        state = () if self.init_state is None else (model_state,)
        return lambda p: self.objective(p, x, y, *state)

    def mean_objective(self, params: Any, x: Array, y: Array, model_state: Any = ()) -> Any:
        """``(scalar, new model state)``: the scalar whose gradient the estimator estimates
        (sum over blocks of the means)."""
        out = self.value_fn(x, y, model_state)(params)
        new = model_state
        if self.init_state is not None:
            out, aux = out
            new = self.new_state(aux)  # type: ignore[misc]
        return (jnp.sum(jnp.mean(out, axis=0)) if out.ndim else out), new

    def logits(self, params: Any, x: Array, model_state: Any) -> Array:
        state = () if self.init_state is None else (model_state,)
        return self.predict(params, x, *state)


def make_method(name: str, model: str, x_example: Array, num_classes: int = 10, **opts) -> Method:
    """The :class:`Method` ``name`` on the benchmark model ``model``.

    ``opts``: ``spsa_epsilon`` (1e-3), ``guided_residual`` (0.1), ``guided_beta`` (0.99),
    ``tangents_at_once`` (``False``: the library's automatic tangent chunks; ``True``: all K
    tangents in one pass, ``tangent_chunk=K``, for accelerators with memory to spare).
    """
    spec = parse_method(name)
    if model in ("resnet", "vit"):
        return make_resnet_method(spec, Method, x_example, num_classes, opts, model)
    layers = model_layers(model, num_classes)
    chunk = spec.k if opts.get("tangents_at_once", False) else None
    if spec.family in ("local", "local_bp"):
        if spec.variant not in ("", "_split_", "_splitall_"):
            raise ValueError(f"{name}: this variant is defined for the resnet only.")
        split = SPLITS[model] if spec.variant == "_split_" else {}
        if spec.variant == "_splitall_":
            layers, split = model_blocks(model, num_classes), SPLITS_ALL[model]
        unbound = fgrad_jax.local_losses(layers, num_classes, **split)
        _, local = unbound.init(jax.random.key(0), x_example)  # knows heads and columns
        return Method(
            spec,
            init=lambda key: local.init(key, x_example)[0],
            estimator=local_estimator(local, spec, chunk),
            objective=lambda p, x, y: local.losses(p, x, y),
            predict=local.predict,
            model=model,
        )
    net = _Model(layers)
    per_example = spec.perturb == "activations"

    def objective(p, x, y):
        losses = _xent(net.apply(p, x), y)
        return losses if per_example else losses.mean()

    # estimator(key): the family's gradient transformation with this method's settings.
    estimator = {
        "backprop": None,
        "fg": partial(fgrad_jax.forward_gradient, num_tangents=spec.k, tangent=spec.tangent,
                      perturb=spec.perturb, tangent_chunk=chunk),
        "guided": partial(fgrad_jax.guided_forward_gradient, num_tangents=spec.k,
                          residual_scale=opts.get("guided_residual", 0.1),
                          beta=opts.get("guided_beta", 0.99)),
        "spsa": partial(fgrad_jax.spsa_gradient, num_samples=spec.k,
                        epsilon=opts.get("spsa_epsilon", 1e-3)),
    }[spec.family]  # fmt: skip
    return Method(
        spec, lambda key: net.init(key, x_example), estimator, objective, net.apply, model
    )


def init_run(method: Method, lr: Array | float, seed: Array | int) -> tuple[Any, Any]:
    """One run's parameters and state ``(estimator state or (), adam state, model state or
    ())``."""
    base = jax.random.key(seed)
    params = method.init(jax.random.fold_in(base, 0))
    if method.estimator is None:
        est_state = ()
    else:
        est_state = method.estimator(jax.random.fold_in(base, 1)).init(params)
    model_state = () if method.init_state is None else method.init_state(base)
    return params, (est_state, adam_cosine(lr, 1.0).init(params), model_state)


def init_runs(method: Method, lrs: Array, seeds: Array) -> tuple[Any, Any]:
    """:func:`init_run` of every run, stacked."""
    return jax.jit(jax.vmap(lambda lr, seed: init_run(method, lr, seed)))(lrs, seeds)


def adam_cosine(lr: Array | float, total: Array | float) -> optax.GradientTransformation:
    """Adam whose learning rate decays from ``lr`` to 0 over ``total`` steps along a half
    cosine (both may be traced: one compiled program serves the sweep and the final runs)."""

    def schedule(count):
        frac = jnp.minimum(jnp.asarray(count, jnp.float32) / total, 1.0)
        return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(schedule))


def step(method: Method, lr: Array, total: Array, params: Any, state: Any, x: Array, y: Array):
    """One step of one run (Adam, cosine decay over ``total`` steps):
    ``(params, state, loss before the step)``."""
    est_state, adam_state, model_state = state
    if method.estimator is None:
        (loss, model_state), grads = jax.value_and_grad(method.mean_objective, has_aux=True)(
            params, x, y, model_state
        )
    else:
        est = method.estimator(jax.random.key(0))  # the key lives in est_state
        grads, est_state = est.update(
            None, est_state, params, value_fn=method.value_fn(x, y, model_state)
        )
        fg_state = fgrad_jax.forward_gradient_state(est_state)
        loss = fg_state.value
        if method.init_state is not None:
            model_state = method.new_state(fg_state.aux)  # type: ignore[misc]
    updates, adam_state = adam_cosine(lr, total).update(grads, adam_state, params)
    return optax.apply_updates(params, updates), (est_state, adam_state, model_state), loss


def make_perms(num_examples: int) -> Callable:
    """``perms(seeds, epoch) -> (runs, num_examples)``: each run's shuffle of epoch ``epoch``."""

    def one(seed, epoch):
        dkey = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), epoch)
        return jax.random.permutation(dkey, num_examples)

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


def make_train_chunk(method: Method, batch_size: int, chunk: int, scan: bool = True) -> Callable:
    """``train(lrs, total, params, state, perms, xs, ys, start) -> (params, state, losses)``:
    ``chunk`` steps of every run (vmapped over runs), batches ``start .. start + chunk - 1``
    of each run's permutation ``perms[r]``; the toolkit's one loop
    (:func:`experiments.toolkit.train.make_chunk`, ``scan=False`` for convolutions on
    XLA:CPU, ``docs/quality.md``).
    """

    def one_step(run, carry, data, i):
        (lr, perm), (total, xs, ys) = run, data
        idx = jax.lax.dynamic_slice(perm, (i * batch_size,), (batch_size,))
        params, state, loss = step(method, lr, total, *carry, xs[idx], ys[idx])
        return (params, state), loss

    fn = make_chunk(one_step, chunk, scan=scan)

    def train(lrs, total, params, state, perms, xs, ys, start):
        (params, state), losses = fn((lrs, perms), (params, state), (total, xs, ys), start)
        return params, state, losses

    return train


def make_refresh(method: Method, batch_size: int, passes: int) -> Callable:
    """``refresh(params, state, xs, ys) -> state`` with the model state (BatchNorm running
    statistics) re-estimated at ``params`` by ``passes`` training-mode forward passes over
    the first batches of ``xs`` (the estimators' noisy steps move the weights faster than
    a momentum-0.9 average follows; ``docs/quality.md``). The identity for a model without
    state or ``passes=0``; the training state itself is never changed."""
    if method.init_state is None or passes == 0:
        return lambda params, state, xs, ys: state
    one = jax.jit(
        jax.vmap(
            lambda p, s, x, y: method.mean_objective(p, x, y, s)[1], in_axes=(0, 0, None, None)
        )
    )

    def refresh(params, state, xs, ys):
        est_state, adam_state, model_state = state
        starts = [(i * batch_size) % (xs.shape[0] - batch_size + 1) for i in range(passes)]
        for i in starts:
            model_state = one(params, model_state, xs[i : i + batch_size], ys[i : i + batch_size])
        return est_state, adam_state, model_state

    return refresh


def make_accuracy(method: Method, eval_batch: int) -> Callable:
    """``accuracy(params, state, xs, ys) -> (runs,)``, in batches of ``eval_batch``, which
    must divide ``len(xs)``."""
    hits = jax.jit(
        jax.vmap(
            lambda p, s, x, y: jnp.sum(method.logits(p, x, s[2]).argmax(-1) == y),
            in_axes=(0, 0, None, None),
        )
    )

    def accuracy(params, state, xs, ys):
        n, rest = divmod(xs.shape[0], eval_batch)
        if rest or not n:
            raise ValueError(f"eval_batch={eval_batch} must divide the {xs.shape[0]} images "
                             "scored; pick a divisor.")  # fmt: skip
        total = sum(
            hits(params, state, xs[i * eval_batch : (i + 1) * eval_batch],
                 ys[i * eval_batch : (i + 1) * eval_batch])
            for i in range(n)
        )  # fmt: skip
        return total / (n * eval_batch)

    return accuracy


def make_cosine(method: Method) -> Callable:
    """``cosine(params, state, xb, yb) -> (runs,)``: cosine of the estimate the next step
    would take to the true gradient (``jax.grad``, diagnosis only) of the method's own
    objective, averaged over the fixed batches ``xb, yb`` (``(n, B, ...)``, Python loop)."""

    def one(params, state, x, y):
        if method.estimator is None:
            return jnp.float32(1.0)
        true = diagnostics.true_gradient(
            lambda p, x, y: method.mean_objective(p, x, y, state[2])[0], params, x, y
        )
        est = method.estimator(jax.random.key(0))
        g, _ = est.update(None, state[0], params, value_fn=method.value_fn(x, y, state[2]))
        return diagnostics.cosine_similarity(g, true)

    one_v = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))
    return lambda params, state, xb, yb: (
        sum(one_v(params, state, xb[i], yb[i]) for i in range(xb.shape[0])) / xb.shape[0]
    )

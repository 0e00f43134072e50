"""The quality benchmark's ``resnet``: a ResNet-18 (BatchNorm, residual blocks) as a user
brings it, written as an ordinary linen class, trained unchanged.

The architecture is that of the Flax ImageNet example's ``ResNet18`` (7x7/2 stem with
BatchNorm and a 3x3/2 max pool, four stages of two basic residual blocks, widths
``num_filters * (1, 2, 4, 8)``, global mean, dense classifier), here with 16 filters on
28x28 Fashion-MNIST. Methods: ``backprop``; ``fg_<tangent>_k<K>`` (weights perturbed on the
unchanged model, the new BatchNorm statistics as the aux); and block-local losses,
``local_a_k<K>`` / ``local_w_k<K>`` with ``boundaries=ResidualBlock`` and the variants of
``RESNET_LOCAL`` (a block per convolution, channel groups, per-example scoring).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fgrad_jax

Array = jax.Array


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, and a projected shortcut when the shape changes."""

    filters: int
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
        )
        conv = functools.partial(nn.Conv, use_bias=False)
        y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
        y = norm(scale_init=nn.initializers.zeros)(conv(self.filters, (3, 3))(y))
        if x.shape != y.shape:
            x = norm()(conv(self.filters, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18: stem, stages of ``stage_sizes`` residual blocks, mean pool, classifier."""

    num_classes: int
    num_filters: int = 16
    stage_sizes: Sequence[int] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = nn.Conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False)(x)
        x = nn.relu(norm()(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResidualBlock(self.num_filters * 2**i, strides)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


# The local-loss variants on the resnet, by the method name's infix: ``_layer_``, a block per
# convolution scored per example; ``_split_``, each split into 4 channel-group columns
# (BatchNorm keeps channels apart), scored unbiasedly; ``_splitall_``, the same per example;
# ``_channels_``, 16 groups (one channel per column in the first stage), per example;
# ``_resgroups_``, a block per residual block, 4 channel-group columns, per example;
# ``_resgroups16_``, the same with 16 groups (better at K = 64, engineering log 2026-12-05);
# ``_reschannels_``, one group per channel (16, 32, 64, 128 per stage); ``_respositions_``,
# one column per channel and position (per-example scoring lets patches pass BatchNorm).
_PER_CHANNEL = [16 * 2**stage for stage in range(4) for _ in range(2)]  # residual blocks' widths
RESNET_LOCAL: dict[str, dict[str, Any]] = {
    "": {"boundaries": ResidualBlock},
    "_layer_": {"boundaries": nn.BatchNorm, "batch_coupling": "per_example"},
    "_split_": {"boundaries": nn.BatchNorm, "groups": 4},
    "_splitall_": {"boundaries": nn.BatchNorm, "groups": 4, "batch_coupling": "per_example"},
    "_channels_": {"boundaries": nn.BatchNorm, "groups": 16, "batch_coupling": "per_example"},
    "_resgroups_": {"boundaries": ResidualBlock, "groups": 4, "batch_coupling": "per_example"},
    "_resgroups16_": {"boundaries": ResidualBlock, "groups": 16, "batch_coupling": "per_example"},
    "_reschannels_": {
        "boundaries": ResidualBlock,
        "groups": _PER_CHANNEL,
        "batch_coupling": "per_example",
    },
    "_respositions_": {
        "boundaries": ResidualBlock,
        "groups": _PER_CHANNEL,
        "patches": [7, 7, 4, 4, 2, 2, 1, 1],
        "batch_coupling": "per_example",
    },
}


def resnet_local_options(spec: Any, variants: dict | None = None) -> dict[str, Any]:
    """``local_losses`` keywords of the local method ``spec`` (a ``MethodSpec``, by its
    variant) among ``variants`` (default: the resnet's)."""
    variants = RESNET_LOCAL if variants is None else variants
    if spec.variant not in variants:
        known = ", ".join(v.strip("_") for v in variants if v) or "none"
        raise ValueError(f"{spec.name}: unknown local variant {spec.variant.strip('_')!r} on "
                         f"this model; its variants: {known}.")  # fmt: skip
    return variants[spec.variant]


def _xent(logits: Array, y: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def local_estimator(local: Any, spec: Any, chunk: int | None):
    """``estimator(key)`` of a local-loss method: the forward gradient of its block losses
    with its K, perturbation and tangent (``None`` for ``local_bp``: exact gradients)."""
    if spec.family == "local_bp":
        return None
    kw = {"num_tangents": spec.k, "perturb": spec.perturb, "tangent": spec.tangent}
    return lambda key: local.forward_gradient(key, tangent_chunk=chunk, **kw)


def make_resnet_method(spec: Any, method_cls: type, x_example: Array, num_classes: int,
                       opts: dict, name: str = "resnet") -> Any:  # fmt: skip
    """The :class:`experiments.quality.methods.Method` ``spec`` on :class:`ResNet18` (16 filters), or on
    another model class (``name="vit"``: :class:`quality.vit.ViT`), trained unchanged."""
    model, variants = ResNet18(num_classes), RESNET_LOCAL
    if name == "vit":
        from .vit import VIT_LOCAL, ViT

        model, variants = ViT(num_classes), VIT_LOCAL
    x1 = x_example[:1]
    chunk = spec.k if opts.get("tangents_at_once", False) else None

    def init_variables(key):
        return model.init({"params": key}, x1, train=True)

    if spec.family in ("local", "local_bp"):
        unbound = fgrad_jax.local_losses(model, num_classes, **resnet_local_options(spec, variants))
        # Shapes, blocks and columns from a batch like the training batches (BatchNorm in
        # training mode couples the examples: detected here, corrected in the estimate).
        batch = jnp.zeros((8, *x1.shape[1:]), x1.dtype)
        local = unbound.init(jax.random.key(0), batch, train=True).local
        return method_cls(
            spec,
            init=lambda key: local.init(key, x1, train=True).params,
            estimator=local_estimator(local, spec, chunk),
            objective=lambda p, x, y, s: local.losses(p, x, y, s, train=True),
            predict=lambda p, x, s: local.predict(p, x, s, train=False),
            model=name,
            init_state=lambda key: local.init(key, x1, train=True).state,
            new_state=lambda aux: aux.state,
        )
    if spec.family not in ("backprop", "fg") or spec.perturb != "weights":
        raise ValueError(
            f"{spec.name} is not run on the resnet: backprop, fg_<tangent>_k<K> (weights) "
            "and local_a_k<K> / local_w_k<K> are. Activity perturbation of the whole model "
            "would need the batch-coupling correction that local_losses applies."
        )

    def objective(p, x, y, s):
        logits, new = model.apply({"params": p, **s}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(_xent(logits, y)), new

    state_example = jax.eval_shape(init_variables, jax.random.key(0))
    aux_example = {k: v for k, v in state_example.items() if k != "params"}
    estimator = None
    if spec.family == "fg":
        estimator = functools.partial(
            fgrad_jax.forward_gradient, num_tangents=spec.k, tangent=spec.tangent, has_aux=True,
            aux_example=aux_example, tangent_chunk=chunk,
        )  # fmt: skip
    return method_cls(
        spec,
        init=lambda key: init_variables(key)["params"],
        estimator=estimator,
        objective=objective,
        predict=lambda p, x, s: model.apply({"params": p, **s}, x, train=False),
        model=name,
        init_state=lambda key: {k: v for k, v in init_variables(key).items() if k != "params"},
        new_state=lambda aux: aux,
    )

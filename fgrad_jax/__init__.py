"""fgrad_jax: forward gradients (gradients without backpropagation) for JAX and optax."""

from fgrad_jax import datasets
from fgrad_jax._estimator import forward_grad, value_and_forward_grad
from fgrad_jax._flax import apply_forward_gradient, nnx_value_and_forward_grad, nnx_value_fn
from fgrad_jax._lowrank import lowrank
from fgrad_jax._tangents import STRATEGIES as _STRATEGIES
from fgrad_jax._tangents import Tangent
from fgrad_jax._transform import (
    ForwardGradientState,
    fgd,
    forward_gradient,
    forward_gradient_state,
)

__version__ = "0.1.0"

TANGENT_NAMES: tuple[str, ...] = tuple(sorted(_STRATEGIES))

__all__ = [
    "TANGENT_NAMES",
    "ForwardGradientState",
    "Tangent",
    "apply_forward_gradient",
    "datasets",
    "fgd",
    "forward_grad",
    "forward_gradient",
    "forward_gradient_state",
    "lowrank",
    "nnx_value_and_forward_grad",
    "nnx_value_fn",
    "value_and_forward_grad",
]

"""fgrad_jax: forward gradients (gradients without backpropagation) for JAX and optax."""

from fgrad_jax import datasets, diagnostics
from fgrad_jax._activity import activity_perturbation
from fgrad_jax._estimator import forward_grad, value_and_forward_grad
from fgrad_jax._flax import apply_forward_gradient, nnx_value_and_forward_grad, nnx_value_fn
from fgrad_jax._guided import GuidedForwardGradientState, guided, guided_forward_gradient
from fgrad_jax._hashed import hashed
from fgrad_jax._local import LocalAux, LocalLosses, LocalVariables, ModelLocalLosses, local_losses
from fgrad_jax._lowrank import lowrank
from fgrad_jax._spsa import spsa, spsa_gradient
from fgrad_jax._state import ForwardGradientState, forward_gradient_state, step_key
from fgrad_jax._strategy import Direction, Selection, TangentStrategy, mean_of_products
from fgrad_jax._tangents import STRATEGIES as _STRATEGIES
from fgrad_jax._tangents import Tangent
from fgrad_jax._transform import fgd, forward_gradient

__version__ = "0.1.0"

#: The names of the built-in tangent distributions (sorted), each accepted as ``tangent=``.
TANGENT_NAMES: tuple[str, ...] = tuple(sorted(_STRATEGIES))

__all__ = [
    "TANGENT_NAMES",
    "Direction",
    "ForwardGradientState",
    "GuidedForwardGradientState",
    "LocalAux",
    "LocalLosses",
    "LocalVariables",
    "ModelLocalLosses",
    "Selection",
    "Tangent",
    "TangentStrategy",
    "activity_perturbation",
    "apply_forward_gradient",
    "datasets",
    "diagnostics",
    "fgd",
    "forward_grad",
    "forward_gradient",
    "forward_gradient_state",
    "guided",
    "guided_forward_gradient",
    "hashed",
    "local_losses",
    "lowrank",
    "mean_of_products",
    "nnx_value_and_forward_grad",
    "nnx_value_fn",
    "spsa",
    "spsa_gradient",
    "step_key",
    "value_and_forward_grad",
]

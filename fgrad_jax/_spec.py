"""What an estimate is asked for: one frozen :class:`EstimatorSpec`, validated once.

Every entry point (:func:`fgrad_jax.forward_grad`, :func:`fgrad_jax.value_and_forward_grad`,
:func:`fgrad_jax.forward_gradient`, :func:`fgrad_jax.nnx_value_and_forward_grad`, and the
strategies' own shortcuts) builds an :class:`EstimatorSpec` when it is built, so a bad
option fails there with an error naming the fix, and ``_estimator.estimate_forward_grad``
runs the pipeline over it without checking anything twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgrad_jax._activity import with_perturbation
from fgrad_jax._strategy import TangentStrategy
from fgrad_jax._tangents import Tangent, resolve_tangent

Array = jax.Array
ArgNums = int | Sequence[int]


def check_num_tangents(
    num_tangents: Any,
    name: str = "num_tangents",
    meaning: str = "the number of random directions averaged per estimate",
) -> int:
    """``num_tangents`` (or another static count called ``name``) as a positive int."""
    if isinstance(num_tangents, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python int, not a traced value. With "
            f"optax.inject_hyperparams pass static_args=('{name}',)."
        )
    if (
        isinstance(num_tangents, jax.Array | np.ndarray)
        and num_tangents.shape == ()
        and (jnp.issubdtype(num_tangents.dtype, jnp.integer))
    ):
        num_tangents = int(num_tangents)
    if isinstance(num_tangents, bool) or not isinstance(num_tangents, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int; got {num_tangents!r}.")
    if num_tangents < 1:
        raise ValueError(f"{name} must be >= 1 ({meaning}); got {num_tangents}.")
    return int(num_tangents)


def as_key(key: Any, name: str = "key") -> Array:
    """Returns a typed PRNG key; accepts typed keys and legacy ``uint32[2]`` keys."""
    if isinstance(key, jax.Array | np.ndarray) or hasattr(key, "dtype"):
        dtype = key.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return key
        if dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2:
            return jax.random.wrap_key_data(key)
    raise TypeError(
        f"{name} must be a JAX PRNG key such as jax.random.key(0) (legacy "
        f"jax.random.PRNGKey(0) also works); got {type(key).__name__}"
        f"{getattr(key, 'shape', '')}{getattr(key, 'dtype', '')}."
    )


def is_differentiable(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _normalise_argnums(argnums: ArgNums) -> tuple[tuple[int, ...], bool]:
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return (argnums,), False
    if isinstance(argnums, bool) or not isinstance(argnums, Sequence):
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints; got {argnums!r}.")
    argnums = tuple(argnums)
    if not argnums or not all(isinstance(a, int) for a in argnums):
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints; got {argnums!r}.")
    return argnums, True


def _check_chunk(tangent_chunk: Any, num_tangents: int) -> int | None:
    if tangent_chunk is None:
        return None
    if isinstance(tangent_chunk, bool) or not isinstance(tangent_chunk, (int, np.integer)):
        raise TypeError(f"tangent_chunk must be a positive int or None; got {tangent_chunk!r}.")
    if tangent_chunk < 1 or num_tangents % tangent_chunk:
        raise ValueError(
            f"tangent_chunk={tangent_chunk} must divide num_tangents={num_tangents} (the K "
            "tangents are processed in equal chunks); pick a divisor, e.g. 1."
        )
    return int(tangent_chunk)


@dataclasses.dataclass(frozen=True, eq=False)
class EstimatorSpec:
    """Everything an estimate needs besides the function, the key and the arguments.

    Build one with :meth:`create`, which validates every option; the fields are then
    known to be consistent.

    Attributes:
        strategy: The tangent strategy, with ``perturb`` folded in.
        num_tangents: K, the number of tangents averaged (>= 1).
        argnums: The differentiated positional arguments.
        argnums_is_tuple: Whether ``argnums`` was given as a tuple (the estimate is then a
            tuple too).
        has_aux: Whether the function returns ``(value, aux)``.
        mask: ``None``, a pytree of bools (or a prefix), or a callable ``tree -> mask``.
        tangent_chunk: Tangents per chunk, or ``None`` for automatic.
        fn_name: The function's name in error messages.
    """

    strategy: TangentStrategy
    num_tangents: int = 1
    argnums: tuple[int, ...] = (0,)
    argnums_is_tuple: bool = False
    has_aux: bool = False
    mask: Any = None
    tangent_chunk: int | None = None
    fn_name: str = "fun"

    @classmethod
    def create(
        cls,
        *,
        tangent: Tangent = "normal",
        perturb: str = "weights",
        num_tangents: Any = 1,
        argnums: ArgNums = 0,
        has_aux: bool = False,
        mask: Any = None,
        tangent_chunk: Any = None,
        fn_name: str = "fun",
    ) -> EstimatorSpec:
        """Validates the options of an entry point (errors name the fix)."""
        k = check_num_tangents(num_tangents)
        argnum_tuple, is_tuple = _normalise_argnums(argnums)
        strategy = with_perturbation(resolve_tangent(tangent), perturb)
        chunk = _check_chunk(tangent_chunk, k)
        if chunk not in (None, k) and not strategy.chunks_tangents:
            raise ValueError(
                f"tangent_chunk={chunk}: {strategy!r} runs its tangents in one pass and "
                "cannot split them into chunks; pass tangent_chunk=None (or num_tangents)."
            )
        return cls(
            strategy=strategy,
            num_tangents=k,
            argnums=argnum_tuple,
            argnums_is_tuple=is_tuple,
            has_aux=bool(has_aux),
            mask=mask,
            tangent_chunk=chunk,
            fn_name=fn_name,
        )

    @property
    def argnums_given(self) -> ArgNums:
        """``argnums`` as the user gave it (for messages)."""
        return self.argnums if self.argnums_is_tuple else self.argnums[0]

"""The state of :func:`fgrad_jax.forward_gradient` and the key of each of its steps."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgrad_jax import _random
from fgrad_jax._spec import as_key

Array = jax.Array


_I32, _U32 = jnp.int32, jnp.uint32


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["words", "aux"], meta_fields=["key_impl"]
)
@dataclasses.dataclass(frozen=True)
class ForwardGradientState:
    """State of :func:`forward_gradient`: one uint32 array (and the aux, if any).

    A jitted step pays for every array of its state it reads and writes (host dispatch,
    one buffer per output without donation), so the key, the counters and the logged loss
    travel packed in ``words``; read them through the properties. Build one with
    :meth:`create`.

    Attributes:
        words: uint32 vector: the key's data, then ``count``, ``num_nonfinite`` and the
            bits of ``value`` (a leading batch axis when states are stacked, e.g. vmapped
            over seeds).
        aux: With ``has_aux=True``, the ``aux`` that ``value_fn`` returned in the last
            update's JVP pass (zeros shaped like ``aux_example`` before the first update);
            ``None`` otherwise.
        key_impl: Name of the key's PRNG implementation (static), e.g. ``"threefry2x32"``.
    """

    words: Array
    aux: Any = None
    key_impl: str = "threefry2x32"

    @classmethod
    def create(
        cls,
        key: Array,
        count: Array,
        value: Array,
        num_nonfinite: Array,
        aux: Any = None,
    ) -> ForwardGradientState:
        """Packs a typed PRNG key, the int32 counters and the float32 value."""
        data = jax.random.key_data(key)
        scalars = [
            jax.lax.bitcast_convert_type(jnp.asarray(count, _I32), _U32),
            jax.lax.bitcast_convert_type(jnp.asarray(num_nonfinite, _I32), _U32),
            jax.lax.bitcast_convert_type(jnp.asarray(value, jnp.float32), _U32),
        ]
        words = jnp.concatenate([data, jnp.stack(scalars, axis=-1)], axis=-1)
        return cls(words, aux, str(jax.random.key_impl(key)))

    @property
    def key(self) -> Array:
        """The PRNG key given at construction; it never changes. Step ``count``'s tangents
        come from :func:`fgrad_jax.step_key` ``(key, count)``."""
        return jax.random.wrap_key_data(self.words[..., :-3], impl=self.key_impl)

    @property
    def count(self) -> Array:
        """Number of updates made so far (int32)."""
        return jax.lax.bitcast_convert_type(self.words[..., -3], _I32)

    @property
    def num_nonfinite(self) -> Array:
        """Number of steps whose directional derivative or loss was not finite (int32);
        see ``on_nonfinite`` in :func:`forward_gradient`."""
        return jax.lax.bitcast_convert_type(self.words[..., -2], _I32)

    @property
    def value(self) -> Array:
        """Loss at the parameters of the last update, from the same JVP pass (float32;
        NaN before the first update)."""
        return jax.lax.bitcast_convert_type(self.words[..., -1], jnp.float32)


def init_key(key: int | Array) -> Array:
    if isinstance(key, bool):
        raise TypeError("key must be an int seed or a JAX PRNG key, not a bool.")
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    # optax.inject_hyperparams turns an int seed into an int array hyperparameter.
    if isinstance(key, jax.Array) and key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
        return jax.random.key(key)
    return as_key(key)


def step_key(key: int | Array, count: int | Array) -> Array:
    """The key from which :func:`forward_gradient` draws the tangents of step ``count``.

    Step ``count`` of ``forward_gradient(key, ...)`` returns exactly
    ``forward_grad(value_fn, ...)(step_key(key, count), params)``. The key is hashed from
    ``key`` and ``count`` by integer arithmetic, not split by ``jax.random`` (a threefry
    call per step cost more than a small model's whole step on a CPU).

    Args:
        key: The key (or int seed) given to :func:`forward_gradient`.
        count: The step, from 0 (``state.count`` before the update).

    Returns:
        A typed PRNG key of ``key``'s implementation.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import fgrad_jax
        >>> f = lambda w: jnp.sum(w**2)
        >>> tx = fgrad_jax.forward_gradient(key=3)
        >>> w = jnp.ones(4)
        >>> g, _ = tx.update(None, tx.init(w), w, value_fn=f)
        >>> bool(jnp.array_equal(g, fgrad_jax.forward_grad(f)(fgrad_jax.step_key(3, 0), w)))
        True
    """
    return _random.fold_in(init_key(key), jnp.asarray(count))


def _unwrap_variable(x: Any) -> Any:
    # flax.nnx.Optimizer wraps every optimizer-state array in an OptArray variable.
    return x.get_value() if hasattr(x, "get_value") and not isinstance(x, jax.Array) else x


def forward_gradient_state(opt_state: Any) -> ForwardGradientState:
    """Finds the :class:`ForwardGradientState` inside any optimizer state.

    Works on the state of :func:`fgd`, of an :func:`optax.chain` or
    :func:`optax.inject_hyperparams` around :func:`forward_gradient`, and on
    ``nnx.Optimizer.opt_state`` (whose variables it unwraps to arrays), so a training loop can
    log ``forward_gradient_state(opt_state).value`` (the loss from the step's own JVP pass)
    without depending on the chain's layout.

    Args:
        opt_state: An optimizer state containing exactly one :class:`ForwardGradientState`.

    Returns:
        That state, with plain arrays as fields.

    Raises:
        ValueError: If ``opt_state`` holds no :class:`ForwardGradientState`, or several.

    Example:
        >>> import jax.numpy as jnp
        >>> import fgrad_jax
        >>> tx = fgrad_jax.fgd(0.1)
        >>> params = jnp.zeros(3)
        >>> _, state = tx.update(None, tx.init(params), params, value_fn=lambda p: jnp.sum((p - 1) ** 2))
        >>> float(fgrad_jax.forward_gradient_state(state).value)
        3.0
    """
    found = [
        leaf
        for leaf in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, ForwardGradientState)
        )
        if isinstance(leaf, ForwardGradientState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"Expected exactly one ForwardGradientState in the optimizer state, found "
            f"{len(found)}. Pass the state of a transformation built with forward_gradient or fgd."
        )
    return jax.tree_util.tree_map(
        _unwrap_variable, found[0], is_leaf=lambda v: hasattr(v, "get_value")
    )

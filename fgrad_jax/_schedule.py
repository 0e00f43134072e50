"""Steering XLA's scheduling by data dependences that never change a value.

The structured-tangent JVP (``_interpreter.py``) orders its work for XLA with a
:class:`Schedule`:

* a lazy draw's seed is combined with :func:`fake_zero` of another input of its consuming
  operation, so it is drawn when that input exists and not hoisted to the start;
* after each ``dot_general``/``conv_general_dilated`` the primal output is tied to its own
  tangent (:func:`tie_to_tangent`), so the primal chain cannot run ahead of the tangent
  chain and keep its activations alive (which would make the working memory grow with depth);
* a draw needed twice is computed once into a buffer (:func:`store_once`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_ONE = np.uint32(1)


def fake_zero(anchor: Array | None) -> Array:
    """A uint32 zero that XLA cannot prove is zero, computed from ``anchor``'s first element.

    Adding it to a seed makes a draw depend on ``anchor``: XLA then neither merges the draw
    with an identical one elsewhere (CSE) nor schedules it before ``anchor`` exists.
    (XLA:CPU drops ``optimization_barrier`` before fusion, so a barrier cannot do this.)
    """
    if anchor is None or anchor.size == 0:
        return np.uint32(0)  # type: ignore[return-value]
    a = jnp.ravel(anchor)[0].astype(jnp.float32)
    bit = jax.lax.bitcast_convert_type(a, jnp.uint32) >> np.uint32(31)
    return bit & (bit ^ _ONE)


def store_once(x: Array, seed: Array) -> Array:
    """Returns ``x`` unchanged, through one floating divide so that XLA stores it.

    XLA:CPU duplicates cheap elementwise producers into every consumer; for an expensive
    draw (the Gaussian) that means recomputing it per use, and for low-rank factors
    recomputing each factor entry for every kernel element. A divide is an op XLA does not
    duplicate into a broadcasting consumer, so the draw is computed once into a buffer.
    Scaling by a power of two and back is exact: the values are bitwise unchanged.
    """
    two = (np.uint32(1) << (seed[0] & np.uint32(1))).astype(x.dtype)  # 1 or 2, exact
    return (x * two) / two


@jax.custom_jvp
@jax.custom_batching.custom_vmap
def tie_to_tangent(primal: Array, tangent: Array) -> Array:
    """``primal``, unchanged, but computed only once ``tangent`` exists (for the scheduler).

    Adds a float zero computed from one element of ``tangent`` (:func:`fake_zero`). Under
    :func:`jax.vmap` over the K tangents only the primal's batching is kept (the zero is
    read from the whole batched tangent), so the primal is still computed once; its
    derivative is the identity in ``primal``.
    """
    return primal + fake_zero(tangent).astype(primal.dtype)


@tie_to_tangent.def_vmap  # type: ignore[attr-defined]  # custom_jvp forwards to custom_vmap
def _tie_vmap(axis_size, in_batched, primal, tangent):
    del axis_size
    return tie_to_tangent(primal, tangent), in_batched[0]


@tie_to_tangent.defjvp
def _tie_jvp(primals, tangents):
    return tie_to_tangent(*primals), tangents[0]


@dataclass(frozen=True)
class Schedule:
    """How the JVP's work is ordered for XLA; never changes a value.

    Attributes:
        anchor_draws: Lazy draws wait for their consuming operation's other input.
        tie_primal: Primal outputs of dense/conv operations wait for their tangents.

    Both read one element of an activation. Under data parallelism (batch-sharded
    activations) that read is a small collective per layer, which would break the forward
    gradient's "K+1 scalars per step" communication, so :func:`schedule_for` turns both off
    when the computation is spread over several devices.
    """

    anchor_draws: bool = True
    tie_primal: bool = True


SINGLE_DEVICE = Schedule(anchor_draws=True, tie_primal=True)
# The operations whose primal output waits for its tangent (tie_primal): the contractions,
# where activations are made and where the primal chain would otherwise run ahead.
TIED_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
MULTI_DEVICE = Schedule(anchor_draws=False, tie_primal=False)


def _mesh_size(x: Any) -> int | None:
    """Devices ``x`` is laid out over, if its own sharding says so (else ``None``)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return len(x.sharding.device_set)
    try:
        mesh = jax.typeof(x).sharding.mesh
    except (AttributeError, TypeError):
        return None
    return mesh.size if getattr(mesh, "axis_names", ()) else None


def schedule_for(primals: Sequence[Any]) -> Schedule:
    """The :class:`Schedule` for a computation over ``primals``.

    Decided from the primals' own sharding: concrete arrays and arrays traced under an
    explicit mesh say how many devices they live on; so does the mesh set with
    :func:`jax.set_mesh`. Under a plain :func:`jax.jit` of arrays sharded in auto mode the
    trace carries no sharding, and the number of visible devices decides.
    """
    sizes = [s for s in map(_mesh_size, primals) if s is not None]
    ambient = jax.sharding.get_abstract_mesh()
    if getattr(ambient, "axis_names", ()):
        sizes.append(ambient.size)
    n = max(sizes) if sizes else jax.device_count()
    return SINGLE_DEVICE if n == 1 else MULTI_DEVICE

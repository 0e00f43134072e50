"""Tapping block outputs of an unchanged Flax model, and what the taps depend on.

:class:`Taps` records the outputs of the submodules that ``boundaries`` selects (linen:
:func:`flax.linen.intercept_methods`; nnx: a per-call subclass of each matching submodule of
a copy) and continues with their ``stop_gradient``. :func:`column_of_leaves` reads from the
traced program which tapped output each parameter leaf feeds; :func:`batch_coupled` whether
an example's losses depend on the other examples (BatchNorm in training mode).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgrad_jax._dataflow import dependence

Array = jax.Array
Path = tuple[str, ...]


def path_str(path: Any) -> Path:
    # An nnx Variable's own ``.value`` entry is not part of the name the user knows.
    return tuple(str(getattr(p, "key", p)) for p in path if getattr(p, "name", None) != "value")


def matcher(boundaries: Any) -> Callable[[Path, Any], bool]:
    """``boundaries`` as a predicate on ``(path, module)``."""
    if isinstance(boundaries, type):
        boundaries = (boundaries,)
    if (
        isinstance(boundaries, tuple)
        and boundaries
        and all(isinstance(b, type) for b in boundaries)
    ):
        classes = boundaries
        return lambda path, module: isinstance(module, classes)
    if isinstance(boundaries, str):
        boundaries = [boundaries]
    if isinstance(boundaries, list) and boundaries and all(isinstance(b, str) for b in boundaries):
        wanted = {tuple(b.strip("/").split("/")) for b in boundaries}
        return lambda path, module: tuple(path) in wanted
    if callable(boundaries):
        return lambda path, module: bool(boundaries(path, module))
    raise TypeError(
        "boundaries must be a module class (e.g. boundaries=ResNetBlock), a tuple of "
        "classes, a path 'Block_0' / list of paths such as ['layers/0', 'layers/2'], or a "
        f"predicate (path, module) -> bool; got {boundaries!r}."
    )


class Taps:
    """The block outputs of one forward pass, recorded as the matched modules return."""

    active: ClassVar[list[Taps]] = []  # the recording passes, innermost last

    def __init__(self) -> None:
        self.outputs: list[Array] = []
        self.paths: list[Path] = []
        self.depth = 0

    def around(self, path: Path, call: Callable[[], Any]) -> Any:
        if self.depth:  # a boundary inside a boundary: the outer one ends the block
            return call()
        self.depth += 1
        try:
            out = call()
        finally:
            self.depth -= 1
        if not isinstance(out, jax.Array | jax.core.Tracer):
            raise TypeError(
                f"The boundary module at {'/'.join(path) or '<root>'} returned "
                f"{type(out).__name__}; a block must end in a module that returns one array. "
                "Choose boundaries whose __call__ returns the block's features."
            )
        self.outputs.append(out)
        self.paths.append(path)
        return jax.lax.stop_gradient(out)

    @contextlib.contextmanager
    def recording(self) -> Iterator[Taps]:
        Taps.active.append(self)
        try:
            yield self
        finally:
            Taps.active.pop()


# ----------------------------------------------------------------------------- linen


def linen_run(model: nn.Module, match, variables, x, rngs, mutable, kwargs):
    taps = Taps()

    def interceptor(next_fun, args, kw, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kw)
        path = tuple(module.scope.path)
        if path == () or not match(path, module):
            return next_fun(*args, **kw)
        return taps.around(path, lambda: next_fun(*args, **kw))

    with nn.intercept_methods(interceptor):
        if mutable:
            out, new_state = model.apply(variables, x, rngs=rngs, mutable=mutable, **kwargs)
        else:
            out, new_state = model.apply(variables, x, rngs=rngs, **kwargs), {}
    return out, dict(new_state), taps


# ----------------------------------------------------------------------------- nnx


@functools.cache
def _tapping_class(cls: type) -> type:
    def __call__(self, *args, **kwargs):
        call = lambda: cls.__call__(self, *args, **kwargs)
        taps = Taps.active[-1] if Taps.active else None
        return call() if taps is None else taps.around(self._fgrad_tap_path, call)

    return type(cls.__name__, (cls,), {"__call__": __call__})


def nnx_run(graphdef, params, state, match, x, kwargs):
    model = nnx.merge(graphdef, params, state, copy=True)
    swapped = []
    for path, module in nnx.iter_modules(model):
        path = path_str(path)
        if path and match(path, module):
            swapped.append((module, type(module)))
            object.__setattr__(module, "_fgrad_tap_path", path)
            object.__setattr__(module, "__class__", _tapping_class(type(module)))
    taps = Taps()
    try:
        with taps.recording():
            out = model(x, **kwargs)
    finally:
        for module, cls in swapped:
            object.__setattr__(module, "__class__", cls)
            object.__delattr__(module, "_fgrad_tap_path")
    new_state = nnx.state(model, nnx.Not(nnx.Param))
    return out, new_state, taps


# ----------------------------------------------------------------------------- columns


def column_of_leaves(run: Callable[[list[Array]], list[Array]], leaves: list[Any]) -> list[int]:
    """For every leaf, the one output of ``run`` (block outputs, then the model's) it feeds."""
    closed = jax.make_jaxpr(run)(leaves)
    masks = dependence(closed.jaxpr, [1 << i for i in range(len(leaves))])
    columns = []
    for i in range(len(leaves)):
        reached = [j for j, m in enumerate(masks) if m >> i & 1]
        if len(reached) > 1:
            raise ValueError(
                f"A model parameter (leaf {i}) feeds the outputs of blocks {reached}: with "
                "local losses each parameter must belong to one block. This happens when a "
                "layer is shared between blocks or a connection skips over a boundary; "
                "choose boundaries that contain both ends of such connections."
            )
        columns.append(reached[0] if reached else len(masks) - 1)
    return columns


def batch_coupled(losses: Callable[[Any, Array], Array], params: Any, x: Array) -> bool:
    """Whether changing example 0 changes another example's losses, on a stand-in batch of
    four examples (and stand-in parameters when they are traced, e.g. init under jit or
    vmap): coupling is a property of the program, not of the values."""
    params = stand_ins(params)
    x = jnp.asarray(stand_in_batch(x))
    run = jax.jit(losses)
    before = run(params, x)
    after = run(params, x.at[0].add(1.0))
    change = jnp.max(jnp.abs(after[1:] - before[1:]))
    return bool(change > 1e-6 * (1.0 + jnp.max(jnp.abs(before))))


def stand_ins(tree: Any) -> Any:
    """``tree`` itself when it is concrete; else random stand-ins of its shapes (positive, so
    that variances stay valid): for checks that read values while init is traced."""
    if not any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(tree)):
        return tree
    rng = np.random.default_rng(7919)

    def stand_in(a):
        dtype = jnp.result_type(a)
        if not jnp.issubdtype(dtype, jnp.floating):
            return jnp.zeros(jnp.shape(a), dtype)
        return jnp.asarray(0.5 + np.abs(rng.standard_normal(jnp.shape(a))), dtype)

    return jax.tree.map(stand_in, tree)


def probe_values(leaves: Any) -> Any:
    """Parameter values for the separability probe: ``leaves`` (or their stand-ins when
    traced) moved by seeded noise of a tenth of each leaf's RMS (at least 1e-2). Which ops
    mix patches or groups is a property of the model, not of its starting values: a
    zero-initialised BatchNorm scale or LoRA ``lora_b`` would otherwise hide the path that
    mixes them, and the split would be biased as soon as training moved that value."""
    rng = np.random.default_rng(104729)

    def move(a):
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            return a
        a32 = np.asarray(a, np.float32)
        scale = 0.1 * float(np.sqrt(np.mean(np.square(a32)))) if a32.size else 0.0
        noise = max(scale, 1e-2) * rng.standard_normal(a32.shape)
        return jnp.asarray(a32 + noise, jnp.result_type(a))

    return jax.tree.map(move, stand_ins(leaves))


def stand_in_batch(x: Any, size: int = 4) -> np.ndarray:
    """``size`` random examples shaped like ``x``'s, drawn by numpy: XLA:CPU spends seconds
    compiling ``jax.random`` draws of small 4-D shapes (images), numpy none."""
    shape = (size, *jnp.shape(x)[1:])
    return np.random.default_rng(7).standard_normal(shape).astype(jnp.result_type(x))

"""Block-local losses on an unchanged Flax model: blocks end where ``boundaries`` say.

The user's module (linen or nnx) runs as it is. Every call of a submodule that
``boundaries`` selects is intercepted (linen: :func:`flax.linen.intercept_methods`; nnx:
the matching submodules of a per-call copy get a subclass whose ``__call__`` taps): its
output ``h_l`` is recorded for block ``l``'s head and ``stop_gradient(h_l)`` continues
through the model. Everything computed between two taps is one block, whatever it holds
(several layers, residual connections, normalisation, attention); the code after the last
tap is the last block, scored by the model's own loss. The user's parameter tree, names
and checkpoints stay as they are: the parameters are ``{"model": <the model's>, "heads":
[...]}``. Which loss column each model parameter feeds is read from the traced program
(the taps' dependence on each leaf), not from the module names.

Mutable collections (linen ``batch_stats``, nnx ``BatchStat`` and RNG counters) travel in
``state``: every local-loss step returns the state its forward pass produced.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.extend import core as jcore

from fgrad_jax import _interpreter
from fgrad_jax._activity import PERTURB, ActivityPerturbation
from fgrad_jax._flax import split_wrt
from fgrad_jax._tangents import HASHED
from fgrad_jax._transform import forward_gradient

Array = jax.Array
Path = tuple[str, ...]


class LocalVariables(NamedTuple):
    """What :meth:`ModelLocalLosses.init` returns.

    Attributes:
        params: ``{"model": <the model's parameters>, "heads": [one dict per tapped block]}``:
            what the optimizer trains.
        state: The model's other variables (linen: every collection but ``params``, e.g.
            ``{"batch_stats": ...}``; nnx: every variable but ``nnx.Param``), updated by
            each step; ``{}`` when there are none.
    """

    params: dict[str, Any]
    state: Any


class LocalAux(NamedTuple):
    """What one local-loss pass reports besides the per-example losses.

    Attributes:
        state: The model state after this forward pass (new BatchNorm statistics, RNG
            counters): pass it to the next step.
        block_losses: ``(L,)`` mean loss of every block (the last is the model's own).
        loss: The model's own mean loss on the batch (its output under ``loss``).
        accuracy: Fraction of the batch whose largest output is the label (NaN when the
            labels are not integer class indices of shape ``(B,)``).
    """

    state: Any
    block_losses: Array
    loss: Array
    accuracy: Array


def _path_str(path: Any) -> Path:
    return tuple(str(getattr(p, "key", p)) for p in path)


def _matcher(boundaries: Any) -> Callable[[Path, Any], bool]:
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


class _Taps:
    """The block outputs of one forward pass, recorded as the matched modules return."""

    active: ClassVar[list[_Taps]] = []  # the recording passes, innermost last

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
    def recording(self) -> Iterator[_Taps]:
        _Taps.active.append(self)
        try:
            yield self
        finally:
            _Taps.active.pop()


# ----------------------------------------------------------------------------- linen


def _linen_run(model: nn.Module, match, variables, x, rngs, mutable, kwargs):
    taps = _Taps()

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
        taps = _Taps.active[-1] if _Taps.active else None
        return call() if taps is None else taps.around(self._fgrad_tap_path, call)

    return type(cls.__name__, (cls,), {"__call__": __call__})


def _nnx_run(graphdef, params, state, match, x, kwargs):
    model = nnx.merge(graphdef, params, state, copy=True)
    swapped = []
    for path, module in nnx.iter_modules(model):
        path = _path_str(path)
        if path and match(path, module):
            swapped.append((module, type(module)))
            object.__setattr__(module, "_fgrad_tap_path", path)
            object.__setattr__(module, "__class__", _tapping_class(type(module)))
    taps = _Taps()
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


def _dependence(jaxpr: Any, in_masks: list[int]) -> list[int]:
    """Per output of ``jaxpr``: the bitmask of the inputs it depends on, through every
    equation but ``stop_gradient`` (inlined calls are followed; loops and other
    higher-order primitives are taken as depending on all their inputs)."""
    env: dict[Any, int] = dict(zip(jaxpr.invars, in_masks))

    def read(v: Any) -> int:
        return 0 if isinstance(v, jcore.Literal) else env.get(v, 0)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive.name == "stop_gradient":
            outs = [0] * len(eqn.outvars)
        else:
            inner = _interpreter._inline_jaxpr(eqn)
            body = getattr(inner, "jaxpr", inner)
            if body is not None and len(body.invars) == len(ins):
                outs = _dependence(body, ins)
            else:
                outs = [functools.reduce(lambda a, b: a | b, ins, 0)] * len(eqn.outvars)
        for v, m in zip(eqn.outvars, outs):
            env[v] = m
    return [read(v) for v in jaxpr.outvars]


def _column_of_leaves(run: Callable[[list[Array]], list[Array]], leaves: list[Any]) -> list[int]:
    """For every leaf, the one output of ``run`` (block outputs, then the model's) it feeds."""
    closed = jax.make_jaxpr(run)(leaves)
    masks = _dependence(closed.jaxpr, [1 << i for i in range(len(leaves))])
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


# ----------------------------------------------------------------------------- the losses


def _default_head_init(key: Array, features: int, num_classes: int) -> dict[str, Array]:
    kernel = jax.random.normal(key, (features, num_classes)) / np.sqrt(features)
    return {"kernel": kernel.astype(jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}


def _pool(h: Array) -> Array:
    """Global average over every axis but the batch (first) and the features (last)."""
    if h.ndim == 1:
        return h[:, None]
    return jnp.mean(h, axis=tuple(range(1, h.ndim - 1))) if h.ndim > 2 else h


class _Layout(NamedTuple):
    paths: tuple[Path, ...]  # the tapped modules, in call order
    columns: tuple[int, ...]  # per leaf of params["model"]: its loss column
    aux: Any  # LocalAux of ShapeDtypeStructs (forward_gradient's aux_example)
    coupled: bool  # an example's losses depend on other examples (BatchNorm in training)


class ModelLocalLosses:
    """A Flax model trained with block-local losses; made by :func:`local_losses` with
    ``boundaries=`` (see ``docs/local_losses.md``).

    Example:
        >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
        >>> import fgrad_jax
        >>> class Block(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train=True):
        ...         h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        ...         return x + nn.relu(h)
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train=True):
        ...         x = Block()(nn.Dense(8)(x), train)
        ...         return nn.Dense(3)(Block()(x, train))
        >>> local = fgrad_jax.local_losses(Net(), 3, boundaries=Block)
        >>> x, y = jnp.ones((16, 4)), jnp.zeros(16, jnp.int32)
        >>> params, batch_stats = local.init(jax.random.key(0), x, train=True)
        >>> local.block_paths, local.batch_coupled
        ((('Block_0',), ('Block_1',)), True)
        >>> tx = optax.chain(local.forward_gradient(key=0, num_tangents=4), optax.adam(1e-2))
        >>> opt_state = tx.init(params)
        >>> value_fn = local.value_fn(x, y, batch_stats, train=True)
        >>> updates, opt_state = tx.update(None, opt_state, params, value_fn=value_fn)
        >>> aux = fgrad_jax.forward_gradient_state(opt_state).aux  # this step's LocalAux
        >>> aux.block_losses.shape, sorted(aux.state)
        ((3,), ['batch_stats'])
    """

    def __init__(self, model: Any, num_classes: int, loss: Callable, boundaries: Any):
        if not isinstance(model, nn.Module | nnx.Module):
            raise TypeError(
                "local_losses(model, ..., boundaries=...) needs a flax.linen or flax.nnx "
                f"module; got {type(model).__name__}."
            )
        self.model: Any = model
        self.num_classes, self.loss = int(num_classes), loss
        self.boundaries, self._match = boundaries, _matcher(boundaries)
        self._linen = isinstance(model, nn.Module)
        self._graphdef: Any = None
        self._layout: _Layout | None = None

    # -- running the model ------------------------------------------------------------

    def _run(self, model_params, state, x, rngs, kwargs):
        if self._linen:
            variables = {"params": model_params, **(state or {})}
            mutable = sorted(state) if state else False
            return _linen_run(self.model, self._match, variables, x, rngs, mutable, kwargs)
        if rngs is not None:
            raise TypeError(
                "rngs= is for linen models; an nnx model draws from the nnx.Rngs it holds "
                "(their counters travel in the state)."
            )
        return _nnx_run(self._graphdef, model_params, state, self._match, x, kwargs)

    def init(self, key: Array, x: Array, **kwargs: Any) -> LocalVariables:
        """The model's parameters (linen: initialised from ``key``; nnx: the module's
        current values), its state, and fresh heads; records where the blocks end and
        which loss column each parameter feeds. ``kwargs`` go to the model's call (e.g.
        ``train=True``)."""
        k_model, k_drop, k_heads = jax.random.split(key, 3)
        state: Any
        if self._linen:
            init = jax.jit(functools.partial(self.model.init, **kwargs))  # one compile
            variables = dict(init({"params": k_model, "dropout": k_drop}, x))
            model_params, state = variables.pop("params"), variables
        else:
            self._graphdef, model_params, state = split_wrt(self.model, nnx.Param)
        rngs = {"dropout": k_drop} if self._linen else None
        found: list[_Taps] = []

        def shapes(p):
            o, _, t = self._run(p, state, x, rngs, kwargs)
            found.append(t)
            return o, t.outputs

        out, outputs = jax.eval_shape(shapes, model_params)
        taps = found[0]
        if not outputs:
            raise ValueError(
                f"boundaries={self.boundaries!r} selects no submodule called by "
                f"{type(self.model).__name__}: nothing ends a block. Pass the class of the "
                "model's blocks (e.g. ResNetBlock) or their paths."
            )
        if jnp.shape(out) != (jnp.shape(x)[0], self.num_classes):
            raise ValueError(
                f"The model's output has shape {jnp.shape(out)}; the last block is scored by "
                f"the model's own loss and needs (batch, num_classes) = "
                f"({jnp.shape(x)[0]}, {self.num_classes})."
            )
        keys = jax.random.split(k_heads, len(outputs))
        heads = [
            _default_head_init(k, h.shape[-1] if h.ndim > 1 else 1, self.num_classes)
            for k, h in zip(keys, outputs)
        ]
        params = {"model": model_params, "heads": heads}
        leaves, treedef = jax.tree_util.tree_flatten(model_params)

        def run_outputs(flat):
            p = jax.tree_util.tree_unflatten(treedef, flat)
            o, _, t = self._run(p, state, x, rngs, kwargs)
            return [*t.outputs, o]

        columns = tuple(_column_of_leaves(run_outputs, leaves))
        y = jnp.zeros(jnp.shape(x)[:1], jnp.int32)
        self._layout = _Layout(tuple(taps.paths), columns, None, False)
        with jax.ensure_compile_time_eval():  # concrete even when init is traced
            y4 = jnp.zeros((4,), jnp.int32)
            probe_rngs = {"dropout": jax.random.key(0)} if self._linen else None
            coupled = _batch_coupled(
                lambda ps, xs: self.losses(ps[0], xs, y4, ps[1], rngs=probe_rngs, **kwargs)[0],
                (params, state),
                x,
            )
        self._layout = self._layout._replace(coupled=coupled)
        aux = jax.eval_shape(lambda p: self.losses(p, x, y, state, rngs=rngs, **kwargs)[1], params)
        self._layout = self._layout._replace(aux=aux)
        return LocalVariables(params, state)

    def _checked_layout(self) -> _Layout:
        if self._layout is None:
            raise ValueError("Call init(key, x) first: it creates the heads' parameters.")
        return self._layout

    @property
    def batch_coupled(self) -> bool:
        """Whether an example's losses depend on the other examples of the batch (found at
        :meth:`init` by changing one example; BatchNorm in training mode does this). The
        activity-perturbed estimate then scores every perturbation by the whole batch's
        derivative, which keeps it unbiased (see ``docs/local_losses.md``)."""
        return self._checked_layout().coupled

    @property
    def block_paths(self) -> tuple[Path, ...]:
        """The modules whose outputs end the blocks, in call order (after :meth:`init`)."""
        return self._checked_layout().paths

    def losses(
        self, params: Any, x: Array, y: Array, state: Any = None, *, rngs: Any = None, **kwargs
    ) -> tuple[Array, LocalAux]:
        """Per-example local losses ``(B, L)`` (column ``l``: block ``l``'s head, the last
        column the model's own loss) and the :class:`LocalAux` of the same pass. ``rngs``:
        linen's ``apply(rngs=...)`` (e.g. ``{"dropout": key}``); ``kwargs`` go to the
        model's call (e.g. ``train=True``)."""
        layout = self._checked_layout()
        out, new_state, taps = self._run(params["model"], state, x, rngs, kwargs)
        if len(taps.outputs) != len(params["heads"]):
            raise ValueError(
                f"This pass ended {len(taps.outputs)} blocks but the parameters have "
                f"{len(params['heads'])} heads (init saw {list(layout.paths)}); call the "
                "model with the arguments given to init."
            )
        cols = [self.loss(_head(hp, h), y) for hp, h in zip(params["heads"], taps.outputs)]
        cols.append(self.loss(out, y))
        table = jnp.stack(cols, axis=1)
        block = jnp.mean(table.astype(jnp.float32), axis=0)
        return table, LocalAux(new_state, block, block[-1], _accuracy(out, y))

    def value_fn(
        self, x: Array, y: Array, state: Any = None, *, rngs: Any = None, **kwargs
    ) -> Callable[[Any], tuple[Array, LocalAux]]:
        """``value_fn(params) -> (losses, aux)`` for ``update(..., value_fn=...)`` of
        :meth:`forward_gradient`."""
        return lambda params: self.losses(params, x, y, state, rngs=rngs, **kwargs)

    def predict(self, params: Any, x: Array, state: Any = None, **kwargs: Any) -> Array:
        """The model's own output (pass e.g. ``train=False`` for evaluation)."""
        if self._linen:
            variables = {"params": params["model"], **(state or {})}
            return cast(Array, self.model.apply(variables, x, **kwargs))
        return nnx.merge(self._graphdef, params["model"], state, copy=True)(x, **kwargs)

    def groups(self, params: Any) -> dict[str, Any]:
        """The loss column of every parameter leaf (tree like ``params``)."""
        layout = self._checked_layout()
        treedef = jax.tree_util.tree_structure(params["model"])
        return {
            "model": jax.tree_util.tree_unflatten(treedef, list(layout.columns)),
            "heads": [jax.tree.map(lambda _, j=j: j, h) for j, h in enumerate(params["heads"])],
        }

    def tangent(
        self, perturb: str = "activations", tangent: str = "rademacher"
    ) -> ActivityPerturbation:
        """The tangent strategy: every leaf estimated from its own block's loss column."""
        if perturb not in PERTURB:
            raise ValueError(f"perturb must be one of {PERTURB}; got {perturb!r}.")
        if tangent not in HASHED:
            raise ValueError(f"tangent must be one of {sorted(HASHED)}; got {tangent!r}.")
        coupled = self._checked_layout().coupled
        return ActivityPerturbation(
            HASHED[tangent], perturb == "activations", self.groups, batch_coupled=coupled
        )

    def forward_gradient(
        self,
        key: int | Array = 0,
        *,
        num_tangents: int = 1,
        perturb: str = "activations",
        tangent: str = "rademacher",
        tangent_chunk: int | None = None,
    ) -> optax.GradientTransformationExtraArgs:
        """:func:`fgrad_jax.forward_gradient` with the local-loss tangents and
        ``has_aux=True``: after each update ``forward_gradient_state(opt_state).aux`` is
        the step's :class:`LocalAux` (new state, per-block losses, the model's loss,
        accuracy); ``.value`` is the sum over blocks of the mean losses."""
        return forward_gradient(
            key,
            num_tangents=num_tangents,
            tangent=self.tangent(perturb, tangent),
            tangent_chunk=tangent_chunk,
            has_aux=True,
            aux_example=self._checked_layout().aux,
        )

    def update_model(self, params: Any, state: Any = None) -> None:
        """nnx: writes the parameters (and state) into the user's module; linen: no-op."""
        if not self._linen:
            nnx.update(self.model, params["model"], *([state] if state is not None else []))


def _accuracy(out: Array, y: Array) -> Array:
    if out.ndim != 2 or jnp.shape(y) != out.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
        return jnp.float32(jnp.nan)
    return jnp.mean((jnp.argmax(out, axis=-1) == y).astype(jnp.float32))


def _batch_coupled(losses: Callable[[Any, Array], Array], params: Any, x: Array) -> bool:
    """Whether changing example 0 changes another example's losses, on a stand-in batch of
    four examples (and stand-in parameters when they are traced, e.g. init under jit or
    vmap): coupling is a property of the program, not of the values."""
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(params)):
        keys = iter(jax.random.split(jax.random.key(7919), len(jax.tree.leaves(params))))

        def stand_in(a):
            k, dtype = next(keys), jnp.result_type(a)
            if not jnp.issubdtype(dtype, jnp.floating):
                return jnp.zeros(jnp.shape(a), dtype)
            return 0.5 + jnp.abs(jax.random.normal(k, jnp.shape(a), dtype))  # > 0: variances

        params = jax.tree.map(stand_in, params)
    x = jax.random.normal(jax.random.key(7), (4, *jnp.shape(x)[1:]), jnp.result_type(x))
    run = jax.jit(losses)
    before = run(params, x)
    after = run(params, x.at[0].add(1.0))
    change = jnp.max(jnp.abs(after[1:] - before[1:]))
    return bool(change > 1e-6 * (1.0 + jnp.max(jnp.abs(before))))


def _head(params: dict[str, Array], h: Array) -> Array:
    return _pool(h) @ params["kernel"] + params["bias"]

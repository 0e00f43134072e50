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

import copy
import functools
from collections.abc import Callable
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fgrad_jax._activity import ActivityPerturbation
from fgrad_jax._flax import split_wrt
from fgrad_jax._local import split as _split
from fgrad_jax._local.common import (
    BATCH_COUPLING,
    Layout,
    LocalAux,
    LocalVariables,
    accuracy,
    local_tangent_base,
)
from fgrad_jax._local.heads import apply_head, head_kind, init_head
from fgrad_jax._local.taps import (
    Taps,
    batch_coupled,
    column_of_leaves,
    linen_run,
    matcher,
    nnx_run,
    path_str,
    probe_values,
    stand_in_batch,
    stand_ins,
)
from fgrad_jax._transform import forward_gradient

Array = jax.Array
Path = tuple[str, ...]


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
        >>> params, batch_stats, local = local.init(jax.random.key(0), x, train=True)
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

    def __init__(
        self,
        model: Any,
        num_classes: int,
        loss: Callable,
        boundaries: Any,
        batch_coupling: str = "correct",
        patches: Any = None,
        groups: Any = 1,
        head: Any = None,
    ):
        if batch_coupling not in BATCH_COUPLING:
            raise ValueError(
                f"batch_coupling must be one of {BATCH_COUPLING}; got {batch_coupling!r}."
            )
        self.batch_coupling = batch_coupling
        if not isinstance(model, nn.Module | nnx.Module):
            raise TypeError(
                "local_losses(model, ..., boundaries=...) needs a flax.linen or flax.nnx "
                f"module; got {type(model).__name__}."
            )
        self.model: Any = model
        self.num_classes, self.loss = int(num_classes), loss
        self.boundaries, self._match = boundaries, matcher(boundaries)
        self.patches, self.groups_per_block, self.head = patches, groups, head
        self._linen = isinstance(model, nn.Module)
        # Set only on the copy that init returns; never changed afterwards.
        self._graphdef: Any = None
        self._layout: Layout | None = None
        # Memos shared by the copies (pure functions of their keys): the layout per init
        # signature, and linen's jitted model.init per call signature.
        self._layouts: dict[Any, Layout] = {}
        self._inits: dict[str, Any] = {}

    # -- running the model ------------------------------------------------------------

    def _run(self, model_params, state, x, rngs, kwargs):
        if self._linen:
            variables = {"params": model_params, **(state or {})}
            mutable = sorted(state) if state else False
            return linen_run(self.model, self._match, variables, x, rngs, mutable, kwargs)
        if rngs is not None:
            raise TypeError(
                "rngs= is for linen models; an nnx model draws from the nnx.Rngs it holds "
                "(their counters travel in the state)."
            )
        return nnx_run(self._graphdef, model_params, state, self._match, x, kwargs)

    def init(self, key: Array, x: Array, **kwargs: Any) -> LocalVariables:
        """The model's parameters (linen: initialised from ``key``; nnx: the module's
        current values), its state, fresh heads, and a copy of this object that knows
        where the blocks end and which loss column each parameter feeds:
        ``params, state, local = local.init(key, x)``. ``kwargs`` go to the model's call
        (e.g. ``train=True``). This object is not changed; the analysis runs once per
        input shape and ``kwargs`` (later calls with new seeds only initialise)."""
        return copy.copy(self)._initialise(key, x, kwargs)

    def _initialise(self, key: Array, x: Array, kwargs: dict[str, Any]) -> LocalVariables:
        """:meth:`init` on the fresh copy that it returns (the only time a copy changes)."""
        self._layout = None
        k_model, k_drop, k_heads = jax.random.split(key, 3)
        state: Any
        if self._linen:
            call = repr(sorted(kwargs.items()))
            if call not in self._inits:  # one compile per call signature
                self._inits[call] = jax.jit(functools.partial(self.model.init, **kwargs))
            variables = dict(self._inits[call]({"params": k_model, "dropout": k_drop}, x))
            model_params, state = variables.pop("params"), variables
        else:
            self._graphdef, model_params, state = split_wrt(self.model, nnx.Param)
        rngs = {"dropout": k_drop} if self._linen else None
        found: list[Taps] = []

        def shapes(p):
            o, _, t = self._run(p, state, x, rngs, kwargs)
            found.append(t)
            return o, t.outputs

        out, outputs = jax.eval_shape(shapes, model_params)
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
        if isinstance(self.head, (list, tuple)) and len(self.head) != len(outputs):
            raise ValueError(
                f"head has {len(self.head)} entries but boundaries selects {len(outputs)} "
                "blocks; give one head (or None) per tapped block."
            )
        heads = [
            init_head(head_kind(self.head, i), k, h, self.num_classes)
            for i, (k, h) in enumerate(zip(keys, outputs))
        ]
        params = {"model": model_params, "heads": heads}
        signature = (
            tuple(jnp.shape(x)[1:]),
            str(jnp.result_type(x)),
            repr(sorted(kwargs.items())),
            jax.tree_util.tree_structure((model_params, state)),
            tuple(jnp.shape(a) for a in jax.tree.leaves((model_params, state))),
        )
        if signature not in self._layouts:
            self._layouts[signature] = self._analyse(
                params, state, x, rngs, kwargs, found[0].paths, outputs
            )
        self._layout = self._layouts[signature]
        return LocalVariables(params, state, self)

    def _analyse(self, params, state, x, rngs, kwargs, tapped_paths, outputs) -> Layout:
        """Where the blocks end, each parameter's block, the splits, the coupling."""
        model_params = params["model"]
        leaves, treedef = jax.tree_util.tree_flatten(model_params)

        def run_outputs(flat):
            p = jax.tree_util.tree_unflatten(treedef, flat)
            o, _, t = self._run(p, state, x, rngs, kwargs)
            return [*t.outputs, o]

        blocks = tuple(column_of_leaves(run_outputs, leaves))
        splits = self._splits([h.shape for h in outputs])
        paths = tuple(
            "/".join(path_str(p)) for p, _ in jax.tree_util.tree_flatten_with_path(model_params)[0]
        )
        layout = Layout(tuple(tapped_paths), blocks, splits, frozenset(), paths, None, False)
        with jax.ensure_compile_time_eval():  # concrete even when init is traced
            probe_rngs = {"dropout": jax.random.key(0)} if self._linen else None
            if any(int(np.prod(grid)) * g > 1 for grid, g in splits):
                probe_leaves, probe_state = probe_values(leaves), stand_ins(state)
                xs = jnp.asarray(stand_in_batch(x))

                def tapped(flat):
                    p = jax.tree_util.tree_unflatten(treedef, flat)
                    return self._run(p, probe_state, xs, probe_rngs, kwargs)[2].outputs

                per_example = self.batch_coupling == "per_example"
                split_leaves = _split.separable_leaves(
                    tapped, probe_leaves, 4, blocks, splits, 7919, per_example
                ).split
                layout = layout._replace(split_leaves=split_leaves)
            self._layout = layout  # losses() below reads the columns
            y4 = jnp.zeros((4,), jnp.int32)
            coupled = batch_coupled(
                lambda ps, xs: self.losses(ps[0], xs, y4, ps[1], rngs=probe_rngs, **kwargs)[0],
                (params, state),
                x,
            )
        self._layout = layout = layout._replace(coupled=coupled)
        y = jnp.zeros(jnp.shape(x)[:1], jnp.int32)
        aux = jax.eval_shape(lambda p: self.losses(p, x, y, state, rngs=rngs, **kwargs)[1], params)
        return layout._replace(aux=aux)

    def _splits(self, shapes: list[tuple[int, ...]]) -> tuple[tuple[tuple[int, ...], int], ...]:
        """(patch grid, groups) of every tapped block, from ``patches=`` / ``groups=``."""
        what = "tapped blocks (one per module that boundaries selects)"
        _split.check_spec(self.patches, "patches", len(shapes), what)
        _split.check_spec(self.groups_per_block, "groups", len(shapes), what)
        splits = tuple(
            _split.block_layout(
                i,
                shape,
                self.patches,
                self.groups_per_block,
                "default" if head_kind(self.head, i) == "default" else "custom",
            )
            for i, shape in enumerate(shapes)
        )
        scalar = self.patches is not None and not isinstance(self.patches, list)
        if scalar and self.patches != 1 and all(int(np.prod(grid)) == 1 for grid, _ in splits):
            raise ValueError(
                f"patches={self.patches!r}: no block output has spatial axes (B, H, W, C) to "
                "split into patches. Use patches=None, or boundaries inside the conv stages."
            )
        return splits

    def _checked_layout(self) -> Layout:
        if self._layout is None:
            raise ValueError(
                "This object has no layout yet: use the one init returns, "
                "params, state, local = local.init(key, x)."
            )
        return self._layout

    @property
    def batch_coupled(self) -> bool:
        """Whether an example's losses depend on the other examples of the batch (found at
        :meth:`init` by changing one example; BatchNorm in training mode does this). The
        activity-perturbed estimate then scores every perturbation by the whole batch's
        derivative, which keeps it unbiased (see ``docs/local_losses.md``)."""
        return self._checked_layout().coupled

    @property
    def block_splits(self) -> tuple[tuple[tuple[int, ...], int], ...]:
        """Per tapped block, ``(patches per spatial axis, channel groups)`` (after :meth:`init`)."""
        return self._checked_layout().splits

    @property
    def split_params(self) -> tuple[str, ...]:
        """The model parameters (paths) whose dense/conv outputs are scored per patch/group
        column. A split block's other parameters are scored by the block's whole loss:
        unbiased too, without the variance reduction; e.g. a residual block's first conv,
        whose output the second conv mixes across channels and positions."""
        layout = self._checked_layout()
        return tuple(p for i, p in enumerate(layout.leaf_paths) if i in layout.split_leaves)

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
        cols = []
        for i, (hp, h, (grid, g)) in enumerate(zip(params["heads"], taps.outputs, layout.splits)):
            if int(np.prod(grid, dtype=np.int64)) * g == 1:
                cols.append(self.loss(apply_head(head_kind(self.head, i), hp, h), y)[:, None])
            else:
                cols.append(
                    _split.split_columns(hp["kernel"], hp["bias"], h, y, self.loss, grid, g)
                )
        cols.append(self.loss(out, y)[:, None])
        table = jnp.concatenate(cols, axis=1)
        sizes = [int(np.prod(grid, dtype=np.int64)) * g for grid, g in layout.splits] + [1]
        block = _split.block_means(table, sizes)
        return table, LocalAux(new_state, block, block[-1], accuracy(out, y))

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

    def columns(self, params: Any) -> dict[str, Any]:
        """The loss column of every parameter leaf (tree like ``params``)."""
        layout = self._checked_layout()
        treedef = jax.tree_util.tree_structure(params["model"])
        model = [layout.spec(b, i in layout.split_leaves) for i, b in enumerate(layout.blocks)]
        return {
            "model": jax.tree_util.tree_unflatten(treedef, model),
            "heads": [
                jax.tree.map(lambda _, j=j: layout.spec(j, False), h)
                for j, h in enumerate(params["heads"])
            ],
        }

    def tangent(
        self, perturb: str = "activations", tangent: str = "rademacher"
    ) -> ActivityPerturbation:
        """The tangent strategy: every leaf estimated from its own block's loss column."""
        base = local_tangent_base(perturb, tangent)
        coupled = self._checked_layout().coupled and self.batch_coupling == "correct"
        return ActivityPerturbation(base, perturb, self.columns, batch_coupled=coupled)

    def forward_gradient(
        self,
        key: int | Array = 0,
        *,
        num_tangents: int = 1,
        perturb: str = "activations",
        tangent: str = "rademacher",
        tangent_chunk: int | None = None,
        mask: Any = None,
        on_nonfinite: str = "zero",
    ) -> optax.GradientTransformationExtraArgs:
        """:func:`fgrad_jax.forward_gradient` with the local-loss tangents and
        ``has_aux=True``: after each update ``forward_gradient_state(opt_state).aux`` is
        the step's :class:`LocalAux` (new state, per-block losses, the model's loss,
        accuracy); ``.value`` is the sum over blocks of the mean losses. ``mask`` (over
        :meth:`init`'s ``{"model", "heads"}`` tree, or a callable on it) freezes leaves: no
        tangents, zero updates, e.g. a pretrained base. ``on_nonfinite`` is passed on."""
        return forward_gradient(
            key, num_tangents=num_tangents, tangent=self.tangent(perturb, tangent),
            tangent_chunk=tangent_chunk, has_aux=True, aux_example=self._checked_layout().aux,
            mask=mask, on_nonfinite=on_nonfinite,
        )  # fmt: skip

    def update_model(self, params: Any, state: Any = None) -> None:
        """nnx: writes the parameters (and state) into the user's module; linen: no-op."""
        if not self._linen:
            nnx.update(self.model, params["model"], *([state] if state is not None else []))

"""Diagnostics of gradient estimators: alignment, signal-to-noise ratio, variance.

For papers and debugging, not for training: :func:`true_gradient` runs a backward pass.
All functions take pytrees (every floating leaf counts; integer and bool leaves are
ignored) and return float32 arrays, so they work under :func:`jax.jit`.

The quantities, for an estimator ``g`` of ``∇f`` with ``d`` parameters:

* cosine similarity ``⟨g, ∇f⟩ / (|g| |∇f|)``; for the isotropic forward gradient with ``K``
  tangents it is about ``sqrt(K / d)``;
* total variance ``E|g − E g|²`` (the trace of the covariance); for the forward gradient
  of a linear ``f = aᵀθ`` with ``K = 1``: ``(d − 1)|a|²`` with Rademacher tangents and
  ``(d + 1)|a|²`` with Gaussian ones;
* per-leaf signal-to-noise ratio ``|∇f_L|² / E|g_L − ∇f_L|²`` for each leaf ``L``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgrad_jax._activity import perturbation_of_leaves
from fgrad_jax._sharding import collective_bytes as _hlo_collective_bytes
from fgrad_jax._spec import as_key, is_differentiable

Array = jax.Array

__all__ = [
    "VarianceReport",
    "collective_bytes",
    "cosine_similarity",
    "estimator_variance",
    "perturbation_report",
    "snr_per_leaf",
    "true_gradient",
]


def _float_leaves(tree: Any) -> list[Array]:
    return [
        jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(tree) if is_differentiable(x)
    ]


def _check_same(a: Any, b: Any, what: str) -> None:
    # Any: jaxlib ships no type stub for PyTreeDef (mypy cannot compare it).
    sa: Any = jax.tree_util.tree_structure(a)
    sb: Any = jax.tree_util.tree_structure(b)
    if sa != sb:
        raise ValueError(f"{what} must have the same pytree structure; got {sa} and {sb}.")


def true_gradient(fun: Callable[..., Any], *args: Any, argnums: int = 0, **kwargs: Any) -> Any:
    """The exact gradient by :func:`jax.grad` (a backward pass), for diagnosis only.

    Args:
        fun: Scalar function.
        *args: Its positional arguments.
        argnums: Which argument to differentiate.
        **kwargs: Its keyword arguments.

    Returns:
        ``jax.grad(fun, argnums)(*args, **kwargs)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from fgrad_jax import diagnostics
        >>> diagnostics.true_gradient(lambda w: jnp.sum(w ** 2), jnp.ones(2))
        Array([2., 2.], dtype=float32)
    """
    return jax.grad(fun, argnums)(*args, **kwargs)


def cosine_similarity(estimate: Any, true_grad: Any) -> Array:
    """``⟨estimate, true_grad⟩ / (|estimate| |true_grad|)`` over all floating leaves together.

    Args:
        estimate: A gradient estimate (pytree).
        true_grad: The reference gradient, same structure.

    Returns:
        A float32 scalar in ``[-1, 1]``; NaN when either norm is zero (undefined).

    Example:
        >>> import jax.numpy as jnp
        >>> from fgrad_jax import diagnostics
        >>> est = {"a": jnp.array([1.0, 0.0]), "b": jnp.array(1.0)}
        >>> ref = {"a": jnp.array([1.0, 1.0]), "b": jnp.array(0.0)}
        >>> round(float(diagnostics.cosine_similarity(est, ref)), 4)  # 1 / (sqrt 2 · sqrt 2)
        0.5
    """
    _check_same(estimate, true_grad, "estimate and true_grad")
    e, g = _float_leaves(estimate), _float_leaves(true_grad)
    dot = sum(jnp.vdot(x, y) for x, y in zip(e, g))
    norms = jnp.sqrt(sum(jnp.vdot(x, x) for x in e) * sum(jnp.vdot(y, y) for y in g))
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), jnp.nan)


def snr_per_leaf(estimates: Any, true_grad: Any | None = None) -> Any:
    """Signal-to-noise ratio of each leaf from stacked estimates.

    With ``true_grad``: ``|∇f_L|² / mean_s |g_s,L − ∇f_L|²`` (the noise is the mean squared
    error, bias included). Without: ``|ḡ_L|² / tr Cov_L`` from the samples alone (sample
    mean ``ḡ``, unbiased sample covariance; ``|ḡ|²`` overestimates ``|E g|²`` by
    ``tr Cov / S``).

    Args:
        estimates: Estimates stacked on a leading axis of size ``S`` (e.g. from
            :func:`jax.vmap` over keys), the gradient's structure otherwise.
        true_grad: Optional exact gradient, same structure without the ``S`` axis.

    Returns:
        A pytree of float32 scalars, one per floating leaf (integer leaves get NaN).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import fgrad_jax
        >>> from fgrad_jax import diagnostics
        >>> f = lambda p: jnp.dot(p["w"], jnp.ones(3)) + 2.0 * p["b"]
        >>> p = {"w": jnp.zeros(3), "b": jnp.zeros(())}
        >>> est = jax.vmap(lambda k: fgrad_jax.forward_grad(f, tangent="rademacher")(k, p))(
        ...     jax.random.split(jax.random.key(0), 4096))
        >>> snr = diagnostics.snr_per_leaf(est, diagnostics.true_gradient(f, p))
        >>> # closed forms: w: 3 / (3·(7 − 1)) = 1/6, b: 4 / (7 − 4) = 4/3
        >>> bool(abs(snr["w"] - 1 / 6) < 0.03), bool(abs(snr["b"] - 4 / 3) < 0.2)
        (True, True)
    """

    def one(samples, ref=None):
        if not is_differentiable(samples):
            return jnp.float32(jnp.nan)
        s = jnp.asarray(samples, jnp.float32).reshape(samples.shape[0], -1)
        if ref is None:
            mean = jnp.mean(s, axis=0)
            noise = jnp.sum(jnp.var(s, axis=0, ddof=1))
            return jnp.sum(mean * mean) / noise
        r = jnp.asarray(ref, jnp.float32).reshape(-1)
        return jnp.sum(r * r) / jnp.mean(jnp.sum((s - r) ** 2, axis=1))

    if true_grad is None:
        return jax.tree_util.tree_map(one, estimates)
    _check_same(estimates, true_grad, "estimates and true_grad")
    return jax.tree_util.tree_map(one, estimates, true_grad)


class VarianceReport(NamedTuple):
    """Result of :func:`estimator_variance`.

    Attributes:
        total: ``E|g − E g|²`` over all floating leaves (float32 scalar), estimated with
            the unbiased sample covariance.
        per_leaf: The same per leaf (pytree of scalars; they sum to ``total``).
        mean: The sample mean of the estimates (the gradient's structure).
        num_samples: Number of estimates drawn.
    """

    total: Array
    per_leaf: Any
    mean: Any
    num_samples: int


def estimator_variance(
    estimator: Callable[..., Any],
    key: Any,
    num_samples: int,
    *args: Any,
    batch_size: int = 256,
    **kwargs: Any,
) -> VarianceReport:
    """Empirical variance of a stochastic gradient estimator over its random keys.

    Calls ``estimator(k, *args, **kwargs)`` for ``num_samples`` keys split from ``key``
    (vectorised in chunks of ``batch_size``, accumulated with Chan et al.'s pairwise
    update, so memory stays at a few copies of the gradient).

    Args:
        estimator: ``estimator(key, *args, **kwargs) -> gradient pytree``, e.g.
            ``fgrad_jax.forward_grad(f, num_tangents=4)``.
        key: A JAX PRNG key.
        num_samples: Number of estimates (>= 2).
        *args: Arguments after the key.
        batch_size: Estimates computed at once.
        **kwargs: Keyword arguments for ``estimator``.

    Returns:
        A :class:`VarianceReport`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import fgrad_jax
        >>> from fgrad_jax import diagnostics
        >>> a = jnp.arange(1.0, 5.0)  # f = aᵀθ: Rademacher variance (d − 1)|a|² = 90
        >>> est = fgrad_jax.forward_grad(lambda t: jnp.dot(a, t), tangent="rademacher")
        >>> report = diagnostics.estimator_variance(est, jax.random.key(0), 20_000, jnp.zeros(4))
        >>> bool(abs(float(report.total) - 90.0) < 5.0)
        True
    """
    key = as_key(key)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples must be an int >= 2; got {num_samples!r}.")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to estimate a variance; got {num_samples}.")
    batch = max(1, min(int(batch_size), int(num_samples)))
    keys = jax.random.split(key, num_samples)

    @jax.jit
    def chunk_stats(chunk):
        est = jax.vmap(lambda k: estimator(k, *args, **kwargs))(chunk)
        leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(est)]
        mean = [jnp.mean(x, axis=0) for x in leaves]
        return mean, [jnp.sum((x - m) ** 2, axis=0) for x, m in zip(leaves, mean)]

    # The first chunk starts the running statistics; later chunks merge into them.
    mean: list[Array]
    m2: list[Array]
    mean, m2 = chunk_stats(keys[:batch])
    count: int = batch  # batch <= num_samples, so the first chunk is full
    for start in range(batch, num_samples, batch):
        chunk = keys[start : start + batch]
        n_b = chunk.shape[0]
        mean_b, m2_b = chunk_stats(chunk)
        merged = count + n_b
        delta = [b - a for a, b in zip(mean, mean_b)]
        mean = [a + d * (n_b / merged) for a, d in zip(mean, delta)]
        m2 = [a + b + d * d * (count * n_b / merged) for a, b, d in zip(m2, m2_b, delta)]
        count = merged
    example = jax.eval_shape(lambda k: estimator(k, *args, **kwargs), keys[0])
    leaves, treedef = jax.tree_util.tree_flatten(example)
    per_leaf_list = [
        jnp.sum(v) / (count - 1) if is_differentiable(leaf) else jnp.float32(0.0)
        for v, leaf in zip(m2, leaves)
    ]
    total = sum(per_leaf_list, jnp.float32(0.0))
    return VarianceReport(
        total=total,
        per_leaf=jax.tree_util.tree_unflatten(treedef, per_leaf_list),
        mean=jax.tree_util.tree_unflatten(treedef, mean),
        num_samples=int(count),
    )


def perturbation_report(
    fun: Callable[..., Any], *args: Any, argnums: int = 0, **kwargs: Any
) -> dict[str, str]:
    """How ``perturb="activations"`` perturbs each leaf of ``args[argnums]``, and why.

    ``fun`` returns per-example losses (shape ``(B,)``, or ``(B, G)`` for local losses),
    possibly with an aux as ``(losses, aux)``. Only traced: nothing runs.

    Returns:
        ``{leaf path: description}``: ``"activations: output of N op(s) (...)"`` for
        kernels whose dense/conv outputs are perturbed (and biases added to them);
        ``"weights: kernel of ... (fallback)"`` for a kernel the rules cannot see through
        (the estimator raises for these unless ``fallback="weights"``); ``"weights: not a
        dense/conv kernel"`` for the leaves that are weight-perturbed by design (norm
        scales, embeddings); ``"none"`` for leaves that do not reach the losses.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fgrad_jax import diagnostics
        >>> def losses(p, x):
        ...     h = jnp.tanh(x @ p["w"] + p["b"]) * p["scale"]
        ...     return jnp.sum(h @ (2.0 * p["v"]), axis=1)
        >>> p = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "scale": jnp.ones(4), "v": jnp.ones((4, 2))}
        >>> for path, how in diagnostics.perturbation_report(losses, p, jnp.ones((5, 3))).items():
        ...     print(path, "->", how)
        ['b'] -> activations: output of 1 op(s) (dot_general bias)
        ['scale'] -> weights: not a dense/conv kernel (elementwise, gather, ...)
        ['v'] -> weights: kernel of `dot_general`, not seen through (fallback)
        ['w'] -> activations: output of 1 op(s) (dot_general)
    """
    tree = args[argnums]
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)

    def flat_fun(*leaves: Any) -> Any:
        call = list(args)
        call[argnums] = jax.tree_util.tree_unflatten(treedef, leaves)
        return fun(*call, **kwargs)

    how = perturbation_of_leaves(flat_fun, [leaf for _, leaf in paths])
    return {jax.tree_util.keystr(path): text for (path, _), text in zip(paths, how)}


def collective_bytes(step: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """What one call of the compiled ``step`` communicates: bytes per collective kind.

    ``step`` is compiled for ``args`` (jitted first if it is not already; shardings come
    from the arguments or the step's own ``in_shardings``) and the collectives of the
    optimised HLO are counted: the bytes of one device's result of every ``all-reduce``,
    ``all-gather``, ``reduce-scatter``, ``all-to-all`` and ``collective-permute`` (async
    pairs once). A data-parallel forward-gradient step all-reduces ``4 (K + 1)`` bytes
    (K directional derivatives and the loss); backprop all-reduces the gradient.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> from fgrad_jax import diagnostics
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
        >>> x = jax.device_put(jnp.ones((8, 3)), NamedSharding(mesh, P("data")))
        >>> diagnostics.collective_bytes(lambda x: x.sum(), x)["all-reduce"]
        0
    """
    jitted = step if hasattr(step, "lower") else jax.jit(step)
    return _hlo_collective_bytes(jitted.lower(*args, **kwargs).compile().as_text())

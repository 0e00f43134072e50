"""One suite that every tangent strategy passes, built-in or user-written.

Each case in :data:`CASES` is a ``tangent=`` value (a name, a strategy object, a callable,
or the example strategy of docs/writing_an_estimator.md, executed from the page). To test a
new strategy, add it there.

Statistical tolerance: the mean of N = 4,000 estimates (K = 2 tangents each, fixed keys)
must lie within 5 empirical standard errors of the exact gradient in every component
(P(|z| > 5) ≈ 6e-7 per component under the null, 9 components per case). Stated biases:
SPSA's central difference is off by O(ε²) = 1e-6 relative at ε = 1e-3, far below one
standard error; the guided estimator is unbiased at ``residual_scale=1``, the value tested.
"""

import re
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad_jax

N_SAMPLES = 4_000
Z_MAX = 5.0
X = jnp.array([[1.0, -2.0], [0.5, 0.25], [-1.5, 0.75], [0.2, 0.1]], jnp.float32)
PAGE = Path(__file__).resolve().parents[1] / "docs" / "writing_an_estimator.md"


def _docs_example() -> dict:
    code = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(code) == 1, "docs/writing_an_estimator.md should hold one python example"
    namespace: dict = {}
    exec(compile(code[0], str(PAGE), "exec"), namespace)  # the page's example runs here
    return namespace


def _normal_callable(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
    )


def params():
    return {
        "w": jnp.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6]], jnp.float32),
        "b": jnp.array([0.05, -0.1, 0.2], jnp.float32),
    }


def per_example_losses(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2, axis=1) + 0.1 * jnp.sum(p["b"] ** 2)


def mean_loss(p, x):
    return jnp.mean(per_example_losses(p, x))


class Case(NamedTuple):
    tangent: object
    per_example: bool = False  # the function returns per-example losses (activations)


def _cases() -> dict[str, Case]:
    guess = jax.tree.map(lambda a: 0.5 * jnp.ones_like(a), params())
    return {
        "normal": Case("normal"),
        "rademacher": Case("rademacher"),
        "sphere": Case("sphere"),
        "orthogonal": Case("orthogonal"),
        "lowrank": Case("lowrank"),
        "lowrank2": Case(fgrad_jax.lowrank(2)),
        "callable": Case(_normal_callable),
        "guided": Case(fgrad_jax.guided(guess, residual_scale=1.0)),
        "spsa": Case(fgrad_jax.spsa(1e-3)),
        "activations": Case(fgrad_jax.activity_perturbation(), per_example=True),
        "docs_example": Case(_docs_example()["RandomCoordinates"]()),
    }


CASES = _cases()


def estimator(case: Case, **kwargs):
    fun = per_example_losses if case.per_example else mean_loss
    return fgrad_jax.forward_grad(fun, tangent=case.tangent, **kwargs)


def flat(tree):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name", sorted(CASES))
def test_unbiased(name):
    est = estimator(CASES[name], num_tangents=2)
    keys = jax.random.split(jax.random.key(0), N_SAMPLES)
    samples = np.asarray(jax.jit(jax.vmap(lambda k: flat(est(k, params(), X))))(keys), np.float64)
    true = np.asarray(flat(jax.grad(mean_loss)(params(), X)), np.float64)
    se = samples.std(0, ddof=1) / np.sqrt(N_SAMPLES)
    z = np.abs(samples.mean(0) - true) / np.maximum(se, 1e-12)
    assert z.max() < Z_MAX, f"{name}: max |z| = {z.max():.2f}"
    assert np.abs(samples[0] - true).max() > 1e-4  # single estimates are random


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_and_dtypes_follow_the_parameters(name):
    case = CASES[name]
    p = {**params(), "step": jnp.array(3, jnp.int32)}
    p["b"] = p["b"].astype(jnp.bfloat16)
    if name == "guided":  # the guess has the parameters' structure
        case = Case(fgrad_jax.guided(jax.tree.map(jnp.ones_like, p), residual_scale=1.0))
    fun = per_example_losses if case.per_example else mean_loss

    def loss(q, x):
        q = {**q, "b": q["b"].astype(jnp.float32)}
        return fun(q, x)

    g = fgrad_jax.forward_grad(loss, tangent=case.tangent, num_tangents=2)(jax.random.key(1), p, X)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), g) == jax.tree.map(
        lambda a: (a.shape, a.dtype), p
    )
    assert int(g["step"]) == 0
    assert bool(jnp.all(jnp.isfinite(g["w"])))


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_and_vmap_agree_with_eager(name):
    est = estimator(CASES[name], num_tangents=2)
    keys = jax.random.split(jax.random.key(2), 3)
    eager = [flat(est(k, params(), X)) for k in keys]
    jitted = jax.jit(est)(keys[0], params(), X)
    vmapped = jax.vmap(lambda k: flat(est(k, params(), X)))(keys)
    np.testing.assert_allclose(flat(jitted), eager[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(vmapped, np.stack(eager), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mask_gives_exact_zeros(name):
    case = CASES[name]
    if name == "guided":  # the guess must have the masked structure's leaves too
        case = Case(fgrad_jax.guided(params(), residual_scale=1.0))
    est = estimator(case, num_tangents=2, mask={"w": True, "b": False})
    g = est(jax.random.key(3), params(), X)
    assert bool(jnp.all(g["b"] == 0))
    assert float(jnp.abs(g["w"]).max()) > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunks_of_tangents_give_the_same_estimate(name):
    if name == "guided":  # its K + 1 tangents go through one pass: chunks are refused
        with pytest.raises(ValueError, match="cannot split them into chunks"):
            estimator(CASES[name], num_tangents=4, tangent_chunk=2)
        return
    at_once = estimator(CASES[name], num_tangents=4, tangent_chunk=4)
    chunked = estimator(CASES[name], num_tangents=4, tangent_chunk=2)
    key = jax.random.key(4)
    np.testing.assert_allclose(
        flat(chunked(key, params(), X)), flat(at_once(key, params(), X)), rtol=1e-4, atol=1e-6
    )

"""mask=: unselected leaves get no tangent (a cheaper JVP) and exact zeros."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad_jax


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "body": {"w": jax.random.normal(k1, (6, 5)), "b": jnp.zeros(5)},
        "head": {"w": jax.random.normal(k2, (5, 3)), "b": jnp.zeros(3)},
    }


def _loss(p, x):
    h = jnp.tanh(x @ p["body"]["w"] + p["body"]["b"])
    return jnp.sum((h @ p["head"]["w"] + p["head"]["b"]) ** 2)


X = jax.random.normal(jax.random.key(1), (4, 6))
HEAD_ONLY = {"body": False, "head": True}  # a prefix of the parameters' structure


@pytest.mark.parametrize("tangent", ["normal", "rademacher", "sphere", "lowrank"])
@pytest.mark.parametrize(
    "mask",
    [
        HEAD_ONLY,
        {"body": {"w": False, "b": False}, "head": {"w": True, "b": True}},
        lambda p: {"body": False, "head": True},
    ],
)
def test_unselected_leaves_are_exact_zeros_and_selected_unbiased(tangent, mask):
    """Mean of 4000 head-only estimates vs the exact head gradient: max |error| below 6
    standard errors of the mean (each coordinate's sd estimated from the samples)."""
    p = _params()
    est = jax.jit(
        jax.vmap(lambda k: fgrad_jax.forward_grad(_loss, tangent=tangent, mask=mask)(k, p, X))
    )(jax.random.split(jax.random.key(2), 4000))
    for leaf in jax.tree_util.tree_leaves(est["body"]):
        assert not np.any(np.asarray(leaf))
    true = jax.grad(_loss)(p, X)["head"]
    for name in ("w", "b"):
        samples = np.asarray(est["head"][name], np.float64)
        sem = samples.std(0) / np.sqrt(len(samples))
        err = np.abs(samples.mean(0) - np.asarray(true[name]))
        assert np.all(err <= 6 * sem + 1e-6), (name, err.max(), sem.max())


def test_masked_jvp_does_less_work():
    """With the body frozen, the body's matmul has no tangent: one dot_general fewer."""

    def count_dots(mask):
        jaxpr = jax.make_jaxpr(fgrad_jax.forward_grad(_loss, tangent="rademacher", mask=mask))(
            jax.random.key(0), _params(), X
        )
        return str(jaxpr).count("dot_general")

    assert count_dots(HEAD_ONLY) < count_dots(None)


def test_mask_on_tuple_argnums():
    f = lambda a, b: jnp.sum(a * b)
    g = fgrad_jax.forward_grad(f, argnums=(0, 1), mask=(True, False))(
        jax.random.key(0), jnp.ones(3), jnp.ones(3)
    )
    assert not np.any(np.asarray(g[1])) and np.any(np.asarray(g[0]))


def test_bad_masks_name_the_fix():
    p = _params()
    est = lambda mask: fgrad_jax.forward_grad(_loss, mask=mask)(jax.random.key(0), p, X)
    with pytest.raises(ValueError, match="mask must be a pytree of bools"):
        est({"body": True})
    with pytest.raises(TypeError, match="mask leaves must be Python or NumPy bools"):
        est({"body": jnp.array(True), "head": True})
    with pytest.raises(ValueError, match="mask selects no parameter"):
        est({"body": False, "head": False})

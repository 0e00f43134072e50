"""Functions defined with jax.custom_vjp: differentiated through their primal definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad_jax


@jax.custom_vjp
def clipped_relu(x):
    return jnp.clip(x, 0.0, 6.0)


def _fwd(x):
    return clipped_relu(x), x


def _bwd(x, g):  # a deliberately wrong backward rule: the forward gradient must not use it
    return (g * 0.0,)


clipped_relu.defvjp(_fwd, _bwd)


@jax.custom_vjp
def attention(q, k, v):
    w = jax.nn.softmax(q @ k.T / jnp.sqrt(jnp.float32(q.shape[-1])), axis=-1)
    return w @ v


def _att_fwd(q, k, v):
    return attention(q, k, v), (q, k, v)


def _att_bwd(res, g):
    q, k, v = res
    return jax.vjp(
        lambda q, k, v: jax.nn.softmax(q @ k.T / jnp.sqrt(jnp.float32(q.shape[-1])), -1) @ v,
        q,
        k,
        v,
    )[1](g)


attention.defvjp(_att_fwd, _att_bwd)


def _params():
    ks = jax.random.split(jax.random.key(0), 4)
    return {
        "w1": jax.random.normal(ks[0], (4, 8)) * 0.5,
        "wq": jax.random.normal(ks[1], (8, 8)) * 0.3,
        "wk": jax.random.normal(ks[2], (8, 8)) * 0.3,
        "wv": jax.random.normal(ks[3], (8, 8)) * 0.3,
    }


def _loss(p, x):
    h = clipped_relu(x @ p["w1"] + 0.5)
    return jnp.sum(attention(h @ p["wq"], h @ p["wk"], h @ p["wv"]) ** 2)


def _reference_loss(p, x):  # the same function without custom_vjp
    h = jnp.clip(x @ p["w1"] + 0.5, 0.0, 6.0)
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    w = jax.nn.softmax(q @ k.T / jnp.sqrt(jnp.float32(q.shape[-1])), axis=-1)
    return jnp.sum((w @ v) ** 2)


X = jax.random.normal(jax.random.key(1), (5, 4))


@pytest.mark.parametrize("tangent", ["rademacher", "normal", "lowrank", "sphere"])
def test_custom_vjp_gradient_is_unbiased(tangent):
    """Mean of 4000 estimates vs jax.grad of the same function written without
    custom_vjp: every coordinate within 6 standard errors of the mean."""
    p = _params()
    est = jax.jit(jax.vmap(lambda k: fgrad_jax.forward_grad(_loss, tangent=tangent)(k, p, X)))(
        jax.random.split(jax.random.key(3), 4000)
    )
    true = jax.grad(_reference_loss)(p, X)
    for name in p:
        samples = np.asarray(est[name], np.float64)
        sem = samples.std(0) / np.sqrt(len(samples))
        err = np.abs(samples.mean(0) - np.asarray(true[name]))
        assert np.all(err <= 6 * sem + 1e-5), (name, err.max())


def test_custom_vjp_directional_derivative_is_exact():
    """With K = n orthogonal tangents the estimate is the exact gradient."""
    p = {"w": jnp.linspace(-1.0, 1.0, 6)}
    f = lambda q: jnp.sum(clipped_relu(q["w"] * 3.0) ** 2)
    g = fgrad_jax.forward_grad(f, num_tangents=6, tangent="orthogonal")(jax.random.key(0), p)
    want = jax.grad(lambda q: jnp.sum(jnp.clip(q["w"] * 3.0, 0.0, 6.0) ** 2))(p)
    np.testing.assert_allclose(g["w"], want["w"], rtol=1e-4, atol=1e-4)


def test_custom_vjp_out_of_reach_names_the_op_and_the_fix():
    def f(w):
        out, _ = jax.lax.scan(lambda c, _: (clipped_relu(c * w), None), jnp.ones(3), None, 2)
        return jnp.sum(out)

    with pytest.raises(TypeError, match=r"custom_vjp is called inside `scan`.*spsa_gradient"):
        fgrad_jax.forward_grad(f, tangent="rademacher")(jax.random.key(0), jnp.ones(3))

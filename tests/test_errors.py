"""Bad input gets a clear error that names the fix."""

import jax
import jax.numpy as jnp
import optax
import pytest

import fgrad_jax

PARAMS = {"w": jnp.ones(3, jnp.float32)}


def loss(p):
    return jnp.sum(p["w"] ** 2)


@pytest.mark.parametrize("bad", [0, -2])
@pytest.mark.parametrize(
    "factory",
    [
        lambda k: fgrad_jax.forward_grad(loss, num_tangents=k),
        lambda k: fgrad_jax.value_and_forward_grad(loss, num_tangents=k),
        lambda k: fgrad_jax.forward_gradient(num_tangents=k),
        lambda k: fgrad_jax.fgd(0.1, num_tangents=k),
        lambda k: fgrad_jax.nnx_value_and_forward_grad(loss, num_tangents=k),
    ],
)
def test_num_tangents_below_one(factory, bad):
    with pytest.raises(ValueError, match="num_tangents must be >= 1"):
        factory(bad)


@pytest.mark.parametrize("bad", [1.5, "4", True])
def test_num_tangents_wrong_type(bad):
    with pytest.raises(TypeError, match="num_tangents"):
        fgrad_jax.forward_grad(loss, num_tangents=bad)


def test_unknown_tangent_lists_choices():
    with pytest.raises(ValueError, match=r"Unknown tangent 'gaussian'.*normal"):
        fgrad_jax.forward_gradient(tangent="gaussian")
    with pytest.raises(ValueError, match="Unknown tangent"):
        fgrad_jax.forward_grad(loss, tangent="nrmal")
    with pytest.raises(TypeError, match="tangent must be"):
        fgrad_jax.forward_grad(loss, tangent=3)


def test_value_fn_missing():
    tx = optax.chain(fgrad_jax.forward_gradient(), optax.sgd(0.1))
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(None, state, PARAMS)
    with pytest.raises(ValueError, match="params"):
        fgrad_jax.forward_gradient().update(None, state[0], None, value_fn=loss)
    with pytest.raises(TypeError, match="value_fn must be callable"):
        fgrad_jax.forward_gradient().update(None, state[0], PARAMS, value_fn=3.0)


def test_non_scalar_loss():
    vector_loss = lambda p: p["w"] ** 2
    with pytest.raises(ValueError, match="scalar"):
        fgrad_jax.forward_grad(vector_loss)(jax.random.key(0), PARAMS)
    tx = fgrad_jax.forward_gradient()
    with pytest.raises(ValueError, match=r"value_fn must return a scalar"):
        tx.update(None, tx.init(PARAMS), PARAMS, value_fn=vector_loss)
    with pytest.raises(TypeError, match="floating-point scalar"):
        fgrad_jax.forward_grad(lambda p: jnp.sum(p["w"]).astype(jnp.int32))(
            jax.random.key(0), PARAMS
        )
    with pytest.raises(TypeError, match=r"has_aux=True.*pair"):
        fgrad_jax.forward_grad(loss, has_aux=True)(jax.random.key(0), PARAMS)


def test_no_floating_leaves():
    ints = {"n": jnp.arange(3)}
    with pytest.raises(TypeError, match="no floating-point leaves"):
        fgrad_jax.forward_grad(lambda p: jnp.sum(p["n"]).astype(jnp.float32))(
            jax.random.key(0), ints
        )


def test_bad_keys():
    with pytest.raises(TypeError, match=r"jax.random.key\(0\)"):
        fgrad_jax.forward_grad(loss)(0, PARAMS)
    with pytest.raises(TypeError, match="PRNG key"):
        fgrad_jax.forward_grad(loss)(jnp.zeros(3), PARAMS)
    with pytest.raises(TypeError, match="int seed"):
        fgrad_jax.forward_gradient(key=True)
    with pytest.raises(TypeError, match="PRNG key"):
        fgrad_jax.forward_gradient(key="seed")


def test_orthogonal_needs_enough_dimensions():
    with pytest.raises(ValueError, match="num_tangents <= number of differentiated parameters"):
        fgrad_jax.forward_grad(loss, num_tangents=4, tangent="orthogonal")(
            jax.random.key(0), PARAMS
        )


def test_bad_argnums():
    with pytest.raises(ValueError, match="out of range"):
        fgrad_jax.forward_grad(loss, argnums=2)(jax.random.key(0), PARAMS)


def test_bad_user_tangent_shape():
    bad = lambda key, tree: {"w": jnp.ones(4)}
    with pytest.raises(ValueError, match="shapes"):
        fgrad_jax.forward_grad(loss, tangent=bad)(jax.random.key(0), PARAMS)


def test_traced_num_tangents_under_inject_hyperparams_says_static_args():
    tx = optax.inject_hyperparams(fgrad_jax.fgd)(learning_rate=0.1, num_tangents=2)
    state = tx.init(PARAMS)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(lambda s: tx.update(None, s, PARAMS, value_fn=loss))(state)
    ok = optax.inject_hyperparams(fgrad_jax.fgd, static_args=("num_tangents",))(
        learning_rate=0.1, num_tangents=2
    )
    jax.jit(lambda s: ok.update(None, s, PARAMS, value_fn=loss))(ok.init(PARAMS))

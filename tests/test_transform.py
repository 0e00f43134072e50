"""The optax transformation: state, chains, schedules, injection, non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgrad_jax

TARGET = jnp.array([1.0, -2.0, 0.5, 3.0], jnp.float32)


def quadratic(params):
    return jnp.sum((params["w"] - TARGET) ** 2) + jnp.sum(params["b"] ** 2)


def init_params():
    return {"w": jnp.zeros(4, jnp.float32), "b": jnp.ones(2, jnp.float32)}


def run(tx, steps=300, value_fn=quadratic, params=None):
    params = init_params() if params is None else params
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(None, state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: fgrad_jax.fgd(0.05, key=1, num_tangents=2),
        lambda: optax.chain(fgrad_jax.forward_gradient(key=2, num_tangents=4), optax.adam(5e-2)),
        lambda: fgrad_jax.fgd(optax.exponential_decay(0.05, 100, 0.9), key=3, tangent="rademacher"),
        lambda: optax.inject_hyperparams(fgrad_jax.fgd)(learning_rate=0.05),
    ],
    ids=["fgd", "chain-adam", "schedule", "inject"],
)
@pytest.mark.usefixtures("standard_promotion")
def test_chains_minimise_quadratic(make_tx):
    initial = float(quadratic(init_params()))
    params, _ = run(make_tx(), steps=400)
    assert float(quadratic(params)) < 1e-2 * initial


def test_state_counts_and_logs_value_with_a_fixed_key():
    tx = fgrad_jax.forward_gradient(key=7)
    params = init_params()
    state = tx.init(params)
    assert isinstance(state, fgrad_jax.ForwardGradientState)
    assert int(state.count) == 0 and np.isnan(state.value)
    _, s1 = tx.update(None, state, params, value_fn=quadratic)
    _, s2 = tx.update(None, s1, params, value_fn=quadratic)
    assert int(s2.count) == 2
    assert float(s1.value) == pytest.approx(float(quadratic(params)))
    # The key stays the one given; each step's tangents come from (key, count).
    keys = [jax.random.key_data(s.key) for s in (state, s1, s2)]
    assert all(np.array_equal(k, jax.random.key_data(jax.random.key(7))) for k in keys)
    # Same params and same state: the same update (deterministic), different state: different.
    u1, _ = tx.update(None, s1, params, value_fn=quadratic)
    u1b, _ = tx.update(None, s1, params, value_fn=quadratic)
    u2, _ = tx.update(None, s2, params, value_fn=quadratic)
    np.testing.assert_array_equal(u1["w"], u1b["w"])
    assert not np.array_equal(u1["w"], u2["w"])


def test_key_forms_agree():
    params = init_params()
    outs = []
    for key in (5, jax.random.key(5), jax.random.PRNGKey(5), np.int64(5)):
        tx = fgrad_jax.forward_gradient(key=key)
        u, _ = tx.update(None, tx.init(params), params, value_fn=quadratic)
        outs.append(np.asarray(u["w"]))
    for o in outs[1:]:
        np.testing.assert_array_equal(outs[0], o)


def test_empty_updates_accepted_and_extra_args_pass_through():
    """None and empty pytrees (nnx.Optimizer.update(model, None) passes State({})) are fine."""
    tx = optax.chain(fgrad_jax.forward_gradient(key=0), optax.sgd(0.1))
    params = init_params()
    state = tx.init(params)
    u_none, _ = tx.update(None, state, params, value_fn=quadratic, unused_arg=3)
    u_empty, _ = tx.update({}, state, params, value_fn=quadratic)
    np.testing.assert_array_equal(u_none["w"], u_empty["w"])


def test_incoming_updates_would_be_discarded_error():
    """Real updates passed in (e.g. backprop grads) used to be dropped silently."""
    tx = optax.chain(fgrad_jax.forward_gradient(key=0), optax.sgd(0.1))
    params = init_params()
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    with pytest.raises(ValueError, match=r"would discard.*update\(None, state, params"):
        tx.update(grads, tx.init(params), params, value_fn=quadratic)


def test_nonfinite_step_is_zeroed_and_counted():
    tx = optax.chain(fgrad_jax.forward_gradient(key=0, num_tangents=2), optax.sgd(0.1))
    params = init_params()
    state = tx.init(params)

    def bad(p):
        return jnp.sum(jnp.sqrt(p["w"] - 10.0))  # NaN everywhere

    updates, state = jax.jit(lambda s, p: tx.update(None, s, p, value_fn=bad))(state, params)
    for u in jax.tree_util.tree_leaves(updates):
        assert np.all(np.asarray(u) == 0)
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new_params["w"], params["w"])
    fg_state = state[0]
    assert int(fg_state.num_nonfinite) == 1 and int(fg_state.count) == 1
    assert np.isnan(fg_state.value)
    # A finite step afterwards proceeds normally and the counter stays.
    updates, state = tx.update(None, state, params, value_fn=quadratic)
    assert int(state[0].num_nonfinite) == 1
    assert np.abs(np.asarray(updates["w"])).sum() > 0


def test_nonfinite_derivative_with_finite_value():
    """An infinite slope with a finite loss (sqrt at 0) is also caught."""
    tx = fgrad_jax.forward_gradient(key=0)
    params = {"w": jnp.zeros(3, jnp.float32)}
    updates, state = tx.update(
        None, tx.init(params), params, value_fn=lambda p: jnp.sum(jnp.sqrt(p["w"]))
    )
    assert float(state.value) == 0.0 and int(state.num_nonfinite) == 1
    np.testing.assert_array_equal(updates["w"], np.zeros(3))


def test_transform_matches_functional_estimator():
    key = jax.random.key(11)
    params = init_params()
    tx = fgrad_jax.forward_gradient(key=key, num_tangents=3, tangent="sphere")
    estimator = fgrad_jax.forward_grad(quadratic, num_tangents=3, tangent="sphere")
    state = tx.init(params)
    for count in range(2):
        updates, state = tx.update(None, state, params, value_fn=quadratic)
        expected = estimator(fgrad_jax.step_key(key, count), params)
        for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_array_equal(a, b)


def test_vmap_over_seeds_runs_independent_trainings():
    """Several training runs as one vmapped program, each with its own key."""
    params = init_params()

    def train(key):
        tx = optax.chain(fgrad_jax.forward_gradient(key=key, num_tangents=2), optax.sgd(0.05))
        state = tx.init(params)

        def body(carry, _):
            p, s = carry
            u, s = tx.update(None, s, p, value_fn=quadratic)
            return (optax.apply_updates(p, u), s), s[0].value

        (p, _), losses = jax.lax.scan(body, (params, state), length=200)
        return p, losses

    keys = jax.random.split(jax.random.key(0), 3)
    final, losses = jax.jit(jax.vmap(train))(keys)
    assert losses.shape == (3, 200)
    assert np.all(np.asarray(losses[:, -1]) < 1e-2 * np.asarray(losses[:, 0]))
    assert not np.allclose(losses[0, :20], losses[1, :20])
    single, _ = jax.jit(train)(keys[1])
    np.testing.assert_allclose(final["w"][1], single["w"], rtol=1e-5, atol=1e-6)


def test_forward_gradient_state_accessor():
    params = init_params()
    for tx in (
        fgrad_jax.fgd(0.1),
        optax.inject_hyperparams(fgrad_jax.fgd)(learning_rate=0.1),
        optax.chain(fgrad_jax.forward_gradient(), optax.clip(1.0), optax.sgd(0.1)),
    ):
        _, state = tx.update(None, tx.init(params), params, value_fn=quadratic)
        fg = fgrad_jax.forward_gradient_state(state)
        assert isinstance(fg, fgrad_jax.ForwardGradientState)
        assert float(fg.value) == pytest.approx(float(quadratic(params)))
        assert int(fg.count) == 1
    with pytest.raises(ValueError, match="exactly one ForwardGradientState"):
        fgrad_jax.forward_gradient_state(optax.sgd(0.1).init(params))
    fg = fgrad_jax.forward_gradient()
    with pytest.raises(ValueError, match="found 2"):
        fgrad_jax.forward_gradient_state((fg.init(params), fg.init(params)))


def test_state_is_one_packed_array_with_readable_fields():
    """Key, counters and value travel as one uint32 array (one buffer per step); the
    properties read them back exactly, also for stacked states and other key kinds."""
    params = init_params()
    tx = fgrad_jax.forward_gradient(key=jax.random.key(5, impl="rbg"))
    state = tx.init(params)
    assert len(jax.tree_util.tree_leaves(state)) == 1
    assert state.words.dtype == jnp.uint32 and state.words.shape == (4 + 3,)
    _, state = tx.update(None, state, params, value_fn=quadratic)
    assert jax.random.key_impl(state.key) == jax.random.key_impl(jax.random.key(0, impl="rbg"))
    assert int(state.count) == 1 and int(state.num_nonfinite) == 0
    assert float(state.value) == float(quadratic(params))
    made = fgrad_jax.ForwardGradientState.create(
        jax.random.key(1), jnp.int32(-3), jnp.float32(-0.0), jnp.int32(2**31 - 1)
    )
    assert int(made.count) == -3 and int(made.num_nonfinite) == 2**31 - 1
    assert np.signbit(made.value) and float(made.value) == 0.0

    def run(seed):
        tx = fgrad_jax.forward_gradient(key=seed)
        _, s = tx.update(None, tx.init(params), params, value_fn=quadratic)
        return s

    stacked = jax.vmap(run)(jnp.arange(3))
    assert stacked.words.shape == (3, 2 + 3)
    np.testing.assert_array_equal(stacked.count, [1, 1, 1])
    np.testing.assert_array_equal(stacked.value, np.full(3, float(quadratic(params)), np.float32))
    assert jax.random.key_data(stacked.key).shape == (3, 2)

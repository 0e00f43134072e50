"""forward_gradient among optax combinators: position in a chain, wrappers, masks,
non-finite steps and aux outputs. Each wrapper either raises a clear error naming its
alternative, or the alternative is checked against the same wrapper fed the fixed estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgrad_jax

pytestmark = pytest.mark.usefixtures("standard_promotion")

TARGET = jnp.array([1.0, -2.0, 0.5, 3.0], jnp.float32)


def quadratic(params):
    return jnp.sum((params["w"] - TARGET) ** 2) + jnp.sum((params["b"] - 1.5) ** 2)


def init_params():
    return {"w": jnp.zeros(4, jnp.float32), "b": jnp.ones(2, jnp.float32)}


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- position in a chain -------------------------------------------------------------


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0), fgrad_jax.forward_gradient(), optax.sgd(0.1)
        ),
        lambda: optax.chain(optax.adam(0.1), fgrad_jax.forward_gradient()),
        lambda: optax.chain(optax.scale(-1.0), fgrad_jax.fgd(0.1)),
        lambda: optax.chain(optax.clip(1.0), optax.inject_hyperparams(fgrad_jax.fgd)(0.1)),
    ],
    ids=["clip-first", "adam-first", "nested-fgd", "nested-inject"],
)
def test_not_first_in_chain_is_an_error_naming_the_fix(make_tx):
    tx = make_tx()
    with pytest.raises(ValueError, match=r"must be the first transformation.*Put it first"):
        tx.init(init_params())


def test_transformations_after_it_see_the_estimate():
    """chain(forward_gradient, clip, sgd) == chain(clip, sgd) fed the fixed estimate."""
    fg = fgrad_jax.forward_gradient(key=4, num_tangents=2)
    after = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1))
    tx = optax.chain(fg, after)
    params = init_params()
    estimate, _ = fg.update(None, fg.init(params), params, value_fn=quadratic)
    assert float(optax.tree.norm(estimate)) > 0.5  # the clip is active
    updates, _ = tx.update(None, tx.init(params), params, value_fn=quadratic)
    expected, _ = after.update(estimate, after.init(params), params)
    assert_trees_equal(updates, expected)
    assert float(optax.tree.norm(updates)) == pytest.approx(0.05, rel=1e-5)


def test_inject_hyperparams_alone_and_first_still_work():
    params = init_params()
    for tx in (
        optax.inject_hyperparams(fgrad_jax.fgd)(learning_rate=0.1),
        optax.chain(optax.inject_hyperparams(fgrad_jax.fgd)(learning_rate=0.1), optax.clip(1.0)),
    ):
        updates, _ = tx.update(None, tx.init(params), params, value_fn=quadratic)
        assert float(optax.tree.norm(updates)) > 0


# --- wrappers ------------------------------------------------------------------------

WRAPPED = {
    "MultiSteps": (
        lambda inner: optax.MultiSteps(inner, every_k_schedule=4),
        r"optax.MultiSteps.*optax.MultiSteps\(optimizer, every_k_schedule=k\)"
        r".gradient_transformation\(\)",
    ),
    "masked": (
        lambda inner: optax.masked(inner, {"w": True, "b": False}),
        r"optax.masked.*forward_gradient\(mask=",
    ),
    "multi_transform": (
        lambda inner: optax.multi_transform(
            {"a": inner, "z": optax.set_to_zero()}, {"w": "a", "b": "z"}
        ),
        r"multi_transform.*forward_gradient\(mask=",
    ),
    "apply_if_finite": (
        lambda inner: optax.apply_if_finite(inner, 3),
        r"apply_if_finite.*on_nonfinite='nan'.*apply_if_finite\(optimizer",
    ),
    "lookahead": (
        lambda inner: optax.lookahead(inner, sync_period=2, slow_step_size=0.5),
        r"lookahead.*forward_grad\(loss\)\(key, params.fast\)",
    ),
}


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_wrapper_around_forward_gradient_is_an_error_naming_the_alternative(name):
    wrap, message = WRAPPED[name]
    tx = wrap(optax.chain(fgrad_jax.forward_gradient(), optax.adam(0.1)))
    params = init_params()
    if name == "lookahead":
        params = optax.LookaheadParams.init_synced(params)
    with pytest.raises(ValueError, match=message):
        tx.init(params)


def run_against_fixed_estimate(fg, wrapper, steps, value_fn=quadratic):
    """chain(fg, wrapper) vs. wrapper fed the estimates of a separate copy of fg."""
    tx = optax.chain(fg, wrapper)
    p1 = p2 = init_params()
    s1, s_fg, s_ref = tx.init(p1), fg.init(p2), wrapper.init(p2)
    history = []
    for _ in range(steps):
        u1, s1 = tx.update(None, s1, p1, value_fn=value_fn)
        p1 = optax.apply_updates(p1, u1)
        estimate, s_fg = fg.update(None, s_fg, p2, value_fn=value_fn)
        u2, s_ref = wrapper.update(estimate, s_ref, p2)
        p2 = optax.apply_updates(p2, u2)
        assert_trees_equal(p1, p2)
        history.append(p1)
    return history, s1


def test_multisteps_after_forward_gradient_accumulates_every_estimate():
    fg = fgrad_jax.forward_gradient(key=5, tangent="rademacher")
    multi = optax.MultiSteps(optax.adam(0.1), every_k_schedule=4).gradient_transformation()
    history, _ = run_against_fixed_estimate(fg, multi, steps=8)
    # Parameters move only on every 4th step, by Adam on the mean of the 4 estimates.
    assert_trees_equal(history[0], init_params())
    assert_trees_equal(history[2], init_params())
    assert not np.array_equal(history[3]["w"], init_params()["w"])
    assert_trees_equal(history[4], history[3])
    # The 4th-step update equals Adam's first step on the mean of the 4 estimates.
    s = fg.init(init_params())
    estimates = []
    for _ in range(4):
        e, s = fg.update(None, s, init_params(), value_fn=quadratic)
        estimates.append(e)
    mean = jax.tree_util.tree_map(lambda *xs: sum(xs) / 4, *estimates)
    adam = optax.adam(0.1)
    u, _ = adam.update(mean, adam.init(init_params()), init_params())
    expected = optax.apply_updates(init_params(), u)
    for a, b in zip(jax.tree_util.tree_leaves(history[3]), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


FREEZE_B = {"w": True, "b": False}


@pytest.mark.parametrize(
    "mask", [FREEZE_B, lambda p: {"w": True, "b": False}], ids=["tree", "callable"]
)
def test_masked_after_forward_gradient_freezes_and_spends_no_tangents(mask):
    fg = fgrad_jax.forward_gradient(key=6, num_tangents=2, mask=mask)
    history, _ = run_against_fixed_estimate(fg, optax.masked(optax.adam(0.1), mask), steps=5)
    for p in history:
        np.testing.assert_array_equal(p["b"], init_params()["b"])
    assert not np.array_equal(history[-1]["w"], init_params()["w"])
    estimate, _ = fg.update(None, fg.init(init_params()), init_params(), value_fn=quadratic)
    np.testing.assert_array_equal(estimate["b"], np.zeros(2))


def test_multi_transform_after_forward_gradient():
    fg = fgrad_jax.forward_gradient(key=7, mask=FREEZE_B)
    labels = {"w": "train", "b": "freeze"}
    partition = optax.multi_transform(
        {"train": optax.adam(0.1), "freeze": optax.set_to_zero()}, labels
    )
    history, _ = run_against_fixed_estimate(fg, partition, steps=5)
    np.testing.assert_array_equal(history[-1]["b"], init_params()["b"])
    assert float(quadratic(history[-1])) < float(quadratic(init_params()))


def test_lookahead_alternative_trains():
    """The alternative the error names: estimate on params.fast, pass it as updates."""
    tx = optax.lookahead(optax.adam(0.1), sync_period=2, slow_step_size=0.5)
    params = optax.LookaheadParams.init_synced(init_params())
    state = tx.init(params)
    estimate = jax.jit(fgrad_jax.forward_grad(quadratic, num_tangents=4))
    first = float(quadratic(params.slow))
    for i in range(200):
        grads = estimate(jax.random.key(i), params.fast)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float(quadratic(params.slow)) < 0.1 * first


# --- masks ---------------------------------------------------------------------------


def test_mask_variance_is_that_of_the_smaller_problem():
    """Rademacher: E|g_w|² = n_w (|∇_w f|² + |∇_b f|² if b gets tangents, else 0)."""
    params = init_params()
    loss = lambda p: jnp.sum((p["w"] - TARGET) ** 2) + jnp.sum((p["b"] - 5.0) ** 2)
    grad = jax.grad(loss)(params)
    gw2 = float(jnp.sum(grad["w"] ** 2))
    gb2 = float(jnp.sum(grad["b"] ** 2))
    assert gb2 > 0.5 * gw2  # the frozen block matters for the comparison below

    def sq_norm_w(mask, key):
        tx = fgrad_jax.forward_gradient(key=key, tangent="rademacher", mask=mask)
        g, _ = tx.update(None, tx.init(params), params, value_fn=loss)
        return jnp.sum(g["w"] ** 2), g["w"], g["b"]

    keys = jax.random.split(jax.random.key(0), 4000)
    masked_sq, masked_w, masked_b = jax.vmap(lambda k: sq_norm_w(FREEZE_B, k))(keys)
    full_sq, _, _ = jax.vmap(lambda k: sq_norm_w(None, k))(keys)
    assert np.all(np.asarray(masked_b) == 0)
    n_w = 4
    # Sample means of 4000 draws: relative standard error well under 5 % here.
    assert float(masked_sq.mean()) == pytest.approx(n_w * gw2, rel=0.1)
    assert float(full_sq.mean()) == pytest.approx(n_w * (gw2 + gb2), rel=0.1)
    np.testing.assert_allclose(masked_w.mean(0), grad["w"], atol=0.25)


def test_mask_errors():
    params = init_params()
    for mask, error, message in [
        ({"w": False, "b": False}, ValueError, "selects no parameter"),
        ({"w": True}, ValueError, "structure of the parameters"),
        (lambda p: jax.tree_util.tree_map(lambda x: x.sum() > 0, p), TypeError, "static"),
    ]:
        tx = fgrad_jax.forward_gradient(mask=mask)
        with pytest.raises(error, match=message):
            jax.jit(lambda s, p, tx=tx: tx.update(None, s, p, value_fn=quadratic))(
                tx.init(params), params
            )


def test_mask_prefix_and_fgd():
    params = {"head": init_params(), "body": {"k": jnp.ones(3, jnp.float32)}}
    loss = lambda p: quadratic(p["head"]) + jnp.sum(p["body"]["k"] ** 2)
    tx = fgrad_jax.fgd(0.1, key=1, mask={"head": True, "body": False})
    updates, _ = tx.update(None, tx.init(params), params, value_fn=loss)
    np.testing.assert_array_equal(updates["body"]["k"], np.zeros(3))
    assert float(jnp.abs(updates["head"]["w"]).sum()) > 0


# --- non-finite steps ----------------------------------------------------------------


def nan_at_step(k):
    def value_fn(params, step):
        return jnp.where(step == k, jnp.nan, 1.0) * quadratic(params)

    return value_fn


def test_apply_if_finite_after_forward_gradient_skips_the_step_bitwise():
    fg = fgrad_jax.forward_gradient(key=3, num_tangents=2, on_nonfinite="nan")
    tx = optax.chain(fg, optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=5))
    params = init_params()
    state = tx.init(params)
    value_fn = nan_at_step(3)

    @jax.jit
    def step(params, state, i):
        updates, state = tx.update(None, state, params, value_fn=lambda p: value_fn(p, i))
        return optax.apply_updates(params, updates), state

    for i in range(3):
        params, state = step(params, state, i)
    before_params, before = params, state
    params, state = step(params, state, 3)
    assert_trees_equal(params, before_params)
    assert_trees_equal(state[1].inner_state, before[1].inner_state)  # adam count, mu, nu
    assert int(state[0].num_nonfinite) == 1 and int(state[0].count) == 4
    assert int(state[1].total_notfinite) == 1
    params, state = step(params, state, 4)  # training resumes
    assert not np.array_equal(params["w"], before_params["w"])


def test_default_zero_update_still_moves_adam_as_documented():
    """The documented caveat of on_nonfinite="zero" with a stateful optimizer."""
    tx = optax.chain(fgrad_jax.forward_gradient(key=3), optax.adam(0.1))
    params = init_params()
    state = tx.init(params)
    value_fn = nan_at_step(3)
    for i in range(4):
        before = params
        updates, state = tx.update(None, state, params, value_fn=lambda p, i=i: value_fn(p, i))
        params = optax.apply_updates(params, updates)
    assert int(state[0].num_nonfinite) == 1
    assert not np.array_equal(params["w"], before["w"])


def test_on_nonfinite_invalid():
    with pytest.raises(ValueError, match="on_nonfinite"):
        fgrad_jax.forward_gradient(on_nonfinite="skip")


# --- aux -----------------------------------------------------------------------------


def loss_with_aux(params):
    pred = params["w"] * 2.0
    return quadratic(params), {"pred": pred, "abs_err": jnp.sum(jnp.abs(params["w"] - TARGET))}


def test_aux_from_the_steps_own_pass_under_scan():
    params = init_params()
    example = jax.eval_shape(loss_with_aux, params)[1]
    tx = optax.chain(
        fgrad_jax.forward_gradient(key=1, num_tangents=2, has_aux=True, aux_example=example),
        optax.adam(0.05),
    )
    state = tx.init(params)
    fg = fgrad_jax.forward_gradient_state(state)
    np.testing.assert_array_equal(fg.aux["pred"], np.zeros(4))

    def body(carry, _):
        p, s = carry
        u, s = tx.update(None, s, p, value_fn=loss_with_aux)
        aux = fgrad_jax.forward_gradient_state(s).aux
        # The stored aux is the one of the parameters the step was taken at.
        np.testing.assert_equal(aux["pred"].shape, (4,))
        return (optax.apply_updates(p, u), s), (aux["abs_err"], p)

    (params, state), (errs, visited) = jax.lax.scan(body, (params, state), length=200)
    expected = jax.vmap(lambda p: loss_with_aux(p)[1]["abs_err"])(visited)
    np.testing.assert_allclose(errs, expected, rtol=1e-6)
    assert float(errs[-1]) < 0.2 * float(errs[0])


def test_fgd_has_aux():
    params = init_params()
    example = jax.eval_shape(loss_with_aux, params)[1]
    tx = fgrad_jax.fgd(0.1, has_aux=True, aux_example=example)
    _, state = tx.update(None, tx.init(params), params, value_fn=loss_with_aux)
    fg = fgrad_jax.forward_gradient_state(state)
    np.testing.assert_allclose(fg.aux["pred"], params["w"] * 2.0)
    assert float(fg.value) == pytest.approx(float(quadratic(params)))


def test_aux_errors():
    params = init_params()
    with pytest.raises(ValueError, match=r"aux_example=.*eval_shape"):
        fgrad_jax.forward_gradient(has_aux=True)
    with pytest.raises(ValueError, match="only used with has_aux=True"):
        fgrad_jax.forward_gradient(aux_example=jnp.zeros(()))
    tx = fgrad_jax.forward_gradient(has_aux=True, aux_example={"pred": jnp.zeros(3)})
    with pytest.raises(ValueError, match="does not match forward_gradient's aux_example"):
        tx.update(None, tx.init(params), params, value_fn=loss_with_aux)
    # A (loss, aux) pair without has_aux used to fail deep inside the estimator.
    tx = fgrad_jax.forward_gradient()
    with pytest.raises(TypeError, match=r"tuple.*has_aux=True"):
        tx.update(None, tx.init(params), params, value_fn=loss_with_aux)

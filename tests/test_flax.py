"""Training Flax models (nnx and linen) with forward gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training.train_state import TrainState

import fgrad_jax

pytestmark = pytest.mark.usefixtures("standard_promotion")


def make_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    y = np.argmax(x @ w, axis=1).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


X, Y = make_data()


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class NnxMLP(nnx.Module):
    def __init__(self, rngs, *, batch_norm=False, dropout=0.0):
        self.l1 = nnx.Linear(8, 32, rngs=rngs)
        self.bn = nnx.BatchNorm(32, rngs=rngs) if batch_norm else None
        self.do = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.l2 = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        h = self.l1(x)
        if self.bn is not None:
            h = self.bn(h)
        h = jax.nn.relu(h)
        if self.do is not None:
            h = self.do(h)
        return self.l2(h)


def nnx_loss(model, x, y):
    return xent(model(x), y)


def test_nnx_optimizer_with_forward_gradient_transform():
    model = NnxMLP(nnx.Rngs(0))
    tx = optax.chain(fgrad_jax.forward_gradient(key=0, num_tangents=4), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, x, y):
        traces.append(1)
        optimizer.update(model, None, value_fn=fgrad_jax.nnx_value_fn(nnx_loss, model, x, y))

    initial = float(nnx_loss(model, X, Y))
    for i in range(150):
        sl = slice((i * 32) % 256, (i * 32) % 256 + 32)
        step(model, optimizer, X[sl], Y[sl])
    assert len(traces) == 1
    fg_state = fgrad_jax.forward_gradient_state(optimizer.opt_state)
    assert int(fg_state.count) == 150
    assert np.isfinite(float(fg_state.value))
    assert float(nnx_loss(model, X, Y)) < 0.6 * initial


def test_nnx_batchnorm_and_dropout_state_written_back():
    model = NnxMLP(nnx.Rngs(0, dropout=1), batch_norm=True, dropout=0.3)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    grad_fn = fgrad_jax.nnx_value_and_forward_grad(nnx_loss, num_tangents=4, tangent="rademacher")

    @nnx.jit
    def step(model, optimizer, key, x, y):
        loss, grads = grad_fn(key, model, x, y)
        optimizer.update(model, grads)
        return loss

    rng_count_before = int(model.do.rngs.count[...])
    model.eval()
    initial = float(nnx_loss(model, X, Y))
    model.train()
    keys = jax.random.split(jax.random.key(0), 200)
    for i in range(200):
        sl = slice((i * 32) % 256, (i * 32) % 256 + 32)
        step(model, optimizer, keys[i], X[sl], Y[sl])
    # Batch statistics moved from their init (zeros / ones) once per step.
    mean = np.asarray(model.bn.mean[...])
    assert np.abs(mean).max() > 1e-2
    # Dropout's RNG stream advanced once per step (the primal pass), not 0 and not K times.
    assert int(model.do.rngs.count[...]) - rng_count_before == 200
    model.eval()
    assert float(nnx_loss(model, X, Y)) < 0.7 * initial


def test_nnx_batch_stats_match_a_plain_forward_pass():
    """The state written back is exactly what one train-mode forward pass produces."""
    model = NnxMLP(nnx.Rngs(0), batch_norm=True)
    reference = nnx.clone(model)
    grad_fn = fgrad_jax.nnx_value_and_forward_grad(nnx_loss, num_tangents=3)
    loss, _ = grad_fn(jax.random.key(1), model, X[:32], Y[:32])
    ref_loss = nnx_loss(reference, X[:32], Y[:32])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(model.bn.mean[...], reference.bn.mean[...], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.bn.var[...], reference.bn.var[...], rtol=1e-5, atol=1e-7)


def test_nnx_has_aux():
    model = NnxMLP(nnx.Rngs(0))

    def loss_with_acc(m, x, y):
        logits = m(x)
        return xent(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

    (loss, acc), grads = fgrad_jax.nnx_value_and_forward_grad(loss_with_acc, has_aux=True)(
        jax.random.key(0), model, X, Y
    )
    assert 0.0 <= float(acc) <= 1.0 and np.isfinite(float(loss))
    assert isinstance(grads, nnx.State)


def test_nnx_pure_step_vmaps_over_seeds():
    """A split/merge training step is pure: jit once, vmap over independent runs."""
    model = NnxMLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(0.1)
    grad = fgrad_jax.forward_grad(
        lambda p, x, y: xent(nnx.merge(graphdef, p)(x), y), num_tangents=2
    )

    def train(key):
        opt_state = tx.init(params)

        def body(carry, i):
            p, s = carry
            g = grad(jax.random.fold_in(key, i), p, X, Y)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, opt_state), jnp.arange(100))
        return xent(nnx.merge(graphdef, p)(X), Y)

    final = jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(3), 4))
    initial = float(xent(model(X), Y))
    assert final.shape == (4,)
    assert np.all(np.asarray(final) < 0.8 * initial)
    assert len(set(np.round(np.asarray(final), 6))) == 4


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.Dense(32)(x)
        h = nn.BatchNorm(use_running_average=not train)(h)
        h = nn.Dropout(0.2, deterministic=not train)(jax.nn.relu(h))
        return nn.Dense(3)(h)


class LinenPlain(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jax.nn.relu(nn.Dense(32)(x)))


def test_linen_train_state_apply_forward_gradient():
    model = LinenPlain()
    params = model.init(jax.random.key(0), X)["params"]
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=fgrad_jax.fgd(0.01, num_tangents=4)
    )

    @jax.jit
    def step(state, x, y):
        value_fn = lambda p: xent(state.apply_fn({"params": p}, x), y)
        return fgrad_jax.apply_forward_gradient(state, value_fn=value_fn)

    initial = float(xent(model.apply({"params": params}, X), Y))
    for i in range(200):
        sl = slice((i * 32) % 256, (i * 32) % 256 + 32)
        state = step(state, X[sl], Y[sl])
    assert int(state.step) == 200
    assert float(xent(model.apply({"params": state.params}, X), Y)) < 0.6 * initial


class BNTrainState(TrainState):
    batch_stats: dict


def test_linen_batch_stats_and_dropout_recipe():
    """The documented linen recipe: value_and_forward_grad with aux = new batch_stats."""
    model = LinenMLP()
    variables = model.init(jax.random.key(0), X, train=False)
    state = BNTrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.adam(1e-2),
        batch_stats=variables["batch_stats"],
    )
    base_key = jax.random.key(42)

    def loss_fn(params, batch_stats, x, y, dropout_key):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        return xent(logits, y), updates["batch_stats"]

    estimate = fgrad_jax.value_and_forward_grad(loss_fn, has_aux=True, num_tangents=4)

    @jax.jit
    def step(state, x, y):
        key = jax.random.fold_in(base_key, state.step)
        fg_key, dropout_key = jax.random.split(key)
        (loss, batch_stats), grads = estimate(
            fg_key, state.params, state.batch_stats, x, y, dropout_key
        )
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss

    def eval_loss(state):
        return float(
            xent(
                model.apply(
                    {"params": state.params, "batch_stats": state.batch_stats}, X, train=False
                ),
                Y,
            )
        )

    initial = eval_loss(state)
    for i in range(200):
        sl = slice((i * 32) % 256, (i * 32) % 256 + 32)
        state, _ = step(state, X[sl], Y[sl])
    stats_mean = jax.tree_util.tree_leaves(state.batch_stats)[0]
    assert np.abs(np.asarray(stats_mean)).max() > 1e-2
    assert eval_loss(state) < 0.7 * initial


# --- nnx: rngs in the loss, mutation, aux, wrt, advice ----------------------------------


class DropoutMLP(nnx.Module):
    """Dropout without stored rngs: keys come from an nnx.Rngs passed to the loss."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 32, rngs=rngs)
        self.do = nnx.Dropout(0.3)
        self.l2 = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x, rngs=None):
        return self.l2(self.do(jax.nn.relu(self.l1(x)), rngs=rngs))


def rngs_loss(model, rngs, x, y):
    return xent(model(x, rngs=rngs), y)


def test_nnx_value_fn_with_rngs_in_the_loss():
    """Used to fail with TraceContextError: Cannot mutate RngCount from a different trace."""
    model = DropoutMLP(nnx.Rngs(0))
    rngs = nnx.Rngs(dropout=1)
    tx = optax.chain(fgrad_jax.forward_gradient(key=0, num_tangents=4), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, rngs, x, y):
        value_fn = fgrad_jax.nnx_value_fn(rngs_loss, model, rngs, x, y)
        optimizer.update(model, None, value_fn=value_fn)

    model.eval()
    initial = float(nnx_loss(model, X, Y))
    model.train()
    for i in range(150):
        sl = slice((i * 32) % 256, (i * 32) % 256 + 32)
        step(model, optimizer, rngs, X[sl], Y[sl])
    # The stream advanced once per step (forked), so every step drew new dropout masks.
    assert int(rngs.dropout.count[...]) == 150
    model.eval()
    assert float(nnx_loss(model, X, Y)) < 0.7 * initial


def test_nnx_value_and_forward_grad_with_rngs_in_the_loss():
    model = DropoutMLP(nnx.Rngs(0))
    rngs = nnx.Rngs(dropout=1)
    reference_rngs = nnx.clone(rngs)
    grad_fn = fgrad_jax.nnx_value_and_forward_grad(rngs_loss, num_tangents=2)
    reference = nnx.clone(model)
    loss, grads = nnx.jit(grad_fn)(jax.random.key(0), model, rngs, X, Y)
    # Written back as nnx.value_and_grad does: one draw by the one Dropout layer.
    assert int(rngs.dropout.count[...]) == 1
    np.testing.assert_allclose(loss, rngs_loss(reference, reference_rngs, X, Y), rtol=1e-5)
    assert isinstance(grads, nnx.State)


def test_nnx_value_fn_refuses_state_it_would_lose():
    """BatchNorm statistics on the optimizer path were silently never updated."""
    tx = optax.chain(fgrad_jax.forward_gradient(key=0), optax.sgd(0.1))
    for model in (
        NnxMLP(nnx.Rngs(0), batch_norm=True),
        NnxMLP(nnx.Rngs(0, dropout=1), dropout=0.3),  # Dropout with its own stored rngs
    ):
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        with pytest.raises(
            ValueError, match=r"cannot write that state back.*nnx_value_and_forward_grad"
        ):
            optimizer.update(model, None, value_fn=fgrad_jax.nnx_value_fn(nnx_loss, model, X, Y))
        model.eval()  # an evaluation-mode pass mutates nothing: allowed
        optimizer.update(model, None, value_fn=fgrad_jax.nnx_value_fn(nnx_loss, model, X, Y))


def loss_and_logits(model, x, y):
    logits = model(x)
    return xent(logits, y), logits


def test_nnx_tuple_without_has_aux_names_has_aux():
    model = NnxMLP(nnx.Rngs(0))
    tx = optax.chain(fgrad_jax.forward_gradient(key=0), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with pytest.raises(TypeError, match="has_aux=True"):
        optimizer.update(model, None, value_fn=fgrad_jax.nnx_value_fn(loss_and_logits, model, X, Y))
    with pytest.raises(TypeError, match="has_aux=True"):
        fgrad_jax.nnx_value_and_forward_grad(loss_and_logits)(jax.random.key(0), model, X, Y)


def test_nnx_optimizer_aux_from_the_steps_own_pass():
    model = NnxMLP(nnx.Rngs(0))
    x, y = X[:32], Y[:32]
    aux_example = jax.ShapeDtypeStruct((32, 3), jnp.float32)  # the logits
    tx = optax.chain(
        fgrad_jax.forward_gradient(key=0, num_tangents=2, has_aux=True, aux_example=aux_example),
        optax.adam(1e-2),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        value_fn = fgrad_jax.nnx_value_fn(loss_and_logits, model, x, y, has_aux=True)
        optimizer.update(model, None, value_fn=value_fn)
        fg = fgrad_jax.forward_gradient_state(optimizer.opt_state)
        return fg.value, fg.aux

    expected_logits = model(x)
    loss, logits = step(model, optimizer, x, y)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, xent(expected_logits, y), rtol=1e-5)
    _, logits2 = step(model, optimizer, x, y)  # fixed state structure: no retrace error
    assert not np.allclose(logits2, logits)


def test_nnx_wrt_mismatch_is_a_clear_error():
    model = NnxMLP(nnx.Rngs(0))
    head_only = nnx.All(nnx.Param, nnx.PathContains("l2"))
    tx = optax.chain(fgrad_jax.forward_gradient(key=0, num_tangents=2), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=head_only)
    with pytest.raises(ValueError, match=r"filters differ.*wrt=optimizer.wrt"):
        optimizer.update(model, None, value_fn=fgrad_jax.nnx_value_fn(nnx_loss, model, X, Y))
    l1_before = np.asarray(model.l1.kernel[...]).copy()
    l2_before = np.asarray(model.l2.kernel[...]).copy()
    value_fn = fgrad_jax.nnx_value_fn(nnx_loss, model, X, Y, wrt=optimizer.wrt)
    optimizer.update(model, None, value_fn=value_fn)
    np.testing.assert_array_equal(model.l1.kernel[...], l1_before)
    assert not np.array_equal(model.l2.kernel[...], l2_before)


def test_value_fn_missing_error_advises_a_call_that_works():
    model = NnxMLP(nnx.Rngs(0))
    tx = optax.chain(fgrad_jax.forward_gradient(key=0), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with pytest.raises(ValueError) as info:
        optimizer.update(model, None)
    advice = "optimizer.update(model, None, value_fn=fgrad_jax.nnx_value_fn(loss_fn, model, x, y))"
    assert advice in str(info.value)
    loss_fn, x, y = nnx_loss, X, Y
    eval(
        advice,
        {
            "optimizer": optimizer,
            "model": model,
            "fgrad_jax": fgrad_jax,
            "loss_fn": loss_fn,
            "x": x,
            "y": y,
        },
    )
    assert int(fgrad_jax.forward_gradient_state(optimizer.opt_state).count) == 1


@pytest.mark.parametrize(
    ("make_tx", "steps"),
    [
        (lambda: fgrad_jax.guided_forward_gradient(1, num_tangents=2), 200),
        (lambda: fgrad_jax.spsa_gradient(1, num_samples=2), 300),
    ],
    ids=["guided", "spsa"],
)
def test_other_estimators_through_nnx_optimizer(standard_promotion, make_tx, steps):
    """guided_forward_gradient and spsa_gradient on the nnx.Optimizer path of the README."""
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (32, 4))
    y = x @ jnp.array([[1.0], [-2.0], [0.5], [0.0]])
    loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    optimizer = nnx.Optimizer(model, optax.chain(make_tx(), optax.adam(0.05)), wrt=nnx.Param)
    before = float(loss_fn(model, x, y))

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, None, value_fn=fgrad_jax.nnx_value_fn(loss_fn, model, x, y))

    for _ in range(steps):
        step(model, optimizer)
    assert float(loss_fn(model, x, y)) < 0.05 * before
    assert int(fgrad_jax.forward_gradient_state(optimizer.opt_state).count) == steps


def test_nnx_value_and_forward_grad_perturbs_activations_like_the_functional_form():
    """perturb="activations" through the nnx helper: the same estimate, bitwise, as
    value_and_forward_grad on the split parameters with the same key, and the reported loss
    is the mean of the per-example losses."""
    model = nnx.Sequential(
        nnx.Linear(5, 16, rngs=nnx.Rngs(0)), jax.nn.relu, nnx.Linear(16, 3, rngs=nnx.Rngs(1))
    )
    x = jax.random.normal(jax.random.key(2), (8, 5))
    y = jnp.arange(8) % 3

    def per_example(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y)

    key = jax.random.key(3)
    grad_fn = fgrad_jax.nnx_value_and_forward_grad(
        per_example, num_tangents=2, tangent="rademacher", perturb="activations"
    )
    loss, grads = grad_fn(key, model, x, y)
    graphdef, params = nnx.split(model, nnx.Param)
    ref_loss, ref = fgrad_jax.value_and_forward_grad(
        lambda p: per_example(nnx.merge(graphdef, p), x, y),
        num_tangents=2,
        tangent="rademacher",
        perturb="activations",
    )(key, params)
    np.testing.assert_allclose(loss, jnp.mean(per_example(model, x, y)), rtol=1e-6)
    np.testing.assert_array_equal(loss, ref_loss)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="perturb"):
        fgrad_jax.nnx_value_and_forward_grad(per_example, perturb="inputs")

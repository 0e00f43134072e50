"""tangent_chunk: the K tangents in chunks, one after the other, in bounded memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad_jax
from fgrad_jax import _estimator


def _params(width=64, depth=3):
    ks = jax.random.split(jax.random.key(0), depth + 1)
    sizes = [32] + [width] * depth + [4]
    return [
        {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(ks, sizes[:-1], sizes[1:])
    ]


def _loss(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    out = x @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean(out**2), out


@pytest.mark.parametrize("tangent", ["rademacher", "normal", "lowrank", "sphere"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_chunks_give_the_same_estimate(tangent, chunk):
    params, x = _params(), jax.random.normal(jax.random.key(1), (16, 32))
    key = jax.random.key(2)
    est = lambda c: jax.jit(
        fgrad_jax.value_and_forward_grad(
            _loss, num_tangents=4, tangent=tangent, has_aux=True, tangent_chunk=c
        )
    )(key, params, x)
    (v1, aux1), g1 = est(None)
    (v2, aux2), g2 = est(chunk)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(aux1, aux2)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_memory_does_not_grow_with_k():
    """Compiled temp bytes (batch 2048, width 512): in chunks of one tangent the working
    memory is the same for K=4 and K=8 (within 5 %) and under a quarter of K=8 at once."""
    params, x = _params(width=512), jax.random.normal(jax.random.key(1), (2048, 32))

    def temp(k, chunk):
        f = fgrad_jax.forward_grad(
            lambda p, x: _loss(p, x)[0], num_tangents=k, tangent="rademacher", tangent_chunk=chunk
        )
        compiled = jax.jit(f).lower(jax.random.key(0), params, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    at_once, chunked4, chunked8 = temp(8, 8), temp(4, 1), temp(8, 1)
    assert chunked8 <= 1.05 * chunked4, (chunked8, chunked4)
    assert chunked8 < 0.25 * at_once, (chunked8, at_once)


@pytest.mark.parametrize(("bad", "err"), [(3, ValueError), (0, ValueError), (1.5, TypeError)])
def test_bad_chunk_names_the_fix(bad, err):
    with pytest.raises(err, match="tangent_chunk"):
        fgrad_jax.forward_grad(lambda w: jnp.sum(w**2), num_tangents=4, tangent_chunk=bad)(
            jax.random.key(0), jnp.ones(3)
        )


def test_forward_gradient_passes_tangent_chunk_through():
    params, x = _params(), jax.random.normal(jax.random.key(1), (16, 32))

    def updates(chunk):
        tx = fgrad_jax.forward_gradient(key=3, num_tangents=4, tangent_chunk=chunk)
        return jax.jit(
            lambda p: tx.update(None, tx.init(p), p, value_fn=lambda q: _loss(q, x)[0])[0]
        )(params)

    for a, b in zip(
        jax.tree_util.tree_leaves(updates(None)), jax.tree_util.tree_leaves(updates(2))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tangent_chunk"):
        updates(3)


def test_auto_chunk_rule():
    mib = 1 << 20
    assert 1024 * mib == _estimator.AUTO_CHUNK_BYTES
    assert _estimator.auto_chunk(4, 1 * mib) == 4  # small: all at once
    assert _estimator.auto_chunk(32, 13 * mib) == 32  # a conv net's K=32 activations: at once
    assert _estimator.auto_chunk(4, 1 << 30) == 1  # a language model's logits: one at a time
    assert _estimator.auto_chunk(6, 320 * mib) == 3  # 3 copies fit, and 3 divides 6
    assert _estimator.auto_chunk(8, 320 * mib) == 2  # 3 copies fit, 2 is the divisor below
    assert _estimator.auto_chunk(1, 1 << 30) == 1


def test_default_chunks_when_the_tangents_intermediates_are_large(monkeypatch):
    """With the default, a function whose K copies of its largest intermediate exceed the
    limit runs in chunks: compiled temp memory as with the chunk the rule picks, and an
    estimate bitwise that of the explicit chunk; below the limit, all at once."""
    params, x = _params(width=512), jax.random.normal(jax.random.key(1), (2048, 32))
    f = lambda p, x: _loss(p, x)[0]
    largest = 2048 * 512 * 4  # the (2048, 512) hidden activations
    traced = jax.make_jaxpr(f)(params, x)
    assert _estimator.largest_intermediate_bytes(traced.jaxpr) == largest

    def compiled(chunk):
        est = fgrad_jax.forward_grad(f, num_tangents=8, tangent="rademacher", tangent_chunk=chunk)
        return jax.jit(est).lower(jax.random.key(0), params, x).compile()

    temp = lambda c: compiled(c).memory_analysis().temp_size_in_bytes
    assert temp(None) == temp(8)  # 8 x 4 MiB fits in 1 GiB
    monkeypatch.setattr(_estimator, "AUTO_CHUNK_BYTES", 2 * largest)
    assert temp(None) == temp(2) < 0.5 * temp(8)
    key = jax.random.key(3)
    a, b = compiled(None)(key, params, x), compiled(2)(key, params, x)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(u, v)

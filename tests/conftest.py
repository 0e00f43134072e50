import os

# Several CPU devices for the sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    """Returns a function that gives a fresh PRNG key at each call (deterministic per test)."""
    state = {"key": jax.random.key(12345)}

    def _getkey():
        state["key"], sub = jax.random.split(state["key"])
        return sub

    return _getkey


@pytest.fixture
def standard_promotion():
    """optax.adam's bias correction (int count ** float) is not strict-promotion clean."""
    with jax.numpy_dtype_promotion("standard"):
        yield

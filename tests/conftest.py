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


FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"


def require_fashion_mnist() -> None:
    """Skips (outside CI) or fails (with CI set) when Debian's Fashion-MNIST is missing."""
    from fgrad_jax import datasets

    if os.path.isdir(datasets.DEFAULT_FASHION_MNIST_DIR):
        return
    reason = (
        f"Fashion-MNIST is not in {datasets.DEFAULT_FASHION_MNIST_DIR}; install it with "
        f"`{FASHION_MNIST_INSTALL}`"
    )
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(reason + " (CI is set, so this test is mandatory)")
    pytest.skip(reason)


@pytest.fixture
def fashion_mnist():
    """For tests that read the real Fashion-MNIST files (mandatory when CI is set)."""
    require_fashion_mnist()

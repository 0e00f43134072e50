import os

# Set before jax initialises: several CPU devices for the sharding tests, and LLVM's
# optimisation level 0. The suite is bound by compile time, and XLA:CPU (jax 0.10.2) spends
# seconds of LLVM optimisation on threefry draws of small 4-D shapes, i.e. every conv
# kernel's init: jax.random.normal(key, (3, 3, 8, 16)) compiles in 8.2 s at the default
# level, 0.34 s at level 0 (tests/test_local_model.py: 495 s -> 167 s). HLO passes, buffer
# assignment and the optimised HLO the tests read are unchanged; values agree within the
# tolerances the tests state.
_FLAGS = {
    "--xla_force_host_platform_device_count": "8",
    "--xla_backend_optimization_level": "0",
}
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_given] + [f"{k}={v}" for k, v in _FLAGS.items() if k not in _given]
).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

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

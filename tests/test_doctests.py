"""The runnable examples in the public docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "fgrad_jax._estimator",
    "fgrad_jax._transform",
    "fgrad_jax._flax",
    "fgrad_jax._local",
    "fgrad_jax._spsa",
    "fgrad_jax._guided",
    "fgrad_jax.diagnostics",
]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.usefixtures("standard_promotion")
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0

"""The runnable examples in the docstrings of the SPSA, guided and diagnostics modules."""

import doctest
import importlib

import pytest

MODULES = ["fgrad_jax._spsa", "fgrad_jax._guided", "fgrad_jax.diagnostics"]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.usefixtures("standard_promotion")
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0

"""The runnable examples in the public docstrings run and print what they claim."""

import doctest
import importlib

import pytest

import fgrad_jax

# Every module that defines a public name of fgrad_jax, found rather than listed.
MODULES = sorted(
    m
    for m in {getattr(getattr(fgrad_jax, name), "__module__", None) for name in fgrad_jax.__all__}
    | {f"fgrad_jax.{name}" for name in ("datasets", "diagnostics")}
    if isinstance(m, str) and m.startswith("fgrad_jax")
)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.usefixtures("standard_promotion")
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0

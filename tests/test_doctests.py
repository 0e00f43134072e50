"""Every runnable example in fgrad_jax's docstrings runs and prints what it claims.

The examples are discovered, not listed: pkgutil walks every module of the package, the private
ones included (the public functions are defined there), so the examples of a new or renamed
module run without an edit here. Each docstring is its own test, named after the object
(``fgrad_jax._estimator.forward_grad``), and a failure shows doctest's report of every failing
example in it.
"""

import doctest
import importlib
import inspect
import pkgutil
import sys
import types

import pytest

import fgrad_jax

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

MODULES = ["fgrad_jax"] + [
    info.name for info in pkgutil.walk_packages(fgrad_jax.__path__, prefix="fgrad_jax.")
]

# Docstrings whose examples fail today, by test name, each with the reason. Their examples
# are still run (strict xfail): once the docstring is fixed the test passes unexpectedly and
# fails, so that its entry is removed here. Keep this empty.
KNOWN_FAILURES: dict[str, str] = {}

# Public functions with no example in their docstring, each with the reason. Keep it short:
# a public function shows how it is called. The "pending" ones wait for the examples
# proposed with the docs-autodoc branch; once they are in, the last test below says to
# remove their entries.
WITHOUT_EXAMPLE: dict[str, str] = {
    "fgrad_jax.datasets.cache_dir": "its value depends on $FGRAD_JAX_DATA and the home directory",
}


def _docstring_tests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    found: dict[str, doctest.DocTest] = {}
    for name in MODULES:
        for test in finder.find(importlib.import_module(name)):
            if test.examples:
                found.setdefault(test.name, test)
    return [found[name] for name in sorted(found)]


DOCTESTS = _docstring_tests()


def _marks(test: doctest.DocTest) -> list[pytest.MarkDecorator]:
    reason = KNOWN_FAILURES.get(test.name)
    return [pytest.mark.xfail(reason=reason, strict=True)] if reason else []


@pytest.mark.parametrize("test", [pytest.param(t, id=t.name, marks=_marks(t)) for t in DOCTESTS])
@pytest.mark.usefixtures("standard_promotion")
def test_docstring_examples(test):
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    test.globs = dict(test.globs)  # each run starts from the module's namespace
    result = runner.run(test, out=report.append, clear_globs=False)
    assert result.failed == 0, "".join(report)


def _public_functions() -> list[str]:
    """Fully qualified names of the functions exported by fgrad_jax and its public modules."""
    names = []
    modules = [fgrad_jax] + [v for v in vars(fgrad_jax).values() if isinstance(v, types.ModuleType)]
    for module in modules:
        for name in getattr(module, "__all__", ()):
            if inspect.isfunction(getattr(module, name)):
                names.append(f"{module.__name__}.{name}")
    return names


def _defined_name(public: str) -> str:
    """Where the docstring of ``fgrad_jax.name`` lives: ``fgrad_jax._module.name``."""
    module, name = public.rsplit(".", 1)
    fun = getattr(importlib.import_module(module), name)
    return f"{fun.__module__}.{fun.__qualname__}"


def test_discovery_covers_every_module():
    """Every fgrad_jax module that importing the package loads is walked."""
    loaded = {m for m in sys.modules if m == "fgrad_jax" or m.startswith("fgrad_jax.")}
    assert loaded <= set(MODULES), sorted(loaded - set(MODULES))
    assert set(KNOWN_FAILURES) <= {t.name for t in DOCTESTS}, "stale KNOWN_FAILURES entry"


def test_every_public_function_has_an_example():
    """Each public function's own docstring (wherever it is defined) has a runnable example."""
    with_example = {t.name for t in DOCTESTS}
    missing = [
        f"{public} (in {_defined_name(public)})"
        for public in _public_functions()
        if _defined_name(public) not in with_example and public not in WITHOUT_EXAMPLE
    ]
    assert not missing, f"public functions without a docstring example: {missing}"
    stale = [name for name in WITHOUT_EXAMPLE if _defined_name(name) in with_example]
    assert not stale, f"these have an example now; remove them from WITHOUT_EXAMPLE: {stale}"

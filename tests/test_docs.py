"""The Sphinx site builds with warnings as errors, and its API reference covers the public API.

The build is the one a user runs (``python -m sphinx -W -b html docs OUT``) with intersphinx
switched off (``FGRAD_DOCS_INTERSPHINX=0``): the inventories come from the network, which CI
lacks, and links to other projects are no part of what is checked here. References to
fgrad_jax's own API are checked (``nitpicky`` in docs/conf.py), so a docstring that names a
renamed function fails the build.
"""

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import fgrad_jax

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def public_modules() -> list[str]:
    """``fgrad_jax`` and every module of it with no component starting with an underscore."""
    found = ["fgrad_jax"]
    for info in pkgutil.walk_packages(fgrad_jax.__path__, "fgrad_jax."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return found


def public_names() -> list[str]:
    """The fully qualified names every module in :func:`public_modules` exports."""
    names = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if not isinstance(getattr(module, name), types.ModuleType):  # modules: by name
                names.append(f"{module_name}.{name}")
    return names


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    env = dict(os.environ, FGRAD_DOCS_INTERSPHINX="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", DOCS, out],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, f"the docs build has warnings or errors:\n{proc.stderr[-5000:]}"
    assert not proc.stderr.strip(), proc.stderr[-5000:]
    return out


def test_sphinx_build_has_no_warnings(html):
    assert (html / "index.html").is_file()


def test_every_public_name_has_an_entry_in_the_api_reference(html):
    page = (html / "api.html").read_text()
    missing = [name for name in public_names() if f'id="{name}"' not in page]
    assert not missing, f"public names without an autodoc entry in docs/api.md: {missing}"
    modules = [m for m in public_modules()[1:] if f'id="module-{m}"' not in page]
    assert not modules, f"public modules without an automodule in docs/api.md: {modules}"


def test_at_a_glance_lists_every_top_level_name():
    """The orientation tables are autosummary lists of names: no signature to drift."""
    text = (DOCS / "api.md").read_text()
    start = text.index("## At a glance")
    glance = text[start : text.index("\n## ", start + 1)]
    listed = set()
    for block in re.findall(r"\.\. autosummary::\n((?:\n|   .*\n)+)", glance):
        listed |= {line.strip() for line in block.splitlines() if line.strip()}
    assert listed == set(fgrad_jax.__all__), (
        f"not in the tables: {sorted(set(fgrad_jax.__all__) - listed)}; "
        f"not public: {sorted(listed - set(fgrad_jax.__all__))}"
    )


def test_prose_keywords_of_the_api_page_exist():
    """A ``name(keyword=...)`` written by hand in docs/api.md names a real keyword."""
    found = re.findall(r"`(?:fgrad_jax\.)?(\w+)\((\w+)=", (DOCS / "api.md").read_text())
    assert found, "no name(keyword=...) in docs/api.md: drop this test"
    for name, keyword in found:
        assert name in fgrad_jax.__all__, name
        assert keyword in inspect.signature(getattr(fgrad_jax, name)).parameters, (name, keyword)


def test_engineering_log_is_out_of_the_user_guide(html):
    index = (DOCS / "index.md").read_text()
    for block in re.findall(r"```\{toctree\}\n(.*?)```", index, flags=re.S):
        if ":hidden:" not in block:
            assert "engineering_log" not in block, "the engineering log is in the user guide"
    assert (html / "engineering_log.html").is_file()

"""Sphinx configuration for fgrad_jax (myst markdown, API from the docstrings).

Build (warnings are errors, as in tests/test_docs.py)::

    python -m sphinx -W -b html docs /tmp/docs_html
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import socket

project = "fgrad_jax"
author = "fgrad_jax developers"
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
]
myst_enable_extensions = ["dollarmath", "amsmath"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = [
    "_build",
    "_static/quick/*.md",
    "_static/quality_quick/*.md",
    "_static/quality_full/*.md",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_typehints = "description"
# Types of the documented parameters only: a NamedTuple's fields are its Attributes, not a
# second "Parameters" list.
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
# Defaults as written in the source (`wrt=nnx.Param`, not "<class ...variablelib.Param>").
autodoc_preserve_defaults = True
# The summary tables of docs/api.md only link to the entries on that page; no stub pages
# are generated into the source tree.
autosummary_generate = False
# A broken reference to fgrad_jax's own API (a renamed function in a docstring) is a warning,
# so -W fails the build; references to other projects resolve through intersphinx when online
# and are not checked, nor are the private classes that some annotations name.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!fgrad_jax\.)\w+\..*"),
    (r"py:.*", r"fgrad_jax\._.*"),
]
html_theme = "alabaster"
html_static_path = ["_static"]

# Intersphinx links {func}`jax.jvp` & co. to the projects' own docs, but their inventories
# (objects.inv) come from the network. Offline (CI, sandboxes) Sphinx reports each unreachable
# inventory with an untyped warning, which -W turns into an error and suppress_warnings
# cannot silence; so the mapping is used only when the hosts resolve. The references then
# render as plain code, without a warning. FGRAD_DOCS_INTERSPHINX=0 or 1 forces either way.
_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "jax": ("https://docs.jax.dev/en/latest/", None),
    "optax": ("https://optax.readthedocs.io/en/latest/", None),
    "flax": ("https://flax.readthedocs.io/en/latest/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
}


def _online() -> bool:
    forced = os.environ.get("FGRAD_DOCS_INTERSPHINX", "").strip()
    if forced:
        return forced.lower() not in ("0", "false", "no", "off")
    hosts = {url.split("/")[2] for url, _ in _INTERSPHINX.values()}
    try:
        for host in hosts:
            socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


intersphinx_mapping = _INTERSPHINX if _online() else {}
intersphinx_timeout = 10


def _attribute_docs() -> dict[str, tuple[object, list[str]]]:
    """Doc comments and docstrings of module-level names in every fgrad_jax module.

    Re-exported data (``fgrad_jax.Tangent``, an alias defined in a private module) carries
    its documentation in its defining module's source, which autodoc does not read when it
    documents the name where it is re-exported.
    """
    from sphinx.pycode import ModuleAnalyzer

    import fgrad_jax

    found: dict[str, tuple[object, list[str]]] = {}
    for info in pkgutil.walk_packages(fgrad_jax.__path__, "fgrad_jax."):
        module = importlib.import_module(info.name)
        try:
            docs = ModuleAnalyzer.for_module(info.name).find_attr_docs()
        except Exception:  # no source to read
            continue
        for (scope, name), lines in docs.items():
            if not scope and hasattr(module, name):
                found.setdefault(name, (getattr(module, name), list(lines)))
    return found


def _data_docstring(app, what, name, obj, options, lines) -> None:
    """A data entry shows its own documentation, never the docstring of its type.

    Without a doc comment autodoc falls back to ``type(obj).__doc__`` (``tuple``'s
    "Built-in immutable sequence." for ``TANGENT_NAMES``); use the documentation in the
    defining module's source instead, or nothing.
    """
    if what not in ("data", "attribute"):
        return
    inherited = getattr(type(obj), "__doc__", None)
    if lines and not (isinstance(inherited, str) and _words(lines) == _words([inherited])):
        return  # its own documentation
    value, doc = _ATTRIBUTE_DOCS.get(name.rsplit(".", 1)[-1], (None, []))
    lines[:] = doc if what == "data" and value is obj else []


def _words(lines: list[str]) -> list[str]:
    return " ".join(lines).split()


_ATTRIBUTE_DOCS: dict[str, tuple[object, list[str]]] = {}


def _skip_tuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented in the class's Attributes, not as "Alias for field"."""
    if re.fullmatch(r"Alias for field number \d+", getattr(obj, "__doc__", None) or ""):
        return True
    return None


def setup(app):
    _ATTRIBUTE_DOCS.update(_attribute_docs())
    app.connect("autodoc-process-docstring", _data_docstring)
    app.connect("autodoc-skip-member", _skip_tuple_fields)

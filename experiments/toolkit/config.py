"""Dataclass configurations and the one helper that overrides them from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _field_help(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of a Google-style docstring."""
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    current = None
    for line in doc.split("Attributes:", 1)[-1].splitlines():
        m = re.match(r"\s{4,8}(\w+): (.*)", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
        elif current:
            current = None
    return out


def _scalar(tp: Any) -> Any:
    """``X`` for ``X | None``; else ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_overrides(parser: argparse.ArgumentParser, cls: type, fields: Sequence[str]) -> None:
    """Adds one ``--field-name`` option per named field of the dataclass ``cls``.

    The option's type comes from the field's annotation (``tuple[X, ...]`` takes one or more
    values); its help from the class docstring's ``Attributes:`` section. Options default to
    ``None``, meaning "keep the configured value".
    """
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in fields:
        if name not in names:
            raise ValueError(f"{cls.__name__} has no field {name!r}; fields are {sorted(names)}.")
        tp = _scalar(hints[name])
        kw: dict[str, Any] = {"default": None, "help": helps.get(name)}
        if typing.get_origin(tp) is tuple:
            kw.update(nargs="+", type=typing.get_args(tp)[0])
        elif tp is bool:
            kw.update(type=lambda s: s.lower() in ("1", "true", "yes"), metavar="BOOL")
        else:
            kw.update(type=tp)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **kw)


def apply_overrides(cfg: T, args: argparse.Namespace | dict[str, Any]) -> T:
    """A copy of the dataclass ``cfg`` with every field that ``args`` sets to a non-``None``
    value replaced (lists become tuples; other names in ``args`` are ignored)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in values.items()
        if k in names and v is not None
    }
    return dataclasses.replace(cfg, **changes)


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """The dataclass ``cls`` from a JSON object (a preset in ``configs/``; lists -> tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

"""The environment a result was measured in: machine, library versions, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .io import to_jsonable

_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(config: Any = None) -> dict[str, Any]:
    """The machine, the library versions, the git commit and ``config`` (the run's full
    configuration, stored verbatim), JSON-friendly. Versions are read from the installed
    distributions, so recording them imports nothing (torch is slow to import); torch's
    thread count is recorded only when torch is already imported."""
    import fgrad_jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    env: dict[str, Any] = {
        "device": dev.platform if kind == dev.platform else f"{dev.platform}: {kind}",
        "device_kind": kind,
        "backend": jax.default_backend(),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib") or jax.__version__,
        "flax": _version("flax"),
        "optax": _version("optax"),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "fgrad_jax": fgrad_jax.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "config": to_jsonable(config),
    }
    if "torch" in sys.modules:
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env

"""Reading and writing results: JSON, JSONL metrics, orbax checkpoints, and the environment a
result was measured in (machine, library versions, git commit)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def to_jsonable(obj: Any) -> Any:
    """Converts dataclasses, tuples, NumPy scalars and arrays into JSON-friendly values.

    Non-finite floats become ``None``: JSON has no ``inf`` or ``nan``, and a diverged run's
    loss must still be written.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON (non-finite floats become ``null``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file."""
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSONL file into a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class JsonlLogger:
    """Appends one JSON object per line; on resume drops lines past the restored step.

    Dropping them keeps each step exactly once in the log after an interruption between
    a logged chunk and its checkpoint.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
        else:
            keep = [r for r in read_jsonl(self.path) if r.get("step", -1) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree: PyTree) -> PyTree:
    # Orbax stores plain arrays only; typed PRNG keys are saved as their raw key data.
    return jax.tree_util.tree_map(
        lambda x: np.asarray(jax.random.key_data(x)) if _is_key(x) else np.asarray(x), tree
    )


def _from_saved(saved: PyTree, template: PyTree) -> PyTree:
    def restore(s, t):
        if _is_key(t):
            return jax.random.wrap_key_data(jnp.asarray(s), impl=jax.random.key_impl(t))
        return (np.asarray if isinstance(t, np.ndarray) else jnp.asarray)(s, dtype=t.dtype)

    return jax.tree_util.tree_map(restore, saved, template)


class Checkpointer:
    """Orbax checkpoints of a pytree that may hold typed PRNG keys (keeps the latest)."""

    def __init__(self, directory: str | os.PathLike):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            Path(directory).resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=1)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, tree: PyTree) -> None:
        self.manager.save(step, args=self._ocp.args.StandardSave(_to_saveable(tree)))
        self.manager.wait_until_finished()

    def restore(self, step: int, template: PyTree) -> PyTree:
        saved = self.manager.restore(
            step, args=self._ocp.args.StandardRestore(_to_saveable(template))
        )
        return _from_saved(saved, template)

    def close(self) -> None:
        self.manager.close()


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
        **{dist: _version(dist) for dist in ("flax", "optax")},
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

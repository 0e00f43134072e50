"""Reading and writing results: JSON, JSONL metrics and orbax checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
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
    return jax.tree_util.tree_map(
        lambda s, t: (
            jax.random.wrap_key_data(jnp.asarray(s), impl=jax.random.key_impl(t))
            if _is_key(t)
            else (
                np.asarray(s, dtype=t.dtype)
                if isinstance(t, np.ndarray)
                else jnp.asarray(s, dtype=t.dtype)
            )
        ),
        saved,
        template,
    )


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

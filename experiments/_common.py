"""Shared machinery of the experiment scripts.

* :func:`train_arms`: trains several *arms* (a method -- ``"fgd"`` or ``"sgd"`` -- with a
  grid of runs, each run a (learning rate, seed) pair) side by side in one process. All
  runs of an arm are one ``jax.vmap``-ed, ``lax.scan``-ed program; the arms' chunks are
  interleaved and timed (compilation excluded), checkpointed with orbax and resumable with
  bit-identical results.
* :func:`measure_runtime`: the paper's R_f and R_b -- the time of one FGD / backprop
  iteration divided by the time of one evaluation of f -- measured side by side,
  warmed up, interleaved, as medians; plus XLA's compiled memory analysis.
* JSONL logging, environment capture, time-to-threshold.

FGD is :func:`fgrad_jax.fgd` (Algorithm 1 of Baydin et al. 2022) and backprop is
:func:`optax.sgd` on :func:`jax.value_and_grad`, both with the learning-rate schedule
``eta_i = eta_0 * exp(-i * k)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgrad_jax

Array = jax.Array
PyTree = Any

METHODS = ("fgd", "sgd")


# ----------------------------------------------------------------------------- config / io


def to_jsonable(obj: Any) -> Any:
    """Converts dataclasses, tuples, NumPy scalars and arrays into JSON-friendly values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSONL file into a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def environment(config: Any = None) -> dict:
    """Describes the machine, the library versions and the git commit.

    Args:
        config: The full configuration, stored verbatim.

    Returns:
        A JSON-friendly dict.
    """
    import flax

    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10
            )
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    dev = jax.devices()[0]
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": dev.platform
        if getattr(dev, "device_kind", dev.platform) == dev.platform
        else f"{dev.platform}: {dev.device_kind}",
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "fgrad_jax": fgrad_jax.__version__,
        "numpy": np.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "config": to_jsonable(config),
    }


class JsonlLogger:
    """Appends one JSON object per line; on resume drops lines past the restored step."""

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


# ----------------------------------------------------------------------------- optimisers


def exp_decay(lr: Array | float, k: float) -> optax.Schedule:
    """``eta_i = lr * exp(-i * k)`` (works with a traced ``lr`` under vmap)."""

    def schedule(count):
        return lr * jnp.exp(jnp.float32(-k) * jnp.asarray(count).astype(jnp.float32))

    return schedule


def make_tx(
    method: str, lr: Array | float, decay_k: float, key: Array | int = 0, tangent: str = "normal"
):
    """The optimiser of an arm: ``fgrad_jax.fgd`` or ``optax.sgd`` with exponential decay.

    ``tangent`` is FGD's tangent distribution (the paper's is ``"normal"``).
    """
    sched = exp_decay(lr, decay_k)
    if method == "fgd":
        return fgrad_jax.fgd(sched, key=key, tangent=tangent)
    if method == "sgd":
        return optax.sgd(sched)
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}.")


def make_step(method: str, loss_fn: Callable, decay_k: float, tangent: str = "normal") -> Callable:
    """One iteration ``(lr, params, opt_state, batch) -> (params, opt_state, loss)``.

    The returned loss is the loss at the parameters *before* the update, which both
    methods get for free (FGD from the JVP's primal, backprop from value_and_grad).
    """

    def step(lr, params, opt_state, batch):
        tx = make_tx(method, lr, decay_k, tangent=tangent)
        if method == "fgd":
            updates, opt_state = tx.update(
                None, opt_state, params, value_fn=lambda p: loss_fn(p, batch)
            )
            value = opt_state[0].value  # ForwardGradientState.value: loss from the same JVP
        else:
            value, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


# ----------------------------------------------------------------------------- checkpoints


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree: PyTree) -> PyTree:
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
    """Orbax checkpoints of a pytree that may hold typed PRNG keys."""

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


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class Arm:
    """One method trained on a grid of runs (one learning rate and one seed per run).

    Attributes:
        name: Unique name, used in file names (e.g. ``"fgd_lr2e-05"``).
        method: ``"fgd"`` or ``"sgd"``.
        lrs: Initial learning rate of each run.
        seeds: Seed of each run (parameter init, tangents, batches); same length as ``lrs``.
    """

    name: str
    method: str
    lrs: Sequence[float]
    seeds: Sequence[int]


@dataclasses.dataclass
class ArmResult:
    """What :func:`train_arms` returns for one arm.

    Attributes:
        losses: ``(runs, steps)`` training (minibatch) loss before each step.
        step_time: ``(steps,)`` cumulative wall time (s) at the end of each step, for the
            whole vmapped program (all runs at once), compilation excluded.
        params: Final parameters, stacked over runs.
        traj: ``(runs, steps + 1, ...)`` parameter trajectory when recorded, else ``None``.
        wall_time: Total timed wall time (s).
    """

    losses: np.ndarray
    step_time: np.ndarray
    params: PyTree
    traj: np.ndarray | None
    wall_time: float


def train_arms(
    arms: Sequence[Arm],
    loss_fn: Callable[[PyTree, Any], Array],
    init_params: Callable[[Array], PyTree],
    sample_batch: Callable[[Array], Any] | None,
    *,
    num_steps: int,
    decay_k: float,
    chunk: int,
    log_every: int = 1,
    out_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    record_params: bool = False,
    stop_after_chunks: int | None = None,
    progress: bool = True,
    desc: str = "",
    run_axis: str = "vmap",
    scan: bool = True,
    tangent: str = "normal",
) -> dict[str, ArmResult] | None:
    """Trains the arms side by side, chunk by chunk, interleaved and timed.

    Run ``r`` of every arm starts from ``init_params(fold_in(key(seed_r), 0))`` and draws
    its minibatch at step ``i`` with ``sample_batch(fold_in(fold_in(key(seed_r), 2), i))``
    -- identical for FGD and SGD -- and FGD draws tangents from ``fold_in(key(seed_r), 1)``.
    So a run is a pure function of its seed, and resuming from a checkpoint reproduces an
    uninterrupted run exactly.

    Args:
        arms: The arms.
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        init_params: ``init_params(key) -> params``.
        sample_batch: ``sample_batch(key) -> batch`` or ``None`` (deterministic objective).
        num_steps: Iterations per run; a multiple of ``chunk``.
        decay_k: ``k`` of the learning-rate decay ``eta_i = eta_0 exp(-i k)``.
        chunk: Iterations per compiled ``lax.scan`` chunk (the timing granularity).
        log_every: Steps per JSONL record (mean loss over the window, per run).
        out_dir: Where ``<arm.name>.jsonl`` go (none if ``None``).
        checkpoint_dir: Orbax checkpoint directory; when it holds a checkpoint, training
            resumes from it.
        checkpoint_every: Save every this many chunks (and after the last one).
        record_params: Also record the parameter trajectory (for 2-D problems).
        stop_after_chunks: Stop (as if interrupted) after this many chunks in this call;
            returns ``None`` then. For testing resume.
        progress: Show a tqdm progress bar.
        desc: Progress-bar label.
        run_axis: ``"vmap"`` (all runs of an arm as one vectorised program) or ``"map"``
            (one compiled program looping over the runs with ``lax.map``; use it for
            convolutions on CPU, where vmapping over parameters gives slow grouped
            convolutions). Both give the same numbers.
        scan: Run a chunk as one compiled ``lax.scan`` (default) or as ``chunk`` calls of
            one compiled step from Python (for the CNN on CPU, see the comment inside).
        tangent: FGD's tangent distribution (``"normal"``: the paper's).

    Returns:
        ``{arm.name: ArmResult}``, or ``None`` if stopped early.
    """
    from tqdm.auto import tqdm

    if num_steps % chunk:
        raise ValueError(f"num_steps={num_steps} must be a multiple of chunk={chunk}.")
    num_chunks = num_steps // chunk

    state, compiled = {}, {}
    for arm in arms:
        if len(arm.lrs) != len(arm.seeds):
            raise ValueError(f"arm {arm.name}: lrs and seeds must have the same length.")
        seeds = jnp.asarray(arm.seeds, jnp.uint32)
        lrs = jnp.asarray(arm.lrs, jnp.float32)
        base = jax.vmap(jax.random.key)(seeds)
        pkeys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(base)
        tkeys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(base)
        dkeys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(base)
        params = jax.vmap(init_params)(pkeys)
        opt_state = jax.vmap(
            lambda lr, k, p, m=arm.method: make_tx(m, lr, decay_k, key=k, tangent=tangent).init(p)
        )(lrs, tkeys, params)
        runs = len(arm.seeds)
        st = {
            "params": params,
            "opt_state": opt_state,
            "losses": np.zeros((runs, num_steps), np.float32),
            "chunk_time": np.zeros((num_chunks,), np.float64),
        }
        if record_params:
            flat0 = np.asarray(jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(params))
            st["traj"] = np.zeros((runs, num_steps + 1, flat0.shape[1]), flat0.dtype)
            st["traj"][:, 0] = flat0
        state[arm.name] = st
        step = make_step(arm.method, loss_fn, decay_k, tangent)

        def one_step(lr, p, s, dkey, i, step=step):
            batch = None if sample_batch is None else sample_batch(jax.random.fold_in(dkey, i))
            p, s, value = step(lr, p, s, batch)
            flat = jax.flatten_util.ravel_pytree(p)[0] if record_params else jnp.zeros(())
            return p, s, value.astype(jnp.float32), flat

        def run_one(lr, p, s, dkey, start, one_step=one_step):
            def body(carry, i):
                p, s, value, flat = one_step(lr, *carry, dkey, i)
                return (p, s), (value, flat)

            (p, s), (vals, flats) = jax.lax.scan(body, (p, s), start + jnp.arange(chunk))
            return p, s, vals, flats

        if run_axis == "vmap":
            batched_one = jax.vmap(one_step, in_axes=(0, 0, 0, 0, None))
            chunk_fn = jax.jit(jax.vmap(run_one, in_axes=(0, 0, 0, 0, None)))
        elif run_axis == "map":

            def batched_one(lrs, p, s, dkeys, i, one_step=one_step):
                return jax.lax.map(lambda a: one_step(*a, i), (lrs, p, s, dkeys))

            def chunk_fn_map(lrs, p, s, dkeys, start, run_one=run_one):
                return jax.lax.map(lambda a: run_one(*a, start), (lrs, p, s, dkeys))

            chunk_fn = jax.jit(chunk_fn_map)
        else:
            raise ValueError(f"run_axis must be 'vmap' or 'map'; got {run_axis!r}.")
        if not scan:
            # One compiled step, called `chunk` times from Python (XLA:CPU runs the
            # backward pass of convolutions inside a while loop ~40x slower).
            step_c = (
                jax.jit(batched_one).lower(lrs, params, opt_state, dkeys, jnp.int32(0)).compile()
            )

            def chunk_fn_py(lrs, p, s, dkeys, start, step_c=step_c):
                vals, flats = [], []
                for j in range(chunk):
                    p, s, v, f = step_c(lrs, p, s, dkeys, np.int32(start + j))
                    vals.append(v)
                    flats.append(f)
                return p, s, jnp.stack(vals, axis=1), jnp.stack(flats, axis=1)

            compiled[arm.name] = (chunk_fn_py, lrs, dkeys)
            continue
        compiled[arm.name] = (
            chunk_fn.lower(lrs, params, opt_state, dkeys, jnp.int32(0)).compile(),
            lrs,
            dkeys,
        )

    # Resume.
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    start_chunk = 0
    if ckpt is not None and ckpt.latest_step() is not None:
        restored = ckpt.restore(ckpt.latest_step(), {"arms": state, "chunk": jnp.int32(0)})
        state = {name: dict(s) for name, s in restored["arms"].items()}
        for s in state.values():
            for k in ("chunk_time", "losses", "traj"):
                if k in s:
                    s[k] = np.array(s[k])  # writable host copies
        start_chunk = int(restored["chunk"])
    resume_step = start_chunk * chunk - 1 if start_chunk else None
    loggers = (
        {a.name: JsonlLogger(Path(out_dir) / f"{a.name}.jsonl", resume_step) for a in arms}
        if out_dir is not None
        else {}
    )
    if start_chunk == 0:
        for a in arms:
            if a.name in loggers:
                loggers[a.name].log(
                    {
                        "header": True,
                        "arm": a.name,
                        "method": a.method,
                        "lrs": list(a.lrs),
                        "seeds": list(a.seeds),
                        "num_steps": num_steps,
                        "decay_k": decay_k,
                        "chunk": chunk,
                        "log_every": log_every,
                    }
                )

    bar = tqdm(
        total=num_chunks,
        initial=start_chunk,
        desc=desc,
        disable=not progress,
        leave=False,
        unit="chunk",
    )
    for done_this_call, c in enumerate(range(start_chunk, num_chunks), start=1):
        # Alternate the arms' order every chunk so neither always runs first.
        order = list(arms) if c % 2 == 0 else list(reversed(arms))
        for arm in order:
            fn, lrs, dkeys = compiled[arm.name]
            s = state[arm.name]
            t0 = time.perf_counter()
            p, o, vals, flats = fn(lrs, s["params"], s["opt_state"], dkeys, np.int32(c * chunk))
            jax.block_until_ready((p, o, vals))
            dt = time.perf_counter() - t0
            s["params"], s["opt_state"] = p, o
            s["losses"][:, c * chunk : (c + 1) * chunk] = np.asarray(vals)
            s["chunk_time"][c] = dt
            if record_params:
                s["traj"][:, c * chunk + 1 : (c + 1) * chunk + 1] = np.asarray(flats)
            if arm.name in loggers:
                before = float(s["chunk_time"][:c].sum())
                v = np.asarray(vals)  # (runs, chunk)
                fl = np.asarray(flats) if record_params else None
                for j0 in range(0, chunk, log_every):
                    j1 = min(chunk, j0 + log_every)
                    rec = {
                        "step": c * chunk + j1 - 1,
                        "time_s": before + dt * j1 / chunk,
                        "loss": v[:, j0:j1].mean(axis=1),
                    }
                    if record_params:
                        rec["params"] = fl[:, j1 - 1]
                    loggers[arm.name].log(rec)
        bar.update(1)
        last = c == num_chunks - 1
        if ckpt is not None and ((c + 1) % checkpoint_every == 0 or last):
            ckpt.save(c + 1, {"arms": state, "chunk": jnp.int32(c + 1)})
        if stop_after_chunks is not None and done_this_call >= stop_after_chunks and not last:
            bar.close()
            if ckpt is not None:
                ckpt.close()
            return None
    bar.close()
    if ckpt is not None:
        ckpt.close()

    results = {}
    for arm in arms:
        s = state[arm.name]
        ct = np.asarray(s["chunk_time"], np.float64)
        per_step = np.repeat(ct / chunk, chunk)
        results[arm.name] = ArmResult(
            losses=np.asarray(s["losses"]),
            step_time=np.cumsum(per_step),
            params=s["params"],
            traj=np.asarray(s["traj"]) if record_params else None,
            wall_time=float(ct.sum()),
        )
    return results


# ----------------------------------------------------------------------------- analysis


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average what exists)."""
    curve = np.asarray(curve, np.float64)
    window = max(1, min(int(window), len(curve)))
    c = np.cumsum(np.insert(np.nan_to_num(curve, nan=np.inf, posinf=np.inf), 0, 0.0))
    out = np.empty_like(curve)
    idx = np.arange(len(curve))
    lo = np.maximum(0, idx + 1 - window)
    with np.errstate(invalid="ignore"):
        out[:] = (c[idx + 1] - c[lo]) / (idx + 1 - lo)
    return out


def diverged(losses: np.ndarray) -> np.ndarray:
    """Which runs (rows of ``losses``) have a non-finite loss at some step."""
    return ~np.isfinite(np.asarray(losses)).all(axis=1)


def mean_curve(losses: np.ndarray) -> np.ndarray:
    """Mean loss curve over the runs that did not diverge (all ``inf`` if none is left)."""
    losses = np.asarray(losses, np.float64)
    ok = ~diverged(losses)
    if not ok.any():
        return np.full(losses.shape[1], np.inf)
    return losses[ok].mean(axis=0)


def first_crossing(curve: np.ndarray, threshold: float) -> int | None:
    """Index of the first element ``<= threshold`` (``None`` if never)."""
    hits = np.nonzero(np.asarray(curve) <= threshold)[0]
    return int(hits[0]) if hits.size else None


def summarise_pair(
    fgd: ArmResult, sgd: ArmResult, smooth_window: int, threshold: float | None = None
) -> dict:
    """Initial/final losses and time/iterations to a common loss threshold.

    The curves are the per-step training losses averaged over the runs that did not
    diverge (their number is reported) and smoothed with a trailing moving average. Unless given, the threshold is the higher of the two final
    smoothed losses -- a level both methods reach. ``T_f``/``T_b`` are the measured wall
    times (of the vmapped program of all runs, compilation excluded) at the first step the
    smoothed curve is at or below the threshold.

    Args:
        fgd: FGD arm result.
        sgd: Backprop arm result.
        smooth_window: Moving-average window (steps).
        threshold: Loss threshold, or ``None`` for the default above.

    Returns:
        A JSON-friendly dict.
    """
    cf = smooth(mean_curve(fgd.losses), smooth_window)
    cb = smooth(mean_curve(sgd.losses), smooth_window)
    final_f, final_b = float(cf[-1]), float(cb[-1])
    if threshold is None:
        threshold = max(final_f, final_b)
    i_f, i_b = first_crossing(cf, threshold), first_crossing(cb, threshold)
    t_f = float(fgd.step_time[i_f]) if i_f is not None else None
    t_b = float(sgd.step_time[i_b]) if i_b is not None else None
    return {
        "initial_loss": float(np.nanmean(np.concatenate([fgd.losses[:, 0], sgd.losses[:, 0]]))),
        "final_loss_fgd": final_f,
        "final_loss_sgd": final_b,
        "threshold": float(threshold),
        "iters_to_threshold_fgd": i_f,
        "iters_to_threshold_sgd": i_b,
        "T_f": t_f,
        "T_b": t_b,
        "T_ratio": (t_f / t_b) if (t_f is not None and t_b) else None,
        "wall_time_fgd": fgd.wall_time,
        "wall_time_sgd": sgd.wall_time,
        "time_per_iter_fgd": fgd.wall_time / fgd.losses.shape[1],
        "time_per_iter_sgd": sgd.wall_time / sgd.losses.shape[1],
        "runs": int(fgd.losses.shape[0]),
        "diverged_runs_fgd": int(diverged(fgd.losses).sum()),
        "diverged_runs_sgd": int(diverged(sgd.losses).sum()),
    }


def add_estimates(summary: dict, time_per_iter: dict[str, float]) -> dict:
    """Adds ``T_fgd_est``, ``T_sgd_est`` and ``T_ratio_est`` to a :func:`summarise_pair` dict.

    The estimate is iterations to the threshold x the median time of one un-vmapped
    iteration (from :func:`measure_runtime`): the per-run time the paper reports, free of
    how ``jax.vmap`` over runs changes each method's cost.
    """
    for m in METHODS:
        i = summary[f"iters_to_threshold_{m}"]
        summary[f"T_{m}_est"] = (i + 1) * time_per_iter[m] if i is not None else None
    f, b = summary["T_fgd_est"], summary["T_sgd_est"]
    summary["T_ratio_est"] = f / b if (f is not None and b) else None
    return summary


# ----------------------------------------------------------------------------- runtime


def _memory(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    keys = (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}
    out["total_bytes"] = (
        out.get("temp_size_in_bytes", 0)
        + out.get("argument_size_in_bytes", 0)
        + out.get("output_size_in_bytes", 0)
        - out.get("alias_size_in_bytes", 0)
    )
    return out


def device_peak_bytes() -> int | None:
    """The device's peak memory in use so far (``None`` where unsupported, e.g. CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure_runtime(
    loss_fn: Callable[[PyTree, Any], Array],
    params: PyTree,
    batch: Any,
    *,
    lr: float = 1e-3,
    decay_k: float = 1e-4,
    rounds: int = 15,
    min_time: float = 0.02,
    seed: int = 0,
    tangent: str = "normal",
) -> dict:
    """R_f and R_b as the paper defines them, measured side by side in one process.

    Three compiled programs on the same parameters and batch: one evaluation of ``f``, one
    full FGD iteration (tangent sampling, JVP, update) and one full backprop iteration
    (value_and_grad, update). Each is warmed up; then for ``rounds`` rounds, in an order
    shuffled per round, each is called ``n`` times back to back (``n`` chosen so one
    measurement takes at least ``min_time``) and its mean time per call recorded. The
    ratios of the medians over rounds are R_f and R_b.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: Parameters (one run, not stacked).
        batch: A batch (or ``None``).
        lr: Learning rate used by the steps (does not affect timing).
        decay_k: Decay of the schedule.
        rounds: Number of interleaved rounds.
        min_time: Minimum seconds per measurement.
        seed: Seed of the shuffling and the FGD key.
        tangent: FGD's tangent distribution.

    Returns:
        A dict with ``R_f``, ``R_b``, ``R_f_over_R_b``, the median times (s), their
        interquartile ranges and the XLA memory analysis of each program.
    """
    f = jax.jit(loss_fn)
    fgd_tx = make_tx("fgd", lr, decay_k, key=seed, tangent=tangent)
    sgd_tx = make_tx("sgd", lr, decay_k)
    fgd_step = jax.jit(make_step("fgd", loss_fn, decay_k, tangent))
    sgd_step = jax.jit(make_step("sgd", loss_fn, decay_k))
    lr_arr = jnp.float32(lr)
    progs = {
        "f": (f.lower(params, batch).compile(), (params, batch)),
        "fgd": (
            fgd_step.lower(lr_arr, params, fgd_tx.init(params), batch).compile(),
            (lr_arr, params, fgd_tx.init(params), batch),
        ),
        "sgd": (
            sgd_step.lower(lr_arr, params, sgd_tx.init(params), batch).compile(),
            (lr_arr, params, sgd_tx.init(params), batch),
        ),
    }
    # Warm up and calibrate the number of calls per measurement.
    reps = {}
    for name, (fn, args) in progs.items():
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        n = 0
        while True:
            jax.block_until_ready(fn(*args))
            n += 1
            if time.perf_counter() - t0 >= min_time / 4 or n >= 1000:
                break
        per = (time.perf_counter() - t0) / n
        reps[name] = max(1, math.ceil(min_time / max(per, 1e-7)))
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in progs}
    names = list(progs)
    for _ in range(rounds):
        for name in rng.permutation(names):
            fn, args = progs[name]
            n = reps[name]
            t0 = time.perf_counter()
            out = None
            for _ in range(n):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / n)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    iqr = {
        k: [float(np.percentile(v, 25)), float(np.percentile(v, 75))] for k, v in samples.items()
    }
    r_f, r_b = med["fgd"] / med["f"], med["sgd"] / med["f"]
    return {
        "R_f": r_f,
        "R_b": r_b,
        "R_f_over_R_b": r_f / r_b,
        "time_f": med["f"],
        "time_fgd_iter": med["fgd"],
        "time_sgd_iter": med["sgd"],
        "iqr": iqr,
        "calls_per_measurement": reps,
        "rounds": rounds,
        "memory": {name: _memory(fn) for name, (fn, _) in progs.items()},
        "device_peak_bytes": device_peak_bytes(),
    }


def num_params(params: PyTree) -> int:
    """Number of scalar parameters."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


# jax.flatten_util is a submodule that is not imported by ``import jax``.
import jax.flatten_util  # noqa: E402

# ----------------------------------------------------------------------------- tuning / text


def pick_tuned(
    results: dict[str, ArmResult],
    lrs: Sequence[float],
    runs_per_lr: int,
    smooth_window: int,
    time_per_iter: dict[str, float],
) -> dict:
    """Picks each method's best learning rate from a sweep and compares them.

    ``results`` holds arms ``"tune_fgd"`` and ``"tune_sgd"`` whose runs are ordered
    ``lr``-major (``runs_per_lr`` seeds per learning rate). A learning rate's score is the
    final smoothed training loss averaged over its seeds (``inf`` if any seed diverged). With each
    method at its best rate, the threshold is the higher of the two final losses, and
    ``T = iterations to threshold x median time of one iteration`` (from
    :func:`measure_runtime`), since the sweep's runs share one vmapped program.

    Args:
        results: Output of :func:`train_arms` for the sweep.
        lrs: The swept learning rates.
        runs_per_lr: Seeds per learning rate.
        smooth_window: Moving-average window (steps).
        time_per_iter: ``{"fgd": s, "sgd": s}`` median time of one iteration.

    Returns:
        A JSON-friendly dict.
    """
    out = {"lrs": list(lrs), "final_loss": {}, "best_lr": {}}
    curves = {}
    for m in METHODS:
        losses = results[f"tune_{m}"].losses.reshape(len(lrs), runs_per_lr, -1)
        finals, cs = [], []
        for li in range(len(lrs)):
            c = smooth(mean_curve(losses[li]), smooth_window)
            cs.append(c)
            v = float(c[-1])
            # A rate at which any seed diverges does not count as tuned.
            bad = diverged(losses[li]).any() or not math.isfinite(v)
            finals.append(math.inf if bad else v)
        best = int(np.argmin(finals))
        out["final_loss"][m] = finals
        out["best_lr"][m] = float(lrs[best])
        curves[m] = cs[best]
    threshold = max(float(curves["fgd"][-1]), float(curves["sgd"][-1]))
    i_f = first_crossing(curves["fgd"], threshold)
    i_b = first_crossing(curves["sgd"], threshold)
    t_f = (i_f + 1) * time_per_iter["fgd"] if i_f is not None else None
    t_b = (i_b + 1) * time_per_iter["sgd"] if i_b is not None else None
    out.update(
        {
            "final_loss_fgd": float(curves["fgd"][-1]),
            "final_loss_sgd": float(curves["sgd"][-1]),
            "threshold": threshold,
            "iters_to_threshold_fgd": i_f,
            "iters_to_threshold_sgd": i_b,
            "T_f": t_f,
            "T_b": t_b,
            "T_ratio": (t_f / t_b) if (t_f is not None and t_b) else None,
            "T_definition": "iterations to threshold x median time of one iteration",
        }
    )
    return out


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{nd}e}"
        return f"{v:.{nd}f}"
    return str(v)


def format_entry(name: str, e: dict) -> str:
    """One-line summary of an experiment's entry."""
    t = e.get("tuned") or {}
    return (
        f"{name}: R_f={_fmt(e['R_f'])} R_b={_fmt(e['R_b'])} "
        f"T_f/T_b={_fmt(e.get('T_ratio'))} (tuned {_fmt(t.get('T_ratio'))}) "
        f"loss {_fmt(e['initial_loss'])} -> fgd {_fmt(e['final_loss_fgd'])} / "
        f"sgd {_fmt(e['final_loss_sgd'])}"
    )

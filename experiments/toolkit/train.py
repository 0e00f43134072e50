"""Training several *arms* side by side: an arm is a method (``"fgd"``: :func:`fgrad_jax.fgd`;
``"sgd"``: :func:`optax.sgd` on :func:`jax.value_and_grad`) on a grid of (learning rate,
seed) runs, all one compiled program; the arms' chunks are interleaved, timed, logged and
checkpointed. Run ``r`` of every arm starts from ``init_params(fold_in(key(seed_r), 0))``,
draws its minibatch at step ``i`` with ``sample_batch(fold_in(fold_in(key(seed_r), 2), i))``
(the same for FGD and SGD), and FGD its tangents from ``fold_in(key(seed_r), 1)``: a run is a
pure function of its seed, and resuming from a checkpoint reproduces it exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import fgrad_jax

from .io import Checkpointer, JsonlLogger

Array = jax.Array
PyTree = Any

METHODS = ("fgd", "sgd")


def make_tx(
    method: str, lr: Array | float, decay_k: float, key: Array | int = 0, tangent: str = "normal"
) -> optax.GradientTransformation:
    """The optimiser of an arm: ``fgrad_jax.fgd`` or ``optax.sgd`` with the schedule
    ``eta_i = lr * exp(-i * decay_k)`` (``lr`` may be traced, under vmap)."""

    def sched(count):
        return lr * jnp.exp(jnp.float32(-decay_k) * jnp.asarray(count).astype(jnp.float32))

    if method == "fgd":
        return fgrad_jax.fgd(sched, key=key, tangent=tangent)
    if method == "sgd":
        return optax.sgd(sched)
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}.")


def apply_step(tx, forward: bool, loss_fn: Callable, params, opt_state, batch):
    """One update of ``tx``, on the forward gradient (``forward``) or on
    ``jax.value_and_grad``: ``(params, opt_state, loss)``, the loss at the parameters *before*
    the update, which both methods get for free (the JVP's primal, value_and_grad)."""
    if forward:
        updates, opt_state = tx.update(
            None, opt_state, params, value_fn=lambda p: loss_fn(p, batch)
        )
        value = fgrad_jax.forward_gradient_state(opt_state).value
    else:
        value, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def make_step(method: str, loss_fn: Callable, decay_k: float, tangent: str = "normal") -> Callable:
    """One iteration ``(lr, params, opt_state, batch) -> (params, opt_state, loss)``."""

    def step(lr, params, opt_state, batch):
        tx = make_tx(method, lr, decay_k, tangent=tangent)
        return apply_step(tx, method == "fgd", loss_fn, params, opt_state, batch)

    return step


@dataclasses.dataclass
class Arm:
    """One method (``"fgd"`` or ``"sgd"``) trained on a grid of runs, run ``r`` at learning
    rate ``lrs[r]`` with seed ``seeds[r]``; ``name`` names its files (``"fgd_lr2e-05"``)."""

    name: str
    method: str
    lrs: Sequence[float]
    seeds: Sequence[int]


@dataclasses.dataclass
class ArmResult:
    """What :func:`train_arms` returns for one arm: ``(runs, steps)`` minibatch losses
    before each step, the cumulative wall time (s, all runs at once, compilation excluded)
    at the end of each step and in all, the final parameters stacked over runs and, when
    recorded, the ``(runs, steps + 1, ...)`` parameter trajectory."""

    losses: np.ndarray
    step_time: np.ndarray
    params: PyTree
    traj: np.ndarray | None
    wall_time: float


@dataclasses.dataclass
class Plan:
    """What every arm shares: the problem and the chunking (see :func:`train_arms`)."""

    loss_fn: Callable[[PyTree, Any], Array]
    init_params: Callable[[Array], PyTree]
    sample_batch: Callable[[Array], Any] | None
    num_steps: int
    decay_k: float
    chunk: int
    record_params: bool = False
    run_axis: str = "vmap"
    scan: bool = True
    tangent: str = "normal"

    @property
    def num_chunks(self) -> int:
        return self.num_steps // self.chunk


def init_state(arm: Arm, plan: Plan) -> dict[str, Any]:
    """The arm's starting state: stacked params and optimizer states, empty loss and time
    buffers, and the parameter trajectory when recorded."""
    if len(arm.lrs) != len(arm.seeds):
        raise ValueError(f"arm {arm.name}: lrs and seeds must have the same length.")
    seeds = jnp.asarray(arm.seeds, jnp.uint32)
    lrs = jnp.asarray(arm.lrs, jnp.float32)
    base = jax.vmap(jax.random.key)(seeds)
    pkeys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(base)
    tkeys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(base)
    params = jax.vmap(plan.init_params)(pkeys)
    opt_state = jax.vmap(
        lambda lr, k, p: make_tx(arm.method, lr, plan.decay_k, key=k, tangent=plan.tangent).init(p)
    )(lrs, tkeys, params)
    runs = len(arm.seeds)
    st = {
        "params": params,
        "opt_state": opt_state,
        "losses": np.zeros((runs, plan.num_steps), np.float32),
        "chunk_time": np.zeros((plan.num_chunks,), np.float64),
    }
    if plan.record_params:
        flat0 = np.asarray(jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(params))
        st["traj"] = np.zeros((runs, plan.num_steps + 1, flat0.shape[1]), flat0.dtype)
        st["traj"][:, 0] = flat0
    return st


def make_chunk(
    one_step: Callable, chunk: int, *, scan: bool = True, run_axis: str = "vmap", example=None
) -> Callable:
    """The one training loop's compiled part, which every experiment uses: ``chunk`` steps of
    every run. ``one_step(run, carry, data, i) -> (carry, out)`` is step ``i`` of one run
    (``run``: its constants, such as its learning rate and data key; ``carry``: parameters and
    optimiser state; ``data``: what all runs read). The result, ``chunk_fn(runs, carry, data,
    start) -> (carry, outs)``, takes the runs' ``run`` and ``carry`` stacked on axis 0 and
    returns ``outs`` as ``(runs, chunk, ...)``, the runs vmapped or in a ``lax.map`` loop
    (``run_axis="map"``), the chunk one ``lax.scan`` or (``scan=False``, for convolutions on
    XLA:CPU) ``chunk`` calls of one compiled step. ``example=(runs, carry, data)`` compiles
    ahead of time, so that a timed call never compiles.
    """

    def run_one(run, carry, data, start):
        body = lambda c, i: one_step(run, c, data, i)
        return jax.lax.scan(body, carry, start + jnp.arange(chunk))

    def over_runs(f):
        if run_axis == "vmap":
            fn = jax.jit(jax.vmap(f, in_axes=(0, 0, None, None)))
        elif run_axis == "map":
            fn = jax.jit(lambda r, c, d, i: jax.lax.map(lambda a: f(*a, d, i), (r, c)))
        else:
            raise ValueError(f"run_axis must be 'vmap' or 'map'; got {run_axis!r}.")
        return fn if example is None else fn.lower(*example, jnp.int32(0)).compile()

    if scan:
        return over_runs(run_one)
    step = over_runs(one_step)

    def chunk_py(runs, carry, data, start):
        outs = []
        for i in range(start, start + chunk):
            carry, out = step(runs, carry, data, np.int32(i))
            outs.append(out)
        return carry, jax.tree.map(lambda *o: jnp.stack(o, axis=1), *outs)

    return chunk_py


def compile_arm(arm: Arm, plan: Plan, state: dict[str, Any]) -> Callable:
    """The arm's chunk program ``(params, opt_state, start) -> (params, opt_state, losses,
    flat params)`` over all its runs, compiled."""
    seeds = jnp.asarray(arm.seeds, jnp.uint32)
    lrs = jnp.asarray(arm.lrs, jnp.float32)
    dkeys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(jax.vmap(jax.random.key)(seeds))
    step = make_step(arm.method, plan.loss_fn, plan.decay_k, plan.tangent)
    record, sample_batch = plan.record_params, plan.sample_batch

    def one_step(run, carry, data, i):
        lr, dkey = run
        batch = None if sample_batch is None else sample_batch(jax.random.fold_in(dkey, i))
        p, s, value = step(lr, *carry, batch)
        flat = jax.flatten_util.ravel_pytree(p)[0] if record else jnp.zeros(())
        return (p, s), (value.astype(jnp.float32), flat)

    runs = (lrs, dkeys)
    example = (runs, (state["params"], state["opt_state"]), None)
    fn = make_chunk(one_step, plan.chunk, scan=plan.scan, run_axis=plan.run_axis, example=example)

    def chunk_fn(p, s, start):
        (p, s), (vals, flats) = fn(runs, (p, s), None, start)
        return p, s, vals, flats

    return chunk_fn


def restore(
    ckpt: Checkpointer | None, state: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], int]:
    """The arms' state and the next chunk, from the latest checkpoint if there is one."""
    if ckpt is None or ckpt.latest_step() is None:
        return state, 0
    restored = ckpt.restore(ckpt.latest_step(), {"arms": state, "chunk": jnp.int32(0)})
    state = {name: dict(s) for name, s in restored["arms"].items()}
    for s in state.values():
        for k in ("chunk_time", "losses", "traj"):
            if k in s:
                s[k] = np.array(s[k])  # writable host copies
    return state, int(restored["chunk"])


def _open_loggers(arms, plan, out_dir, start_chunk, log_every) -> dict[str, JsonlLogger]:
    if out_dir is None:
        return {}
    resume_step = start_chunk * plan.chunk - 1 if start_chunk else None
    loggers = {a.name: JsonlLogger(Path(out_dir) / f"{a.name}.jsonl", resume_step) for a in arms}
    if start_chunk == 0:
        shared = {k: getattr(plan, k) for k in ("num_steps", "decay_k", "chunk")}
        for a in arms:
            header = {"header": True, "arm": a.name, "method": a.method, "lrs": list(a.lrs)}
            header |= {"seeds": list(a.seeds), **shared, "log_every": log_every}
            loggers[a.name].log(header)
    return loggers


def run_chunk(c: int, fn: Callable, s: dict[str, Any], plan: Plan, logger, log_every) -> None:
    """Runs and times chunk ``c`` of one arm, updating its state ``s`` in place; the
    ``logger`` gets one record per ``log_every`` steps: the window's mean loss per run."""
    chunk = plan.chunk
    before = float(s["chunk_time"][:c].sum())
    t0 = time.perf_counter()
    p, o, vals, flats = fn(s["params"], s["opt_state"], np.int32(c * chunk))
    jax.block_until_ready((p, o, vals))
    dt = time.perf_counter() - t0
    s["params"], s["opt_state"] = p, o
    vals = np.asarray(vals)  # (runs, chunk)
    s["losses"][:, c * chunk : (c + 1) * chunk] = vals
    s["chunk_time"][c] = dt
    flats = np.asarray(flats) if plan.record_params else None
    if plan.record_params:
        s["traj"][:, c * chunk + 1 : (c + 1) * chunk + 1] = flats
    if logger is None:
        return
    for j0 in range(0, chunk, log_every):
        j1 = min(chunk, j0 + log_every)
        rec = {
            "step": c * chunk + j1 - 1,
            "time_s": before + dt * j1 / chunk,
            "loss": vals[:, j0:j1].mean(axis=1),
        }
        if flats is not None:
            rec["params"] = flats[:, j1 - 1]
        logger.log(rec)


def collect(arms: Sequence[Arm], state: dict[str, dict[str, Any]], plan: Plan) -> dict:
    """``{arm.name: ArmResult}`` from the final state."""
    results = {}
    for arm in arms:
        s = state[arm.name]
        ct = np.asarray(s["chunk_time"], np.float64)
        per_step = np.repeat(ct / plan.chunk, plan.chunk)
        results[arm.name] = ArmResult(
            losses=np.asarray(s["losses"]),
            step_time=np.cumsum(per_step),
            params=s["params"],
            traj=np.asarray(s["traj"]) if plan.record_params else None,
            wall_time=float(ct.sum()),
        )
    return results


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

    ``loss_fn(params, batch)``, ``init_params(key)``, ``sample_batch(key)`` (``None``: a
    deterministic objective) define the problem; ``num_steps`` is a multiple of ``chunk``,
    the steps per compiled program and the timing granularity. Every ``log_every`` steps
    each arm's ``out_dir/<name>.jsonl`` gets the window's mean loss per run (and, with
    ``record_params``, the parameters). A ``checkpoint_dir`` holding a checkpoint resumes
    training; ``stop_after_chunks`` stops as if interrupted (returns ``None``), for tests.
    ``run_axis="map"`` runs an arm's runs in a ``lax.map`` loop instead of ``vmap`` (vmapped
    convolutions become grouped ones, slow on CPU) and ``scan=False`` a chunk as calls of
    one compiled step (:func:`make_chunk`); both give the same numbers. Returns
    ``{arm.name: ArmResult}``, or ``None`` if stopped early.
    """
    from tqdm.auto import tqdm

    if num_steps % chunk:
        raise ValueError(f"num_steps={num_steps} must be a multiple of chunk={chunk}.")
    plan = Plan(
        loss_fn, init_params, sample_batch, num_steps, decay_k, chunk, record_params,
        run_axis, scan, tangent,
    )  # fmt: skip
    state = {arm.name: init_state(arm, plan) for arm in arms}
    programs = {arm.name: compile_arm(arm, plan, state[arm.name]) for arm in arms}
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    state, start_chunk = restore(ckpt, state)
    loggers = _open_loggers(arms, plan, out_dir, start_chunk, log_every)
    bar = tqdm(
        total=plan.num_chunks, initial=start_chunk, desc=desc, disable=not progress,
        leave=False, unit="chunk",
    )  # fmt: skip
    try:
        for done_this_call, c in enumerate(range(start_chunk, plan.num_chunks), start=1):
            # Alternate the arms' order every chunk so neither always runs first.
            for arm in list(arms) if c % 2 == 0 else list(reversed(arms)):
                logger = loggers.get(arm.name)
                run_chunk(c, programs[arm.name], state[arm.name], plan, logger, log_every)
            bar.update(1)
            last = c == plan.num_chunks - 1
            if ckpt is not None and ((c + 1) % checkpoint_every == 0 or last):
                ckpt.save(c + 1, {"arms": state, "chunk": jnp.int32(c + 1)})
            if stop_after_chunks is not None and done_this_call >= stop_after_chunks and not last:
                return None
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    return collect(arms, state, plan)

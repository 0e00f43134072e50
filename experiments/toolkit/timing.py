"""The one timing harness: interleaved rounds in a seeded random order, medians, paired ratios.

Every candidate is timed once per round, in a fresh random order each round, so that a noisy
shared machine slows all candidates alike, and no candidate always follows the same
neighbour (a neighbour's leftover threads would slow its successor in every round). The
ratios of the medians over rounds are reported, and the *paired* ratio: the median over
rounds of the ratio of two candidates' times within the same round, the most noise-robust
form on a loaded machine.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


def _calls_per_measurement(fn: Callable[[], Any], min_time: float) -> int:
    if min_time <= 0:
        return 1
    t0 = time.perf_counter()
    n = 0
    while True:
        jax.block_until_ready(fn())
        n += 1
        if time.perf_counter() - t0 >= min_time / 4 or n >= 1000:
            break
    per = (time.perf_counter() - t0) / n
    return max(1, math.ceil(min_time / max(per, 1e-7)))


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    reps: int,
    warmup: int = 2,
    seed: int = 0,
    *,
    min_time: float = 0.0,
    calls_out: dict[str, int] | None = None,
) -> dict[str, list[float]]:
    """Times every callable once per round, in a fresh seeded random order each round.

    A random order, not a rotation: with a rotation every callable always follows the same
    neighbour, and a neighbour that leaves threads spinning slows its successor in every
    round (see docs/engineering_log.md).

    Args:
        fns: Zero-argument callables; each may return arrays, which are waited for.
        reps: Timed rounds.
        warmup: Untimed rounds before them (compilation, caches).
        seed: Seed of the call order.
        min_time: When positive, each measurement calls a callable ``n`` times back to back
            (``n`` calibrated so one measurement takes at least ``min_time`` seconds) and
            records the mean time per call: programs of microseconds are otherwise below
            the timer's and Python's resolution.
        calls_out: When given, receives the calls per measurement of each callable.

    Returns:
        ``{name: [seconds per call in round 0, round 1, ...]}``.

    Example:
        >>> times = time_interleaved({"a": lambda: None, "b": lambda: None}, reps=3, warmup=0)
        >>> sorted(times), len(times["a"])
        (['a', 'b'], 3)
    """
    for _ in range(warmup):
        for f in fns.values():
            jax.block_until_ready(f())
    calls = {n: _calls_per_measurement(f, min_time) for n, f in fns.items()}
    if calls_out is not None:
        calls_out.update(calls)
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        for n in rng.sample(names, len(names)):
            f, k = fns[n], calls[n]
            t0 = time.perf_counter()
            out = None
            for _ in range(k):
                out = f()
            jax.block_until_ready(out)
            times[n].append((time.perf_counter() - t0) / k)
    return times


def median(times: list[float]) -> float:
    """Median of a list of times."""
    return statistics.median(times)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]`` (two candidates timed in the same rounds)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def _copy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


class Runner:
    """A training step as a timed callable: keeps its own copy of the parameters and optimizer
    state and threads them through the step, so steps that donate their buffers can be called
    again (the caller's arrays are never donated).

    Args:
        step: ``step(params, opt_state, batch) -> (params, opt_state, loss)``, jitted.
        tx: The optimizer whose ``init`` makes the state.
        params: Initial parameters (copied).
        batch: The batch of every call.
    """

    def __init__(self, step: Callable, tx: Any, params: Any, batch: Any):
        self.step = step
        self.params = _copy(params)
        self.state = tx.init(self.params)
        self.batch = batch

    def __call__(self) -> Any:
        self.params, self.state, loss = self.step(self.params, self.state, self.batch)
        return jax.block_until_ready((self.params, loss))

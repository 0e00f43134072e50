"""The one timing harness: interleaved rounds in a seeded random order, medians, paired ratios.

Every candidate is timed once per round, in a fresh random order each round, so that a noisy
shared machine slows all candidates alike and none always follows the same neighbour (whose
leftover threads would slow it every round). The *paired* ratio, the median over rounds of
two candidates' ratio within a round, is the most noise-robust form on a loaded machine.
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

    ``fns`` are zero-argument callables (what they return is waited for), timed in ``reps``
    rounds after ``warmup`` untimed ones; returns ``{name: [seconds per call in each
    round]}``. With ``min_time > 0`` a measurement calls a callable ``n`` times back to back
    (``n`` calibrated to last ``min_time`` seconds, reported in ``calls_out``) and records
    the mean per call: programs of microseconds are otherwise below the timer's resolution.
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


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]`` (two candidates timed in the same rounds)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


class Runner:
    """A training step as a timed callable: threads its own copy of the parameters and
    optimiser state through ``step(params, opt_state, batch) -> (params, opt_state, loss)``
    (jitted; the caller's arrays are never donated). Each call dispatches ``steps`` steps
    back to back and blocks once after the last, as a training loop runs."""

    def __init__(self, tx: Any, step: Callable, params: Any, batch: Any, steps: int = 1):
        self.step, self.batch, self.steps = step, batch, steps
        self.params = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), params)
        self.state = tx.init(self.params)

    def __call__(self) -> Any:
        for _ in range(self.steps):
            self.params, self.state, loss = self.step(self.params, self.state, self.batch)
        return jax.block_until_ready((self.params, loss))

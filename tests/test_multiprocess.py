"""JAX's multi-controller runtime: 2 processes x 2 CPU devices (gloo over 127.0.0.1) against
one process with 4 devices (tests/multiprocess_worker.py does the training)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return subprocess.Popen(
        [sys.executable, str(HERE / "multiprocess_worker.py"), *args[:1], str(out), *args[1:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiprocess")
    port = str(_free_port())
    procs = [_launch(out, "single"), *(_launch(out, "multi", port, str(i)) for i in range(2))]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:  # every process stops, whatever happened to the others
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return {name: np.load(out / f"{name}.npz") for name in ("single_0", "multi_0", "multi_1")}


RUNS = ("weights", "activations", "fsdp_weights", "fsdp_activations", "nnx")
LEAVES = ("w1", "b1", "w2")


@pytest.mark.parametrize("run", RUNS)
def test_two_processes_train_like_one(runs, run):
    """Final parameters after 5 steps equal one process's on 4 devices (up to the order of
    the batch reduction), and the replicated copies are identical across processes."""
    single, a, b = runs["single_0"], runs["multi_0"], runs["multi_1"]
    for leaf in LEAVES:
        key = f"{run}/{leaf}"
        np.testing.assert_allclose(a[key], single[key], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[key], b[key])
        if f"{key}/own" in a:  # each process's own replica, not a gathered copy
            np.testing.assert_array_equal(a[f"{key}/own"], b[f"{key}/own"])


def test_collectives_per_step(runs):
    """Weight-perturbed: K + 1 = 5 float32 scalars all-reduced; activity-perturbed: at most
    1.1x backprop's bytes (one gradient-sized tensor, not K)."""
    for name in ("single_0", "multi_0"):
        r = runs[name]
        assert int(r["weights/bytes"]) <= 4 * 5
        assert int(r["activations/bytes"]) <= 1.1 * int(r["backprop/bytes"])


def test_a_key_that_differs_between_processes_is_refused(runs):
    for name in ("multi_0", "multi_1"):
        guard = str(runs[name]["guard"])
        assert "key differs between the 2 processes" in guard, guard
        assert "Seed it identically" in guard

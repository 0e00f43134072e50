"""Estimates are those recorded before the estimator was split into strategies, within a
rounding-level tolerance that holds across CPUs (``golden_estimates.RELATIVE_TOLERANCE``)."""

import os
import subprocess
import sys
from pathlib import Path

import golden_estimates
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_same_estimates_as_recorded_on_eight_devices(standard_promotion):
    ref = dict(np.load(golden_estimates.DATA))
    got = golden_estimates.compute()
    assert sorted(ref) == sorted(got)
    assert not golden_estimates.mismatches(ref, got)


@pytest.mark.slow
def test_same_estimates_as_recorded_on_one_device():
    # One device; LLVM level 0 as in conftest.py (compile-bound).
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, str(HERE / "golden_estimates.py"), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr

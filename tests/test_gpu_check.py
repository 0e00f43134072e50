"""experiments/benchmarks/gpu_check.py: the whole check end to end with tiny sizes on the CPU (--smoke),
its time budget and its errors."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("mlp", "wide", "depth_memory", "transformer", "gpt2_memory", "oom")


def _run(*args, timeout=900):
    # One device; LLVM level 0 as in conftest.py (compile-bound).
    env = os.environ | {"XLA_FLAGS": "--xla_backend_optimization_level=0", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.gpu_check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_smoke_runs_every_section_and_writes_json_and_markdown(tmp_path):
    proc = _run("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert tuple(res["sections"]) == SECTIONS
    for name, sec in res["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"))
    assert res["device"]["device_kind"] and res["device"]["jax"]
    for name in ("mlp", "wide", "depth_memory", "transformer"):
        assert res["sections"][name]["env"] == res["sections"]["mlp"]["env"]
    assert res["sections"]["mlp"]["env"]["device_kind"] == res["device"]["device_kind"]
    assert res["sections"]["mlp"]["result"]["environment"]["jax"] == res["device"]["jax"]

    mlp = res["sections"]["mlp"]["result"]
    rows = [r for case in mlp["cases"] for r in case["rows"]]
    modes = {(r["mode"], r["donated"]) for r in rows}
    assert modes == {
        ("dispatched", True),
        ("dispatched", False),
        ("pipelined", True),
        ("pipelined", False),
        ("loop", True),
    }
    for r in rows:
        assert _positive(r["forward"]["ms"]) and _positive(r["backprop"]["ms"])
        for t in ("rademacher", "normal", "lowrank"):
            assert _positive(r[t]["ms"]) and _positive(r[t]["over_backprop"])
    assert all(c["reps_done"] == c["reps_requested"] for c in mlp["cases"])
    wide = res["sections"]["wide"]["result"]["cases"][0]["rows"]
    assert [(r["mode"], r["donated"]) for r in wide] == [("loop", True)]

    depths = res["sections"]["depth_memory"]["result"]["depths"]
    assert len(depths) == 2
    for d in depths:
        for t in ("rademacher", "normal", "lowrank"):
            assert d[t]["temp_bytes"] / d["backprop"]["temp_bytes"] == d[t]["over_backprop"]

    rows = res["sections"]["transformer"]["result"]["rows"]
    assert {"forward", "backprop", "fg_rademacher"} <= set(rows)
    assert all(_positive(r["compile_s"]) and _positive(r["median_ms"]) for r in rows.values())

    progs = res["sections"]["gpt2_memory"]["result"]["programs"]
    assert set(progs) == {"forward", "backprop", "fg_k1", "fg_k4"}
    for name, p in progs.items():
        r = p["result"]
        assert r["outcome"] == "ran", (name, r.get("error"))
        assert r["memory"]["temp_bytes"] >= 0 and _positive(r["xla_needs_bytes"])
        assert r["donated"] == (name != "forward")
        assert "peak_bytes_in_use" in r  # None on the CPU
    assert progs["fg_k4"]["result"]["num_tangents"] == 4

    oom = res["sections"]["oom"]["result"]
    # The CPU reports no memory limit: the tiny model is too small to exhaust anything.
    assert oom["backprop"]["result"]["outcome"] == "ran"
    fg = oom["fg"]["result"]
    assert fg["outcome"] == "ran" and len(fg["losses"]) == 3
    assert all(math.isfinite(v) for v in fg["losses"])
    assert fg["config"] == oom["backprop"]["result"]["config"]

    md = (tmp_path / "gpu_check.md").read_text()
    assert f"### GPU check: {res['device']['device_kind']}, jax {res['device']['jax']}" in md
    header = "| model | B | mode | donated | rounds | forward | backprop | fg rademacher (/bp)"
    assert header in md
    table = [ln for ln in md.splitlines() if ln.startswith("| MLP 784-")]
    assert len(table) == 5 and all(ln.count("|") == 11 for ln in table)
    assert sum("pipelined (10 dispatched, blocked once)" in ln for ln in table) == 2
    assert "| fg_k4 | yes |" in md
    assert "trains: 2 steps" in md
    assert "section `" not in md  # no failed section listed


def test_spent_budget_skips_sections_but_writes_results(tmp_path):
    start = time.perf_counter()
    proc = _run("--smoke", "--sections", "mlp,oom", "--budget", "5", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 30
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(res["sections"]) == ["mlp", "oom"]
    assert all(s["status"] == "skipped" for s in res["sections"].values())
    md = (tmp_path / "gpu_check.md").read_text()
    assert "- section `mlp`: skipped (total budget 5 s spent)" in md


def test_unknown_section_is_an_error_naming_the_choices(tmp_path):
    proc = _run("--sections", "mlp,gpu", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown section(s) ['gpu']" in proc.stderr and ",".join(SECTIONS) in proc.stderr


def test_timed_rounds_stops_at_the_deadline_and_says_so():
    from experiments.benchmarks.gpu_sections import timed_rounds

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times, info = timed_rounds(fns, reps=30, warmup=1, deadline=time.time() - 1, chunk=4)
    assert info == {"reps_requested": 30, "reps_done": 4, "cut": True}
    assert len(times["a"]) == len(times["b"]) == 4 and len(calls) == 10
    times, info = timed_rounds(fns, reps=7, warmup=0, deadline=time.time() + 60, chunk=4)
    assert info == {"reps_requested": 7, "reps_done": 7, "cut": False}


def test_report_of_an_out_of_memory_run():
    """The GPU-only branches of the report (an exhausted backprop, peak memory), from a
    results dict shaped as the workers write it."""
    from experiments.benchmarks.gpu_report import markdown
    from experiments.benchmarks.gpu_sections import _oom_bytes

    msg = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 163208757248 bytes."
    assert _oom_bytes(msg) == 163208757248
    gib = 2**30
    cfg = {"vocab": 16384, "width": 1024, "depth": 12, "heads": 16, "seq_len": 2048, "batch": 32}
    bp = {"outcome": "RESOURCE_EXHAUSTED", "xla_needs_bytes": 152 * gib, "config": cfg}
    fg = {"outcome": "ran", "losses": [9.75, 9.74, 9.73], "peak_bytes_in_use": 35 * gib}
    fg |= {"config": cfg, "num_params": 168_000_000, "bytes_limit": 75 * gib, "ms_per_step": 839}

    def prog(peak, donated):
        return {"status": "ok", "result": {"peak_bytes_in_use": peak, "donated": donated}}

    programs = {"forward": prog(2 * gib, False), "backprop": prog(24 * gib, True)}
    programs["fg_k1"] = prog(3 * gib, True)
    programs["fg_k4"] = {"status": "timeout", "result": None, "error": "killed at its limit"}
    results = {
        "device": {"device_kind": "NVIDIA H100 80GB HBM3", "jax": "0.11.2"},
        "sections": {
            "gpt2_memory": {"status": "partial", "result": {"config": cfg, "programs": programs}},
            "oom": {"status": "ok", "result": {"backprop": {"result": bp}, "fg": {"result": fg}}},
        },
    }
    md = markdown(results)
    assert "### GPU check: NVIDIA H100 80GB HBM3, jax 0.11.2" in md
    assert "| fg_k1 | yes | 3.00 GiB | 1.50 | 0.12 |" in md
    assert "| fg_k4 | n/a | n/a | n/a | n/a | n/a | n/a | timeout |" in md
    assert (
        "| 32 | 168000000 | 75.00 GiB | yes | RESOURCE_EXHAUSTED (needs 152.00 GiB per XLA) |" in md
    )
    assert "trains: 2 steps, loss 9.7500 -> 9.7300, peak 35.00 GiB, 839 ms/step |" in md
    assert "- section `gpt2_memory`: partial" in md

"""One-command GPU check: forward gradient vs backprop on one accelerator, in about 5 minutes.

    python -m experiments.benchmarks.gpu_check --out out/gpu
    python -m experiments.benchmarks.gpu_check --smoke --out /tmp/gpu_smoke   # tiny, CPU
    python -m experiments.benchmarks.gpu_check --sections mlp,oom --out out/gpu

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (markdown tables for
docs/performance.md) after every section, so a run cut short keeps what it measured. Each
section (``mlp``, ``wide``, ``depth_memory``, ``transformer``, ``gpt2_memory``, ``oom``;
what they measure: docs/performance.md, "One-command GPU check") runs in its own process
with its own time limit, so that a crash, an out-of-memory error or a slow compile costs
only that section. Timings are medians of interleaved rounds in a fresh random order each;
ratios are paired within rounds.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from experiments.benchmarks.gpu_report import last_line, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The sections in order, with hard time limits (s). They add up to more than TOTAL_BUDGET_S:
# most sections finish well inside theirs, and the total deadline caps what the last ones get.
BUDGET_S = dict(mlp=90, wide=40, depth_memory=100, transformer=80, gpt2_memory=75, oom=100)
ORDER = tuple(BUDGET_S)
TOTAL_BUDGET_S = 380
NO_PREALLOCATE = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
GPT2_SMALL = {"vocab": 50257, "width": 768, "depth": 12, "heads": 12, "seq_len": 1024, "batch": 8}
GPT_OOM = {"vocab": 16384, "width": 1024, "depth": 12, "heads": 16, "seq_len": 2048, "batch": 32}
SMOKE_GPT = {"vocab": 32, "width": 8, "depth": 1, "heads": 2, "seq_len": 4, "batch": 2}
# Backprop at GPT_OOM's shape needed 152 GiB at batch 32 (an H100 run, docs/performance.md);
# the backprop process corrects this first guess from XLA's memory analysis.
OOM_BYTES_PER_SAMPLE = 152 * 2**30 / 32
OOM_TARGET = 1.8  # backprop's memory as a multiple of the device's bytes_limit


LIVE: set[subprocess.Popen] = set()


def _stop(signum, frame):
    # Killed from outside (a timeout around the whole run): take the workers along, so that
    # none is left holding the device.
    for proc in list(LIVE):
        proc.kill()
    sys.exit(128 + signum)


class Worker:
    """One measurement process: ``gpu_check --worker NAME`` writing its result file."""

    def __init__(self, args, name, tag, spec, env, timeout):
        parts = Path(args.out) / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        self.path, self.log_path = parts / f"{tag}.json", parts / f"{tag}.stderr"
        self.path.unlink(missing_ok=True)
        self.start = time.time()
        self.deadline = self.start + timeout
        # The soft deadline leaves a quarter of the limit for the work that cannot be cut.
        cmd = [sys.executable, "-m", "experiments.benchmarks.gpu_check", "--worker", name]
        cmd += ["--result", str(self.path)]
        cmd += ["--deadline", str(self.start + 0.75 * timeout), "--spec", json.dumps(spec)]
        cmd += ["--smoke"] if args.smoke else []
        self.env = env
        # The repository root first, whatever the caller's working directory and PYTHONPATH.
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, env=os.environ | env | {"PYTHONPATH": path}, stderr=log
            )
        LIVE.add(self.proc)

    def collect(self) -> dict:
        status = None
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            status = "timeout"
        LIVE.discard(self.proc)
        try:
            part = json.loads(self.path.read_text())
        except (OSError, ValueError):
            part = {}
        out = {
            "status": status or part.get("status") or "error",
            "wall_s": time.time() - self.start,
            "time_limit_s": self.deadline - self.start,
            "process_env": self.env,
            **{k: part.get(k) for k in ("env", "result")},
        }
        if out["status"] == "running":  # exited without finishing
            out["status"] = "error"
        if status == "timeout":
            out["error"] = f"killed at its time limit ({out['time_limit_s']:.0f} s)"
        elif out["status"] != "ok":
            tail = self.log_path.read_text(errors="replace")[-3000:]
            out["error"] = part.get("error") or f"exit code {self.proc.returncode}: {tail}"
        return out


def worker_main(args) -> int:
    from experiments.benchmarks.gpu_sections import SECTIONS, device_info

    last = {}

    def write(status, result, error=None):
        tmp = args.result + ".tmp"
        part = {"status": status, "result": result, "error": error, "env": last.get("env")}
        with open(tmp, "w") as fh:
            json.dump(part, fh, indent=1)
        os.replace(tmp, args.result)

    def emit(result):
        last["result"] = result
        write("running", result)

    try:
        last["env"] = device_info()
        spec = json.loads(args.spec)
        result = SECTIONS[args.worker](args.smoke, args.deadline, spec, emit)
    except Exception:
        write("error", last.get("result"), traceback.format_exc()[-4000:])
        return 1
    write("ok", result)
    return 0


def single(name, args, timeout):
    env = NO_PREALLOCATE if name == "depth_memory" else {}
    return Worker(args, name, name, {}, env, timeout).collect()


def gpt2_memory(args, timeout):
    config = SMOKE_GPT if args.smoke else GPT2_SMALL
    # The autotuner's trial buffers come from the same allocator and, for the vocabulary
    # projection, are larger than a forward pass's working memory: they would set the peak.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
    env = NO_PREALLOCATE | {"XLA_FLAGS": flags.strip()}
    specs = {"forward": {"program": "forward"}, "backprop": {"program": "backprop"}}
    specs |= {
        f"fg_k{k}": {"program": "fg", "tangent": "rademacher", "num_tangents": k} for k in (1, 4)
    }
    # Concurrent: peak_bytes_in_use is per process, and the four fit one device together.
    workers = {
        n: Worker(args, "gpt", f"gpt2_{n}", {"config": config, "steps": 2} | s, env, timeout)
        for n, s in specs.items()
    }
    parts = {n: w.collect() for n, w in workers.items()}
    statuses = {p["status"] for p in parts.values()}
    return {
        "status": "ok" if statuses == {"ok"} else "partial",
        "process_env": env,
        "result": {"config": config, "concurrent": True, "programs": parts},
    }


def oom(args, timeout):
    config = SMOKE_GPT if args.smoke else GPT_OOM
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
    sizing = {"oom_target": OOM_TARGET, "bytes_per_sample": OOM_BYTES_PER_SAMPLE}
    t0 = time.time()
    bp_spec = {"config": config, "program": "backprop", "steps": 1, "grow": True} | sizing
    bp = Worker(args, "gpt", "oom_backprop", bp_spec, env, 0.5 * timeout).collect()
    fg_spec = {"config": config, "program": "fg", "tangent": "rademacher", "num_tangents": 1}
    fg_spec["steps"] = 3 if args.smoke else 6
    chosen = (bp.get("result") or {}).get("config")
    fg_spec |= {"config": chosen} if chosen else sizing
    fg = Worker(args, "gpt", "oom_fg", fg_spec, env, timeout - (time.time() - t0)).collect()
    ok = bp["status"] == fg["status"] == "ok"
    return {
        "status": "ok" if ok else "partial",
        "process_env": env,
        "result": {"backprop": bp, "fg": fg, "oom_target": OOM_TARGET},
    }


RUNNERS = {n: functools.partial(single, n) for n in ("mlp", "wide", "depth_memory", "transformer")}
RUNNERS |= {"gpt2_memory": gpt2_memory, "oom": oom}


def device_from(sections) -> dict:
    """The card and jax version as a worker saw them (this process never starts a backend,
    which would preallocate device memory that the sections need)."""
    for sec in sections.values():
        stack = [sec.get("result"), sec.get("env")]
        while stack:
            x = stack.pop()
            if isinstance(x, dict):
                if "device_kind" in x and "jax" in x:
                    return {k: x.get(k) for k in ("device_kind", "platform", "jax", "bytes_limit")}
                stack += list(x.values())
    return {}


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="out/gpu_check", help="directory for the JSON and markdown")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a test on the CPU)")
    ap.add_argument(
        "--sections", default=",".join(ORDER), help="comma-separated: " + ",".join(ORDER)
    )
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="total seconds")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in RUNNERS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {','.join(ORDER)}")
    os.makedirs(args.out, exist_ok=True)
    signal.signal(signal.SIGTERM, _stop)
    start = time.time()
    results = {
        "command": " ".join(["-m experiments.benchmarks.gpu_check", *(argv or sys.argv[1:])]),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "budget_s": args.budget,
        "section_time_limits_s": BUDGET_S,
        "python": sys.executable,
        "sections": {},
    }
    for name in [s for s in ORDER if s in chosen]:
        left = args.budget - (time.time() - start)
        timeout = min(BUDGET_S[name], left)
        print(f"[{time.time() - start:6.1f} s] section {name} (limit {timeout:.0f} s)", flush=True)
        if timeout < 10:
            sec = {"status": "skipped", "error": f"total budget {args.budget:.0f} s spent"}
        else:
            t0 = time.time()
            try:
                sec = RUNNERS[name](args, timeout)
            except Exception:
                sec = {"status": "error", "error": traceback.format_exc()[-4000:]}
            sec["wall_s"] = time.time() - t0
        results["sections"][name] = sec
        results["device"] = device_from(results["sections"])
        results["wall_s"] = time.time() - start
        # After every section, so that a run cut short keeps what it measured.
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=1))
        (Path(args.out) / "gpu_check.md").write_text(markdown(results))
        print(f"[{time.time() - start:6.1f} s] section {name}: {sec['status']}", flush=True)
        if sec.get("error"):
            print("   " + last_line(sec["error"]), flush=True)
    print(f"wrote {args.out}/gpu_check.json and gpu_check.md in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

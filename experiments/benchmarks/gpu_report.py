"""Markdown tables from ``gpu_check.py``'s results (only reads the JSON it wrote)."""

from __future__ import annotations

import traceback

TANGENTS = ("rademacher", "normal", "lowrank")
GIB = 2**30


def _ms(x):
    return "n/a" if x is None else f"{x:.3g} ms"


def _gib(b):
    return "n/a" if b is None else f"{b / GIB:.2f} GiB"


def _mb(b):
    return "n/a" if b is None else f"{b / 2**20:.1f} MB"


def _yes(flag):
    return {True: "yes", False: "no"}.get(flag, "n/a")


def _section(intro, header, rows):
    """An introduction and a markdown table (``header``: a list, or names separated by
    `` | ``)."""
    header = header.split(" | ") if isinstance(header, str) else header
    lines = [intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return [*lines, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def _steps(res, title):
    rows = []
    for case in res.get("cases", []):
        reps = f"{case.get('reps_done')}" + (" (cut)" if case.get("cut") else "")
        for r in case.get("rows", []):
            per = r.get("steps_per_call", 1)
            mode = {
                "dispatched": "dispatched",
                "pipelined": f"pipelined ({per} dispatched, blocked once)",
            }.get(r["mode"], f"in loop ({per}/call)")
            cells = [title, r["batch_size"], mode, _yes(r["donated"]), reps]
            cells += [_ms(r["forward"]["ms"]), _ms(r["backprop"]["ms"])]
            for t in TANGENTS:
                v = r.get(t, {})
                cells.append(f"{_ms(v.get('ms'))} ({v.get('over_backprop', float('nan')):.2f}x)")
            rows.append(cells)
    return rows


def steps_table(sections):
    mlp = (sections.get("mlp") or {}).get("result") or {}
    rows = _steps(mlp, "MLP " + "-".join(map(str, mlp.get("sizes", []))))
    wide = (sections.get("wide") or {}).get("result") or {}
    sizes = wide.get("sizes", [0, 0])
    rows += _steps(wide, f"MLP width {sizes[1]}, depth {len(sizes) - 2}")
    if not rows:
        return []
    header = ["model", "B", "mode", "donated", "rounds", "forward", "backprop"]
    header += [f"fg {t} (/bp)" for t in TANGENTS]
    intro = (
        "SGD step, ms per step (median); in brackets the forward-gradient step over the "
        "backprop step, paired within rounds:"
    )
    return _section(intro, header, rows)


def transformer_table(sections):
    res = (sections.get("transformer") or {}).get("result") or {}
    if not res.get("rows"):
        return []
    c = res.get("config", {})
    bp_compile_s = res["rows"]["backprop"]["compile_s"]
    rows = []
    for name, r in res["rows"].items():
        ratios = [f"{r['per_forward']:.2f}", f"{r['per_backprop']:.2f}"]
        compile_s = [f"{r['compile_s']:.1f} s", f"{r['compile_s'] / bp_compile_s:.1f}x"]
        rows.append([name, _ms(r["median_ms"]), *ratios, *compile_s, "no"])
    intro = (
        f"nnx transformer (`bench_transformer.py`: {c.get('depth')} blocks, width {c.get('width')}, "
        f"sequence {c.get('seq_len')}, batch {c.get('batch')}, {c.get('rounds')} rounds): the "
        "gradient alone (`jax.grad` vs `forward_grad`, no optimizer, no donation):"
    )
    header = "program | median | / forward | / backprop | compile | compile / bp | donated"
    return _section(intro, header, rows)


def depth_table(sections):
    res = (sections.get("depth_memory") or {}).get("result") or {}
    rows = []
    for d in res.get("depths", []):
        cells = [d["depth"], _yes(res.get("donated"))]
        for k in ("forward", "backprop", *TANGENTS):
            v = d.get(k) or {}
            cell = _mb(v.get("temp_bytes"))
            if "over_backprop" in v:
                cell += f" ({v['over_backprop']:.2f}x)"
            cells.append(f"{cell}, {v.get('compile_s', float('nan')):.1f} s")
        rows.append(cells)
    if not rows:
        return []
    header = ["depth", "donated", "forward", "backprop", *(f"fg {t} (/bp)" for t in TANGENTS)]
    intro = (
        f"MLP width {res.get('width')}, B={res.get('batch_size')}: XLA temp memory of the step "
        "(compile only) and compile time:"
    )
    return _section(intro, header, rows)


def gpt2_table(sections):
    res = (sections.get("gpt2_memory") or {}).get("result") or {}
    progs = res.get("programs") or {}
    if not progs:
        return []

    peaks = {n: (part.get("result") or {}).get("peak_bytes_in_use") for n, part in progs.items()}
    f, b = peaks.get("forward"), peaks.get("backprop")
    rows = []
    for name, part in progs.items():
        r, p = part.get("result") or {}, peaks[name]
        cells = [name, _yes(r.get("donated"))]
        cells.append(_gib(p) + ("*" if p and p == r.get("peak_after_compile_bytes") else ""))
        cells += [f"{p / q:.2f}" if p and q else "n/a" for q in (f, b)]
        cells.append(_gib((r.get("memory") or {}).get("temp_bytes")))
        cells.append(f"{r['compile_s']:.1f} s" if "compile_s" in r else "n/a")
        rows.append([*cells, r.get("outcome") or part.get("status")])
    c = res.get("config", {})
    params = next((p["result"].get("num_params") for p in progs.values() if p.get("result")), None)
    header = "program | donated | peak device memory | / forward | / backprop | XLA temp | compile"
    intro = (
        f"GPT ({c.get('depth')} blocks, width {c.get('width')}, sequence {c.get('seq_len')}, "
        f"batch {c.get('batch')}, vocabulary {c.get('vocab')}, {params} parameters), one process "
        "each (`XLA_PYTHON_CLIENT_PREALLOCATE=false`, `--xla_gpu_autotune_level=0` so that "
        "the autotuner's trial buffers do not set the peak), forward gradient with rademacher "
        "tangents; peak = `memory_stats()['peak_bytes_in_use']` after 2 calls, parameters and "
        "batch included (* = the peak was reached while compiling, not running):"
    )
    return _section(intro, header + " | outcome", rows)


def oom_table(sections):
    res = (sections.get("oom") or {}).get("result") or {}
    bp = (res.get("backprop") or {}).get("result") or {}
    fg = (res.get("fg") or {}).get("result") or {}
    if not bp and not fg:
        return []
    c = fg.get("config") or bp.get("config") or {}
    if bp.get("outcome") != "RESOURCE_EXHAUSTED":
        bp_cell = f"{bp.get('outcome') or res['backprop'].get('status')}"
        bp_cell += f" (XLA needs {_gib(bp.get('xla_needs_bytes'))}, peak {_gib(bp.get('peak_bytes_in_use'))})"
    elif bp.get("xla_needs_bytes"):
        bp_cell = f"RESOURCE_EXHAUSTED (needs {_gib(bp['xla_needs_bytes'])} per XLA)"
    else:
        bp_cell = (
            f"RESOURCE_EXHAUSTED (an allocation of {_gib(bp.get('oom_request_bytes'))} failed)"
        )
    losses = fg.get("losses") or []
    if fg.get("outcome") == "ran" and losses:
        fg_cell = (
            f"trains: {len(losses) - 1} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, peak "
            f"{_gib(fg.get('peak_bytes_in_use'))}, {fg.get('ms_per_step', float('nan')):.0f} ms/step"
        )
    else:
        fg_cell = f"{fg.get('outcome') or (res.get('fg') or {}).get('status')}: {fg.get('error', '')[:200]}"
    shape = f"{c.get('depth')} blocks, width {c.get('width')}, sequence {c.get('seq_len')}, "
    shape += f"vocabulary {c.get('vocab')}"
    n = fg.get("num_params") or bp.get("num_params")
    limit = fg.get("bytes_limit") or bp.get("bytes_limit")
    row = [shape, c.get("batch"), n, _gib(limit), "yes", bp_cell, fg_cell]
    header = "GPT | batch | parameters | bytes_limit | donated | backprop step"
    intro = (
        "Backprop out of memory, the forward gradient training (one process each, preallocation on, "
        "`XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`):"
    )
    return _section(intro, header + " | forward gradient (rademacher, K=1)", [row])


def last_line(error: str) -> str:
    """The exception line of a traceback (without JAX's note on filtered frames)."""
    lines = [ln for ln in error.strip().splitlines() if ln.strip() and ln[0] not in " -"]
    lines = [ln for ln in lines if not ln.startswith("For simplicity")] or ["?"]
    return lines[-1][:300]


def markdown(results) -> str:
    dev = results.get("device") or {}
    lines = [
        f"### GPU check: {dev.get('device_kind', 'unknown device')}, jax {dev.get('jax', '?')}",
        "",
        f"`python {results.get('command', '')}` ({results.get('started')}; "
        f"{results.get('wall_s', 0):.0f} s in all; every section in a process of its own).",
        "",
    ]
    sections = results.get("sections", {})
    for build in (steps_table, transformer_table, depth_table, gpt2_table, oom_table):
        try:
            lines += build(sections)
        except Exception:
            lines += [f"({build.__name__} failed: {traceback.format_exc().splitlines()[-1]})", ""]
    for name, sec in sections.items():
        if sec.get("status") != "ok":
            err = sec.get("error")
            lines.append(
                f"- section `{name}`: {sec.get('status')}" + (f" ({last_line(err)})" if err else "")
            )
    return "\n".join(lines) + "\n"

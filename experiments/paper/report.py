"""``report.md``: our numbers next to the paper's (Baydin et al. 2022), both comparisons."""

from __future__ import annotations

from pathlib import Path

from experiments.toolkit.analysis import fmt as _fmt
from experiments.toolkit.analysis import md_table

# Numbers read from the paper's figures (it has no results table); docs/reproducing.md lists
# where each comes from.
PAPER = {
    "beale": {"lr": 0.01, "T_f": 0.19, "T_b": 0.22},
    "rosenbrock": {"lr": 5e-4, "T_f": 3.0, "T_b": 4.1},
    "logreg": {"lr": 1e-4, "T_f": 197.3, "T_b": 356.8, "T_ratio": 0.553},
    "mlp": {
        2e-5: {"R_f": 2.329, "R_b": 3.971, "ratio": 0.586, "T_ratio": 0.567},
        2e-4: {"R_f": 2.607, "R_b": 4.359, "ratio": 0.598, "T_ratio": 0.229},
    },
    "depth": "R_f ~2.5 -> 4.2, R_b ~4.6-5.0, R_f/R_b ~0.55 -> 0.85 for 1 -> 100 layers (Fig. 6)",
}


def _paper_t(name: str, lr: float | None):
    p = PAPER.get(name)
    if name == "mlp":
        for plr, v in PAPER["mlp"].items():
            if lr is not None and abs(lr - plr) < 1e-12:
                return v["T_ratio"], f"lr {plr:g}"
        return None, "paper: 0.567 @ 2e-5, 0.229 @ 2e-4"
    if isinstance(p, dict) and "T_f" in p:
        return p.get("T_ratio", p["T_f"] / p["T_b"]), f"lr {p['lr']:g}"
    return None, "not reported"


def _mems(rt: dict) -> str:
    """Compiled memory of f / the FGD step / the backprop step of a runtime record, MiB."""
    mem = rt.get("memory") or {}
    programs = (mem.get("forward"), rt["variants"][0].get("memory"), mem.get("backprop"))
    totals = [(m or {}).get("total_bytes") for m in programs]
    return " / ".join("n/a" if b is None else f"{b / 2**20:.2f}" for b in totals)


def _to_threshold_cells(s: dict) -> list[str]:
    """Threshold, iterations to it and times of a comparison (the ratio in bold)."""
    iters = f"{s['iters_to_threshold_fgd']} / {s['iters_to_threshold_sgd']}"
    times = [_fmt(s["T_f"]), _fmt(s["T_b"]), f"**{_fmt(s['T_ratio'])}**"]
    return [_fmt(s["threshold"]), iters, *times]


def write_report(out: Path, results: dict, wall_time: float | None = None) -> Path:
    """Writes ``out/report.md`` from the ``results.json`` dict."""
    exps = results["experiments"]
    env = results["environment"]
    cfg = env.get("config", {})
    L = ["# Forward gradients vs backprop: reproduction report\n"]
    # Anything that makes this run differ from the preset (another data set, fewer
    # iterations) comes first, so that no reader takes it for the paper's setting.
    for note in results.get("notes") or []:
        L.append(f"> **Note:** {note}\n")
    L.append(
        f"Preset **{cfg.get('preset', '?')}** on **{env['device']}**"
        f"{' (' + env['cpu_model'] + ')' if env.get('cpu_model') else ''} "
        f"({env.get('cpu_count')} CPU cores visible, {env['platform']}); jax {env['jax']}, "
        f"flax {env['flax']}, optax {env['optax']}, fgrad_jax {env['fgrad_jax']}, "
        f"commit `{(env.get('git_commit') or '?')[:12]}`"
        f"{' (dirty tree)' if env.get('git_dirty') else ''}."
    )
    tangents = sorted(
        {v.get("tangent", "normal") for v in cfg.values() if isinstance(v, dict) and "seed" in v}
    )
    whose = "the paper's" if tangents in ([], ["normal"]) else "not the paper's normal"
    L.append(f"FGD tangent distribution: {', '.join(tangents) or 'normal'} ({whose}).")
    if wall_time is not None:
        L.append(f"Total wall time: {wall_time:.0f} s.")
    L.append("")
    L.append(
        "Paper numbers are from Baydin et al. 2022 (arXiv 2202.08587), read from its "
        "figures (it has no results table), measured with its own PyTorch forward-mode "
        "implementation on a GPU on MNIST. Ours come from this run's `results.json`; where "
        "the data set or the learning rate differ from the paper's, the comparison is of "
        "the trend, not the value. Definitions: R = time of one iteration / time of one "
        "evaluation of f (medians of interleaved rounds in one process, warmed up, "
        "compilation excluded); T = wall time until the smoothed mean training loss first "
        "reaches a common threshold (the higher of the two methods' final losses); runs whose "
        "loss became non-finite count as diverged and are left out of the mean curve.\n"
    )

    L.append("## Cost per iteration\n")
    rows = []
    for n, e in exps.items():
        rt = e["runtime"]
        ms = [rt["t_forward_s"], rt["variants"][0]["t_step_s"], rt["t_backprop_s"]]
        paper = PAPER["mlp"][2e-5] if n == "mlp" else {}  # the paper's runtimes: MLP only
        ratios = [e["R_f"], e["R_b"], e["fg_over_bp"], *map(paper.get, ("R_f", "R_b", "ratio"))]
        rows.append(
            [n, e.get("num_params"), *map(_fmt, ratios), *(f"{t * 1e3:.3f}" for t in ms), _mems(rt)]
        )
    header = (
        "experiment | params | R_f | R_b | R_f/R_b | paper R_f | paper R_b | paper R_f/R_b "
        "| f (ms) | FGD iter (ms) | BP iter (ms) | XLA mem f / FGD / BP (MiB)"
    )
    L += [*md_table(header, rows), ""]

    L.append("## Comparison 1: shared learning rate\n")
    L.append(
        "Both methods at the same initial learning rate (the paper's protocol; the paper's "
        "rates in the paper preset). This favours FGD: the rate is one at which FGD is "
        "stable, usually far below backprop's best. T_f, T_b: measured wall clock of the "
        "training program, in which all runs of a method are one vmapped program (vmap can "
        "change the two methods' costs differently, e.g. convolutions on CPU). "
        "'1 run (est.)': iterations to the threshold x the median time of one "
        "un-vmapped iteration from the cost table, the closest to the paper's per-run "
        "T.\n"
    )
    rows = []
    for n, e in exps.items():
        data = (e.get("dataset") or {}).get("name", "-")
        for s in e["shared_lr"]:
            pt, note = _paper_t(n, s.get("lr"))
            acc = "-"
            if "test_accuracy_fgd" in s:
                acc = f"{_fmt(s['test_accuracy_fgd'])} / {_fmt(s['test_accuracy_sgd'])}"
            div = f"{s.get('diverged_runs_fgd', 0)}/{s.get('diverged_runs_sgd', 0)}"
            losses = (s[k] for k in ("initial_loss", "final_loss_fgd", "final_loss_sgd"))
            estimate, paper = _fmt(s.get("T_ratio_est")), f"{_fmt(pt)} ({note})"
            cells = [n, data, f"{s['lr']:g}", f"{s['runs']} ({div})", *map(_fmt, losses)]
            rows.append([*cells, *_to_threshold_cells(s), estimate, paper, acc])
    header = (
        "experiment | data | lr | runs (diverged FGD/BP) | initial loss | final FGD | final BP "
        "| threshold | iters FGD / BP | T_f (s) | T_b (s) | T_f/T_b | T_f/T_b, 1 run (est.) "
        "| paper T_f/T_b | test acc FGD / BP"
    )
    L += [*md_table(header, rows), ""]

    L.append("## Comparison 2: each method at its own tuned learning rate\n")
    L.append(
        "A small sweep per method (initial rate times the factors in the config); each "
        "method keeps the rate with the lowest final smoothed training loss. T = "
        "iterations to the common threshold x the median time of one iteration (the "
        "sweep's runs share one vmapped program, so their wall clock is not per run). The "
        "paper has no such comparison; independent reports found tuned backprop 2-4x "
        "faster.\n"
    )
    rows = []
    for n, e in exps.items():
        t = e.get("tuned")
        if t:
            lrs = ", ".join(f"{x:g}" for x in t["lrs"])
            best = [f"{t['best_lr']['fgd']:g}", f"{t['best_lr']['sgd']:g}"]
            finals = [_fmt(t["final_loss_fgd"]), _fmt(t["final_loss_sgd"])]
            rows.append([n, lrs, *best, *finals, *_to_threshold_cells(t)])
    header = (
        "experiment | lrs swept | best lr FGD | best lr BP | final FGD | final BP | threshold "
        "| iters FGD / BP | T_f (s) | T_b (s) | T_f/T_b"
    )
    L += [*md_table(header, rows), ""]

    depth = results.get("depth")
    if depth:
        c = depth["config"]
        L.append("## Depth scaling (paper Fig. 6)\n")
        L.append(
            f"MLP of width {c['width']}, batch {c['batch']}, input {c['in_dim']}. Paper: "
            f"{PAPER['depth']}, width 1024, memory equal for FGD and BP in their "
            "implementation.\n"
        )
        rows = []
        for r in depth["rows"]:
            ratios = (_fmt(r[k]) for k in ("R_f", "R_b", "fg_over_bp"))
            rows.append([r["depth"], r["num_params"], *ratios, _mems(r)])
        header = "hidden layers | params | R_f | R_b | R_f/R_b | XLA mem f / FGD / BP (MiB)"
        L += [*md_table(header, rows), ""]

    L += ["## Figures\n", *(f"![{png.stem}]({png.name})" for png in sorted(out.glob("*.png"))), ""]
    L.append(
        "Per-run metrics: `runs/<experiment>/<arm>.jsonl` (one line per logged step: "
        "step, cumulative wall time, mean loss of the window per run)."
    )
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path

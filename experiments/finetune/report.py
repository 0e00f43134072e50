"""The report of a fine-tuning run: a markdown summary with targets, and figures."""

from __future__ import annotations

import os
from typing import Any

MiB = 2**20


def _targets(results: dict[str, Any]) -> list[str]:
    methods = results["methods"]
    settings = sorted({s for m in methods.values() for s in m})
    lines = []
    for setting in settings:
        bp = methods.get("backprop", {}).get(setting)
        if bp is None:
            continue
        no_bwd = {
            n: r[setting]
            for n, r in methods.items()
            if not n.startswith("backprop") and setting in r
        }
        if not no_bwd:
            continue
        name, best = max(no_bwd.items(), key=lambda kv: kv[1]["test_acc"])
        gap = 100 * (bp["test_acc"] - best["test_acc"])
        ratio = best["peak_bytes"] / best["inference_bytes"]
        cheap = {n: r for n, r in no_bwd.items() if r["peak_bytes"] <= 1.3 * r["inference_bytes"]}
        lines.append(
            f"* `{setting}`: backprop {100 * bp['test_acc']:.2f} % (peak "
            f"{bp['peak_bytes'] / bp['inference_bytes']:.2f}x inference); best without a "
            f"backward pass `{name}` {100 * best['test_acc']:.2f} % at {ratio:.2f}x: "
            f"{'**met**' if gap <= 1 and ratio <= 1.3 else '**missed**'} "
            f"(gap {gap:+.2f} points, target <= 1; memory target <= 1.3x)"
        )
        if cheap:
            cn, cb = max(cheap.items(), key=lambda kv: kv[1]["test_acc"])
            lines.append(
                f"  - best within 1.3x inference: `{cn}` {100 * cb['test_acc']:.2f} % "
                f"({100 * (bp['test_acc'] - cb['test_acc']):+.2f} points behind backprop)"
            )
        for fg_name, sp_name in (
            ("fg_full", "spsa_full"),
            ("fg_full_sgd", "spsa_full"),
            ("fg_lora", "spsa_lora"),
        ):
            fg = methods.get(fg_name, {}).get(setting)
            sp = methods.get(sp_name, {}).get(setting)
            if fg and sp:
                lines.append(
                    f"  - `{fg_name}` {100 * fg['test_acc']:.2f} % vs `{sp_name}` "
                    f"{100 * sp['test_acc']:.2f} % after {fg['forward_passes']} / "
                    f"{sp['forward_passes']} forward passes"
                )
    return lines


def write_report(results: dict[str, Any], out: str) -> str:
    """Writes ``out/report.md`` and the figures; returns the report's path."""
    methods = results["methods"]
    settings = sorted({s for m in methods.values() for s in m})
    lines = [
        f"# Fine-tuning benchmark, preset `{results['preset']}`",
        "",
        f"Wall time {results['wall_seconds']:.0f} s; jax {results['env']['jax']}, "
        f"{results['env']['device']}; commit {results['env'].get('commit', '?')}.",
        "",
        "Pretraining (backprop on Fashion-MNIST, orbax checkpoint): "
        + ", ".join(
            f"{m} {100 * p['fashion_test_acc']:.2f} % test"
            + (" (restored)" if p["restored"] else "")
            for m, p in results["pretrain"].items()
        )
        + ".",
        "",
        "Test accuracy on digits (28x28) at the learning rate with the best validation "
        "accuracy; peak = arguments + outputs + temporaries - donated bytes of the compiled "
        "step (XLA memory analysis), over the same for a forward pass (logits) of the same "
        "batch.",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for name, rec in methods.items():
        cells = []
        for s in settings:
            r = rec.get(s)
            cells.append(
                "-"
                if r is None
                else f"{100 * r['test_acc']:.2f} %, {r['peak_bytes'] / MiB:.2f} MiB "
                f"({r['peak_bytes'] / r['inference_bytes']:.2f}x), lr {r['learning_rate']:g}"
            )
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Inference (forward pass) bytes: "
        + ", ".join(
            f"{s} {next(r[s]['inference_bytes'] for r in methods.values() if s in r) / MiB:.2f} MiB"
            for s in settings
        )
        + " (full-model forward; LoRA models add their adapters).",
    ]
    lines += ["", "## Targets", "", *_targets(results)]
    lines += ["", "## Figures", ""]
    for fig in _figures(results, out):
        lines.append(f"![{fig}]({fig})")
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _figures(results: dict[str, Any], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    settings = sorted({s for m in methods.values() for s in m})
    names = []
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings):
        for name, rec in methods.items():
            if s in rec:
                c = rec[s]["curve"]
                style = "--" if name.startswith("spsa") else ":" if "backprop" in name else "-"
                ax.plot(c["forward_passes"], [100 * a for a in c["test_acc"]], style, label=name)
        ax.set_title(s)
        ax.set_xlabel("forward passes")
        ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_forward_passes.png"), dpi=110)
    plt.close(fig)
    names.append("accuracy_vs_forward_passes.png")

    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / max(len(settings), 1)
    labels = list(methods)
    for j, s in enumerate(settings):
        vals = [
            methods[n][s]["peak_bytes"] / methods[n][s]["inference_bytes"] if s in methods[n] else 0
            for n in labels
        ]
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=s)
    ax.axhline(1.3, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(settings) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, fontsize=8)
    ax.set_ylabel("step peak / forward peak")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "memory.png"), dpi=110)
    plt.close(fig)
    names.append("memory.png")
    return names

"""The paper preset's data handling (MNIST -> Fashion-MNIST fallback, no data -> error before
any work), its scaling options, and the figure fixes (diverged runs out of the mean curve,
trajectory colours and colour bar, integer depth ticks, one name per method)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from experiments import toolkit as C
from experiments.paper import configs as presets
from experiments.paper import main as reproduce
from experiments.paper import plots
from fgrad_jax import datasets


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(array.dtype.newbyteorder(">")).tobytes()))


def _fake_fashion(root: Path) -> Path:
    """A tiny data set in the Fashion-MNIST layout (28x28 uint8 images, labels 0..9)."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for prefix, n in (("train", 128), ("t10k", 32)):
        _write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), np.uint8)
        )
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return root


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No MNIST anywhere: an empty cache and a mirror that refuses connections at once."""
    monkeypatch.setenv("FGRAD_JAX_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", ["http://127.0.0.1:9/"])
    return tmp_path


def test_no_data_at_all_fails_before_any_work(offline, monkeypatch):
    monkeypatch.setattr(datasets, "DEFAULT_FASHION_MNIST_DIR", str(offline / "absent"))
    out = offline / "out"
    with pytest.raises(presets.NoDataError) as err:
        reproduce.main(["--preset", "paper", "--out", str(out), "--no-progress"])
    msg = str(err.value)
    assert "nothing was run" in msg
    assert "--data-dir" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert not out.exists()  # no output directory, so no training, no runtime measurement


def test_explicit_dataset_never_falls_back(offline, monkeypatch):
    monkeypatch.setattr(datasets, "DEFAULT_FASHION_MNIST_DIR", str(_fake_fashion(offline / "f")))
    out = offline / "out"
    with pytest.raises(presets.NoDataError, match="'mnist' could not be loaded"):
        reproduce.main(["--preset", "paper", "--dataset", "mnist", "--out", str(out)])
    assert not out.exists()


def test_paper_preset_falls_back_to_fashion_mnist_and_says_so(offline, monkeypatch):
    monkeypatch.setattr(datasets, "DEFAULT_FASHION_MNIST_DIR", str(_fake_fashion(offline / "f")))
    out = offline / "out"
    tiny = [
        "logreg.seeds=2",
        "logreg.tune_seeds=1",
        "logreg.tune_factors=1,10",
        "logreg.runtime_rounds=2",
        "logreg.log_every=5",
        "logreg.smooth_window=5",
        "logreg.checkpoint_every=0",
    ]
    argv = ["--preset", "paper", "--only", "logreg", "--max-iterations", "20", "--set", *tiny]
    reproduce.main([*argv, "--out", str(out), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    assert results["experiments"]["logreg"]["dataset"]["name"] == "fashion_mnist"
    assert results["changed_from_preset"]["logreg"]["steps"] == [25000, 20]
    report = (out / "report.md").read_text()
    top = report.split("## Cost per iteration")[0]
    assert "**Fashion-MNIST**" in top and "not on the paper's MNIST" in top
    assert "`logreg` differs from the paper preset: steps 25000 -> 20" in top
    # --replot redraws from the logged data alone and keeps the notes.
    (out / "logreg_loss.png").unlink()
    (out / "report.md").unlink()
    reproduce.main(["--replot", str(out)])
    assert (out / "logreg_loss.png").exists()
    assert "**Fashion-MNIST**" in (out / "report.md").read_text()


def test_set_rejects_unknown_fields():
    with pytest.raises(SystemExit, match="has no field 'stepz'"):
        reproduce.main(["--preset", "test", "--set", "mlp.stepz=3"])
    with pytest.raises(SystemExit, match=r"EXPERIMENT\.FIELD=VALUE"):
        reproduce.main(["--preset", "test", "--set", "steps=3"])


def test_run_band_leaves_diverged_runs_out():
    # Run 1 blows up (finite but huge, then inf) like FGD on Beale; runs 0 and 2 converge.
    losses = np.array(
        [
            [4.0, 2.0, 1.0, 0.5],
            [4.0, 1e8, np.inf, np.nan],
            [2.0, 1.0, 0.5, 0.25],
        ]
    )
    mean, lo, hi, bad = C.run_band(losses)
    assert bad == 1
    np.testing.assert_allclose(mean, [3.0, 1.5, 0.75, 0.375])
    np.testing.assert_allclose(lo, [2.0, 1.0, 0.5, 0.25])
    np.testing.assert_allclose(hi, [4.0, 2.0, 1.0, 0.5])
    # The curve the tables use (mean_curve) is the same one.
    np.testing.assert_allclose(mean, C.mean_curve(losses))
    mean, _, _, bad = C.run_band(losses[1:2])
    assert bad == 1 and np.isnan(mean).all()


def _write_arm(path: Path, method: str, loss: np.ndarray, params: np.ndarray) -> None:
    rows = [{"header": True, "method": method, "lrs": [0.01] * loss.shape[1]}]
    for i in range(loss.shape[0]):
        rows.append(
            {
                "step": i,
                "time_s": 0.001 * (i + 1),
                "loss": [None if not np.isfinite(v) else float(v) for v in loss[i]],
                "params": params[i].tolist(),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def beale_run(tmp_path):
    """A synthetic Beale run: 3 FGD runs (the second diverges), GD's runs identical."""
    run_dir = tmp_path / "runs" / "beale"
    run_dir.mkdir(parents=True)
    xs, ys = np.meshgrid(np.linspace(-1, 4, 30), np.linspace(-1.5, 2, 30))
    np.savez(run_dir / "landscape.npz", xs=xs, ys=ys, zs=(xs - 3) ** 2 + (ys - 0.5) ** 2)
    steps = 5
    loss = np.array([[10.0 / (i + 1), 10.0 * 10**i, 8.0 / (i + 1)] for i in range(steps)])
    loss[3:, 1] = np.inf
    path = np.linspace([1.0, 1.0], [3.0, 0.5], steps)
    params = np.stack([path, path * 3, path], axis=1)  # (steps, runs, 2)
    _write_arm(run_dir / "fgd.jsonl", "fgd", loss, params)
    _write_arm(run_dir / "sgd.jsonl", "sgd", loss[:, [0, 0, 0]], params[:, [0, 0, 0]])
    entry = {"config": {"start": [1.0, 1.0]}, "minimum": [3.0, 0.5], "shared_lr": [{}]}
    return tmp_path, entry, loss


def test_loss_figure_mean_curve_leaves_diverged_runs_out(beale_run):
    out, entry, loss = beale_run
    fig = plots.loss_figure(out, "beale", entry)
    ax = fig.axes[0]
    fgd = [ln for ln in ax.get_lines() if "FGD" in ln.get_label()]
    assert len(fgd) == 1 and "1 of 3 runs diverged, left out" in fgd[0].get_label()
    np.testing.assert_allclose(fgd[0].get_ydata(), loss[:, [0, 2]].mean(axis=1))
    plots.plt.close(fig)


def test_trajectory_figure_colours_and_colour_bar(beale_run):
    import matplotlib.colors as mcolors

    out, entry, _ = beale_run
    fig = plots.function_figure(out, "beale", entry)
    ax, cbar = fig.axes
    assert cbar.get_ylabel() == "log10 f(x, y)"
    handles, labels = ax.get_legend_handles_labels()
    by_label = dict(zip(labels, handles))
    fgd = next(h for lab, h in by_label.items() if lab.startswith(plots.LABELS["fgd"]))
    bp = by_label[plots.LABELS["sgd"]]
    white = mcolors.to_rgba("white")
    for handle, method in ((fgd, "fgd"), (bp, "sgd")):
        assert mcolors.to_rgba(handle.get_color()) != white
        assert mcolors.same_color(handle.get_color(), plots.COLORS[method])
    fgd_lines = [ln for ln in ax.get_lines() if mcolors.same_color(ln.get_color(), "tab:blue")]
    assert [ln.get_linestyle() for ln in fgd_lines] == ["-", "--", "-"]  # run 1 diverged
    plots.plt.close(fig)


def _depth_row(depth: int) -> dict:
    mem = {"total_bytes": 1000 * depth}
    return {
        "depth": depth,
        "R_f": 3.0,
        "R_b": 4.0,
        "fg_over_bp": 0.75,
        "variants": [{"memory": mem}],
        "memory": {"backprop": mem, "forward": mem},
    }


@pytest.mark.parametrize("depths", [(1, 2, 4, 8, 16), (1, 2, 5, 10, 20, 40, 60, 80, 100)])
def test_depth_figure_has_integer_layer_ticks(depths):
    depth = {"rows": [_depth_row(d) for d in depths], "config": {"width": 8, "batch": 4}}
    fig = plots.depth_figure(depth)
    fig.canvas.draw()
    for ax in fig.axes:
        assert list(ax.get_xticks()) == list(depths)
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(d) for d in depths]
    legend_texts = [
        t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts
    ]
    assert not any(t.startswith("sgd") for t in legend_texts)  # backprop is "backprop"
    plots.plt.close(fig)


def test_tuned_figure_names_backprop_backprop():
    t = {
        "lrs": [0.1, 1.0],
        "final_loss": {"fgd": [0.5, float("inf")], "sgd": [0.4, 0.2]},
        "best_lr": {"fgd": 0.1, "sgd": 1.0},
    }
    fig = plots.tuned_figure({"mlp": {"tuned": t}})
    texts = [t.get_text() for t in fig.axes[0].get_legend().texts]
    assert plots.LABELS["sgd"] in texts and "FGD (forward gradient): diverged" in texts
    assert "sgd" not in texts and "fgd" not in texts
    plots.plt.close(fig)


def test_loss_figure_one_line_style_per_learning_rate(tmp_path):
    run_dir = tmp_path / "runs" / "mlp"
    run_dir.mkdir(parents=True)
    loss = np.array([[2.3, 2.3], [2.2, 2.25], [2.1, 2.2]])
    params = np.zeros((3, 2, 1))
    for method in ("fgd", "sgd"):
        for lr in (2e-4, 2e-5):
            path = run_dir / f"{method}_lr{lr:g}.jsonl"
            _write_arm(path, method, loss, params)
            rows = path.read_text().splitlines()
            header = json.loads(rows[0]) | {"lrs": [lr, lr]}
            path.write_text("\n".join([json.dumps(header), *rows[1:]]) + "\n")
    fig = plots.loss_figure(tmp_path, "mlp", {"shared_lr": [{}]})
    style = {ln.get_label(): ln.get_linestyle() for ln in fig.axes[0].get_lines()}
    for lr in ("0.0002", "2e-05"):
        fgd, bp = (style[f"{plots.LABELS[m]}, lr {lr}"] for m in ("fgd", "sgd"))
        assert fgd == bp
    assert style[f"{plots.LABELS['fgd']}, lr 0.0002"] != style[f"{plots.LABELS['fgd']}, lr 2e-05"]
    plots.plt.close(fig)


def test_readme_command_runs_from_any_directory(tmp_path):
    """``python experiments/reproduce.py`` (the README's main job) is a shim over
    ``experiments.paper.main``: it finds the package without PYTHONPATH, from any directory."""
    import os
    import subprocess
    import sys

    shim = Path(__file__).resolve().parents[1] / "experiments" / "reproduce.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(shim), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "--preset {paper,quick,test}" in proc.stdout and "--replot" in proc.stdout

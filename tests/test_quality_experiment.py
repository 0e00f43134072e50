"""End-to-end test of ``experiments/quality.py`` on its tiny preset (MLP, backprop and
activity-perturbed FG, one epoch on 640 Fashion-MNIST images), and of its report logic."""

import dataclasses
import doctest
import sys
from pathlib import Path

import pytest

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS_DIR))

import quality  # noqa: E402
import toolkit.quality  # noqa: E402
from toolkit.io import read_json, read_jsonl  # noqa: E402
from toolkit.quality import parse_method  # noqa: E402
from toolkit.quality_report import targets  # noqa: E402


@pytest.mark.slow
@pytest.mark.usefixtures("standard_promotion")
def test_tiny_preset_end_to_end(tmp_path):
    # lrs= replaces every method's grid (the per-family grids are the default).
    cfg = dataclasses.replace(quality.PRESETS["tiny"], out_dir=str(tmp_path), lrs=(1e-3, 3e-3))
    quality.run(cfg)
    res = read_json(tmp_path / "quality.json")
    assert set(res["methods"]) == {"backprop", "fg_act_k1"}
    for name, entry in res["methods"].items():
        assert set(entry) == {"mlp"}
        e = entry["mlp"]
        for key in ("test_acc", "test_acc_std", "seconds"):
            assert isinstance(e[key], float) and e[key] >= 0.0, (name, key)
        assert 0.0 <= e["test_acc"] <= 1.0
        assert len(e["test_acc_per_seed"]) == 3
        assert e["sweep"]["lrs"] == [1e-3, 3e-3]
        assert e["lr"] in e["sweep"]["lrs"]
        assert len(e["sweep"]["val_acc"]) == len(e["sweep"]["lrs"])
        assert e["forward_only"] == (name != "backprop")
        recs = read_jsonl(tmp_path / "runs" / f"mlp_{name}.jsonl")
        assert recs[0]["header"] and recs[0]["method"] == name
        finals = [r for r in recs if r.get("phase") == "final" and "acc" in r]
        assert [r["epoch"] for r in finals] == [1]
        assert finals[-1]["acc"] == pytest.approx(e["test_acc_per_seed"])
    # One epoch of 20 steps of backprop is far above chance (10 %) on Fashion-MNIST.
    assert res["methods"]["backprop"]["mlp"]["test_acc"] > 0.4
    # Backprop's estimate is the gradient; the forward gradient's cosine is far below 1.
    cos_fg = res["methods"]["fg_act_k1"]["mlp"]["cosine"]["mean"]
    assert res["methods"]["backprop"]["mlp"]["cosine"]["mean"][-1] == pytest.approx(1.0)
    assert all(abs(c) < 0.9 for c in cos_fg)
    md = (tmp_path / "quality.md").read_text()
    assert "| `fg_act_k1` | yes |" in md and "Ren et al." in md
    assert "a 2-value learning-rate sweep" in md
    for fig in ("mlp_accuracy.png", "mlp_cosine.png"):
        assert (tmp_path / fig).stat().st_size > 1000


def test_parse_method_names_and_errors():
    assert parse_method("fg_lowrank_k16").k == 16
    assert parse_method("local_a_k1").perturb == "activations"
    assert parse_method("local_w_k4").perturb == "weights"
    assert not parse_method("backprop").forward_only
    with pytest.raises(ValueError, match="unknown method 'fg_sphere_k1'"):
        parse_method("fg_sphere_k1")


def _entry(acc, forward_only=True):
    return {"test_acc": acc, "test_acc_std": 0.0, "forward_only": forward_only}


def test_targets_met_and_missed():
    methods = {
        "backprop": {"mlp": _entry(0.88, False), "cnn": _entry(0.90, False)},
        "local_a_k1": {"mlp": _entry(0.865), "cnn": _entry(0.80)},
        "fg_normal_k4": {"mlp": _entry(0.70), "cnn": _entry(0.60)},
    }
    lines = targets(methods)
    assert "gap 1.50 points" in lines[0] and "**met**" in lines[0]
    assert "gap 10.00 points" in lines[1] and "**missed** by 7.00 points" in lines[1]
    assert "+20.00 points" in lines[2] and "**met**" in lines[2]


def test_toolkit_quality_docstring_examples():
    result = doctest.testmod(toolkit.quality, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0

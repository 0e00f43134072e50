"""End-to-end test of ``experiments/quality.py`` on its tiny preset (MLP, backprop and
activity-perturbed FG, one epoch on 640 Fashion-MNIST images), and of its report logic."""

import dataclasses
import doctest

import numpy as np
import pytest

from experiments.quality import main as quality
from experiments.quality import methods, report
from experiments.quality.configs import load_preset
from experiments.quality.methods import parse_method
from experiments.quality.report import agreement_lines, targets
from experiments.toolkit.io import read_json, read_jsonl


@pytest.mark.slow
@pytest.mark.usefixtures("standard_promotion")
def test_tiny_preset_end_to_end(tmp_path):
    # lrs= replaces every method's grid (the per-family grids are the default).
    cfg = dataclasses.replace(load_preset("tiny"), out_dir=str(tmp_path), lrs=(1e-3, 3e-3))
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
        assert e["compile_s"] > 0.0  # the warm-up chunk, outside the clock
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
    # The local losses' exact gradient is a reference (backprop inside each block), never
    # a candidate for the best method without a backward pass.
    assert parse_method("local_bp_splitall").family == "local_bp"
    assert not parse_method("local_bp").forward_only
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
    # The 15-point target takes the best local + activations method, whatever its K or split.
    methods["local_a_split_k16"] = {"cnn": _entry(0.85)}
    line = targets(methods)[2]
    assert "best: `local_a_split_k16`, 85.00 %" in line and "+25.00 points" in line
    methods["fg_normal_k4"]["cnn"] = _entry(0.71)
    assert "+14.00 points" in targets(methods)[2] and "**missed** by 1.00" in targets(methods)[2]


def test_ranking_agreement_lines():
    def run(accs, std):
        return {n: {"mlp": {"test_acc": a, "test_acc_std": std}} for n, a in accs.items()}

    quick = run({"backprop": 0.9, "a": 0.60, "b": 0.62, "c": 0.3}, std=0.03)
    full = run({"backprop": 0.95, "a": 0.80, "b": 0.70, "c": 0.4, "only_full": 0.5}, std=0.001)
    lines = agreement_lines(quick, full, "full")
    assert (
        "4 methods in both, Kendall's tau 0.67 (5 of 6 untied pairs in the same order)" in lines[2]
    )
    assert "`a` vs `b`" in lines[3] and "within the seeds' noise in one run" in lines[3]
    quick["b"]["mlp"]["test_acc"] = 0.7  # now 10 points apart here, 10 there: a real swap
    assert "beyond the seeds' noise in both" in agreement_lines(quick, full, "full")[3]


def test_toolkit_quality_docstring_examples():
    for module in (methods, report):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 1 and result.failed == 0


@pytest.mark.usefixtures("standard_promotion")
def test_splitall_splits_the_second_conv_block():
    """``local_a_splitall``: the CNN's blocks drawn with the flatten in the dense block, so the
    second conv block is split too (7 x 7 patches x 4 groups = 196 loss columns instead of 1);
    the first block keeps 2 x 2 patches x 4 groups, the dense block 4 groups, the output 1."""
    import jax
    import jax.numpy as jnp

    x, y = jnp.zeros((2, 28, 28, 1)), jnp.zeros(2, jnp.int32)
    columns = {}
    for name in ("local_a_split_k2", "local_a_splitall_k2"):
        method = methods.make_method(name, "cnn", x[:1])
        columns[name] = method.objective(method.init(jax.random.key(0)), x, y).shape
    assert columns == {"local_a_split_k2": (2, 16 + 1 + 4 + 1),
                       "local_a_splitall_k2": (2, 16 + 196 + 4 + 1)}  # fmt: skip


@pytest.mark.usefixtures("standard_promotion")
def test_resnet_local_step_updates_batch_stats_and_scores():
    """``--models resnet``: a local-loss step of the unchanged ResNet-18 (two runs vmapped)
    updates every run's BatchNorm statistics and the accuracy reads them."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
    y = jnp.arange(8) % 10
    method = methods.make_method("local_a_k1", "resnet", x[:1])
    params, state = methods.init_runs(
        method, jnp.array([1e-3, 1e-3]), jnp.array([0, 1], jnp.uint32)
    )
    step = jax.vmap(lambda p, s: methods.step(method, 1e-3, 10.0, p, s, x, y))
    new_params, new_state, loss = jax.jit(step)(params, state)
    before, after = jax.tree.leaves(state[2]), jax.tree.leaves(new_state[2])
    assert len(before) == 2 * 20  # mean and var: stem, 8 blocks x 2, 3 projected shortcuts
    assert all(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(after, before))
    assert loss.shape == (2,) and bool(jnp.all(jnp.isfinite(loss)))
    acc = methods.make_accuracy(method, 4)(new_params, new_state, x, y)
    assert acc.shape == (2,)
    # The evaluation's refresh: 150 training-mode passes at fixed weights reach the fixed
    # point of the momentum-0.9 average (one more pass changes nothing within 1 %), far
    # from the statistics one step left; 0 passes is the identity.
    fresh = methods.make_refresh(method, 8, 150)(new_params, new_state, x, y)
    again = methods.make_refresh(method, 8, 1)(new_params, fresh, x, y)
    for a, b in zip(jax.tree.leaves(fresh[2]), jax.tree.leaves(again[2])):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(fresh[2]), after)]
    assert max(moved) > 1e-2
    assert fresh[:2] == new_state[:2] or jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)), fresh[:2], new_state[:2])
    )
    assert methods.make_refresh(method, 8, 0)(new_params, new_state, x, y) is new_state


def test_resnet_local_variants_by_name():
    import flax.linen as nn

    from experiments.quality.resnet import ResidualBlock
    from experiments.quality.resnet import resnet_local_options as options

    def resnet_local_options(name):
        return options(parse_method(name))

    assert resnet_local_options("local_a_k16") == {"boundaries": ResidualBlock}
    assert resnet_local_options("local_a_layer_k16")["batch_coupling"] == "per_example"
    assert resnet_local_options("local_a_split_k16") == {"boundaries": nn.BatchNorm, "groups": 4}
    assert resnet_local_options("local_a_splitall_k1")["batch_coupling"] == "per_example"
    assert resnet_local_options("local_bp_split") == resnet_local_options("local_a_split_k4")
    assert resnet_local_options("local_bp") == {"boundaries": ResidualBlock}
    assert resnet_local_options("local_a_resgroups_k64")["boundaries"] is ResidualBlock
    assert resnet_local_options("local_a_resgroups16_k64")["groups"] == 16
    per_channel = resnet_local_options("local_a_reschannels_k64")["groups"]
    assert per_channel == [16, 16, 32, 32, 64, 64, 128, 128]
    assert parse_method("local_a_k16").variant == ""
    # The presets run the best local recipe on the ResNet, and its sweep reaches the rate
    # it chose at quick sizes (3e-2, above the other local recipes' grid).
    from experiments.quality.configs import QualityConfig, load_preset
    from experiments.quality.train import lr_grid

    for cfg in (QualityConfig(), load_preset("full"), load_preset("quick")):
        assert any("_respositions_" in m for m in cfg.resnet_methods), cfg.preset
    assert 3e-2 in lr_grid(parse_method("local_a_resgroups_k256"))
    assert lr_grid(parse_method("local_a_reschannels_k4")) == lr_grid(
        parse_method("local_a_resgroups16_k4")
    )
    assert 3e-2 not in lr_grid(parse_method("local_a_k16"))
    with pytest.raises(ValueError, match="unknown local variant 'splitt'"):
        resnet_local_options("local_a_splitt_k16")


def test_eval_batch_must_divide_the_splits(tmp_path):
    cfg = dataclasses.replace(load_preset("tiny"), out_dir=str(tmp_path), eval_batch=300)
    with pytest.raises(ValueError, match="eval_batch=300 must divide the val_size"):
        quality.run(cfg)
    assert not (tmp_path / "quality.json").exists()

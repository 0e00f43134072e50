"""Fine-tuning: the recipes of docs/finetuning.md run as written (tiny sizes), and the
benchmark (``experiments.finetune``) writes its JSON schema at its ``test`` preset."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "finetuning.md"


def code_blocks(text: str) -> list[str]:
    """The ```python blocks of a markdown page, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.usefixtures("standard_promotion")
def test_recipes_run_and_fine_tune(tmp_path, monkeypatch):
    """Every block runs in one namespace, in order; each recipe's loss goes down (mean of
    its last ten steps below the first ten), and the frozen base stays bitwise frozen (the
    LoRA block asserts it)."""
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks(PAGE.read_text())
    assert len(blocks) >= 12
    namespace: dict = {"__name__": "finetuning_recipes"}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    losses = namespace["losses"]
    expected = {
        f"{api}_{r}"
        for api in ("nnx", "linen")
        for r in ("full", "lora", "head", "mezo", "activity")
    }
    assert set(losses) == expected
    for name, curve in losses.items():
        curve = np.asarray(curve)
        assert np.all(np.isfinite(curve)), name
        assert curve[-10:].mean() < curve[:10].mean(), (name, curve)


REQUIRED = {"test_acc", "peak_bytes", "inference_bytes", "forward_passes", "seconds"}


@pytest.mark.usefixtures("standard_promotion", "fashion_mnist")
def test_benchmark_test_preset_writes_the_schema(tmp_path):
    """``--preset test`` (tiny CNN, a few steps; one method per kind of step: backprop, the
    forward gradient full / LoRA / head with activity perturbation, SPSA on LoRA) writes
    ``finetune.json`` with the schema of issue 19, the report and its figures, and reuses
    its checkpoint."""
    from experiments.finetune import main

    out = tmp_path / "out"
    methods = "backprop,fg_full,fg_lora,fg_head_act,spsa_lora"
    main.main(["--preset", "test", "--out", str(out), "--methods", methods])
    results = json.loads((out / "finetune.json").read_text())
    methods = results["methods"]
    assert set(methods) == {"backprop", "fg_full", "fg_lora", "fg_head_act", "spsa_lora"}
    for name, per_setting in methods.items():
        assert set(per_setting) == {"cnn_fewshot", "cnn_full"}, name
        for rec in per_setting.values():
            assert set(rec) >= REQUIRED, (name, set(rec))
            assert 0.0 <= rec["test_acc"] <= 1.0
            assert rec["peak_bytes"] > 0 and rec["inference_bytes"] > 0
            assert rec["forward_passes"] > 0 and rec["seconds"] >= 0
            assert len(rec["curve"]["forward_passes"]) == len(rec["curve"]["test_acc"])
    rec = {n: methods[n]["cnn_fewshot"] for n in methods}
    # Every method starts from the same fresh zero head: equal logits, the same step-0
    # prediction whatever the adapters.
    assert len({r["pretrained_test_acc"] for r in rec.values()}) == 1
    assert rec["fg_lora"]["trained_parameters"] < rec["fg_full"]["trained_parameters"]
    assert rec["fg_head_act"]["trained_parameters"] < rec["fg_lora"]["trained_parameters"]
    assert rec["fg_head_act"]["perturb"] == "activations"
    # Methods without a backward pass get steps_factor (2) times backprop's steps; forward
    # passes count K = 2 tangents or 2n = 2 evaluations per step.
    assert rec["spsa_lora"]["steps"] == rec["fg_lora"]["steps"] == 2 * rec["backprop"]["steps"]
    assert rec["spsa_lora"]["forward_passes"] == 4 * rec["backprop"]["forward_passes"]
    assert rec["fg_lora"]["forward_passes"] == 4 * rec["backprop"]["forward_passes"]
    assert not results["pretrain"]["cnn"]["restored"]
    report = (out / "report.md").read_text()
    assert "## Targets" in report and (out / "accuracy_vs_forward_passes.png").exists()
    # A second run restores the orbax checkpoint instead of pretraining again.
    from experiments.finetune import train
    from experiments.finetune.configs import PRESETS

    _, info = train.pretrain(PRESETS["test"].models[0], PRESETS["test"], str(out / "checkpoints"))
    assert info["restored"]


@pytest.mark.usefixtures("standard_promotion")
def test_gpt_memory_small_shape(tmp_path):
    """The GPT-shaped LoRA memory script at a tiny shape: it compiles the programs and
    writes their XLA memory (the LoRA forward-gradient step needs less than backprop's)."""
    from experiments.finetune import gpt_memory

    results = gpt_memory.main(
        ["--size", "small", "--out", str(tmp_path), "--only", "fg_lora_k1,backprop_lora"]
    )
    progs = results["programs"]
    assert set(progs) == {"forward", "fg_lora_k1", "backprop_lora"}
    for rec in progs.values():
        assert rec["peak"] == rec["temp"] + rec["argument"] + rec["output"] - rec["alias"] > 0
    assert progs["fg_lora_k1"]["temp"] < progs["backprop_lora"]["temp"]
    assert (tmp_path / "gpt_memory.md").exists()


def test_gpt_chunked_cross_entropy_matches_unchunked():
    """The sequence-chunked cross-entropy of the GPT memory script is the plain mean
    cross-entropy of the tied-output logits, value and forward-mode derivative."""
    import jax
    import optax

    from experiments.finetune.gpt_memory import chunked_xent

    kh, kt, ky, kv = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(kh, (2, 8, 5))
    table = jax.random.normal(kt, (11, 5))
    y = jax.random.randint(ky, (2, 8), 0, 11)
    v = jax.random.normal(kv, table.shape)

    def plain(t):
        return optax.softmax_cross_entropy_with_integer_labels(h @ t.T, y).mean()

    want = jax.jvp(plain, (table,), (v,))
    got = jax.jvp(lambda t: chunked_xent(h, t, y, 4), (table,), (v,))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)


@pytest.mark.usefixtures("standard_promotion")
def test_local_losses_on_the_pretrained_vit_estimate_adapters_and_heads_only():
    """``local=True`` on the benchmark's ViT: a block ends at every encoder ``Block``, one
    zero head per block joins the trained leaves, the estimate (masked to the adapters and
    heads) points along the exact block-local gradient, and a step moves the adapters and
    heads only (the frozen leaves are not arguments of the step: closed over)."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from experiments.finetune import models, train
    from experiments.finetune.configs import PRESETS, MethodConfig, ModelConfig

    cfg = ModelConfig("vit", width=8, depth=2, heads=2, mlp=8, patch=7)
    preset = PRESETS["test"]
    method = MethodConfig("fg_local_lora_act", "fg", "lora", "adam", (1e-2,), 2, "activations")
    method = type(method)(**{**method.__dict__, "local": True, "head_lr": 10.0})
    pretrained = models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    module, trainable, frozen = train.adapted_params(cfg, pretrained, method, preset)
    local = train.local_model(module)
    assert local.block_paths == (("block_0",), ("block_1",))
    heads = {k for k in trainable if k[0] == train.LOCAL}
    assert len(heads) == 4  # kernel and bias of two block heads
    assert all(k[-1] in ("lora_a", "lora_b") or k[0] in ("head", train.LOCAL) for k in trainable)
    # Start away from zero so that every trained leaf has a gradient.
    trainable = {
        k: v + 0.1 * jax.random.normal(jax.random.key(i), v.shape)
        for i, (k, v) in enumerate(sorted(trainable.items()))
    }
    x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
    y = jnp.arange(8) % 10

    def local_objective(flat):
        return local.losses(train.local_tree(flat), x, y, {})[0].mean(0).sum()

    exact = jax.jit(jax.grad(lambda t: local_objective({**frozen, **t})))(trainable)
    # With SGD (optax.identity) and lr 1, minus the update is the estimate itself.
    sgd = type(method)(**{**method.__dict__, "samples": 256, "optimizer": "sgd", "head_lr": 1.0})
    init, step = train.make_step(module, sgd, preset)
    moved, _, _ = jax.jit(step)(trainable, init(trainable), frozen, x, y, jnp.float32(1.0))
    est = {k: trainable[k] - moved[k] for k in trainable}
    flat_e = jnp.concatenate([est[k].ravel() for k in sorted(est)])
    flat_x = jnp.concatenate([exact[k].ravel() for k in sorted(exact)])
    cos = float(flat_e @ flat_x / (jnp.linalg.norm(flat_e) * jnp.linalg.norm(flat_x)))
    print(f"cosine to the exact block-local gradient: {cos:.3f}")
    assert cos > 0.5, cos
    assert all(not np.array_equal(moved[k], trainable[k]) for k in trainable)
    # Row-wise losses: the adapters after attention are scored by their own row's loss,
    # qkv's (attention mixes the rows) by the block's; a zero lora_b at the analysis would
    # let qkv/lora_a through (its output would reach nothing).
    rows = train.local_model(module, rows=True)
    assert rows.block_splits == (((4,), 1), ((4,), 1))
    adapters = {p for p in rows.split_params if "lora" in p and p.startswith("block_0")}
    assert adapters == {
        f"block_0/{n}/lora_{ab}" for n in ("out", "mlp_in", "mlp_out") for ab in "ab"
    }
    # The evaluation sees the model's own parameters only.
    assert set(flatten_dict(train.model_params({**frozen, **trainable}))) == set(
        flatten_dict(pretrained)
    ) | {k for k in trainable if k[-1] in ("lora_a", "lora_b")}


def test_step_rate_schedules():
    """``schedule="cosine"`` starts at the swept rate, halves it midway and ends near 0;
    ``"constant"`` (the presets') keeps it; anything else names the two."""
    import dataclasses

    import jax.numpy as jnp

    from experiments.finetune.configs import MethodConfig
    from experiments.finetune.train import step_rate

    method = MethodConfig("m", "fg", "lora", "adam", (1e-2,), schedule="cosine")
    rates = [float(step_rate(method, 1e-2, jnp.int32(i), 100)) for i in (0, 50, 99)]
    np.testing.assert_allclose(rates, [1e-2, 5e-3, 2.4672e-6], rtol=1e-3)
    flat = dataclasses.replace(method, schedule="constant")
    assert step_rate(flat, 1e-2, jnp.int32(99), 100) == 1e-2
    with pytest.raises(ValueError, match="use 'constant' or 'cosine'"):
        step_rate(dataclasses.replace(method, schedule="linear"), 1e-2, jnp.int32(0), 100)

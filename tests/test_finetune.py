"""Fine-tuning: the recipes of docs/finetuning.md run as written (tiny sizes), and the
benchmark (``experiments.finetune``) writes its JSON schema at its ``test`` preset."""

import json
import re
import subprocess
import sys
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
    expected = {f"{api}_{r}" for api in ("nnx", "linen") for r in ("full", "lora", "head", "mezo", "activity")}
    assert set(losses) == expected
    for name, curve in losses.items():
        curve = np.asarray(curve)
        assert np.all(np.isfinite(curve)), name
        assert curve[-10:].mean() < curve[:10].mean(), (name, curve)

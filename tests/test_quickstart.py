"""The README's promise: an nnx MLP trained with forward gradients on real Fashion-MNIST."""

import importlib.util
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.py"


@pytest.mark.slow
@pytest.mark.usefixtures("standard_promotion", "fashion_mnist")
def test_quickstart_reaches_66_percent_on_fashion_mnist():
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "2000", "--batch-size", "128", "--num-tangents", "4"])
    assert result["dataset"] == "fashion_mnist"
    # Chance is 10%; the README promises at least 66% after 2000 steps of batch 128.
    assert result["test_accuracy"] >= 0.66, result

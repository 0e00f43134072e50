"""The README's quickstart block runs as written and trains."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.usefixtures("standard_promotion")
def test_readme_quickstart_runs_and_lowers_the_loss():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 784)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 64).astype(np.int32))
    model, optimizer = namespace["model"], namespace["optimizer"]
    first = float(namespace["loss_fn"](model, x, y))
    for _ in range(250):
        logged = namespace["train_step"](model, optimizer, x, y)
    assert np.isfinite(float(logged))
    assert float(namespace["loss_fn"](model, x, y)) < 0.8 * first


def test_readme_is_short():
    """A newcomer's page (issue 18): what it is, install, commands, example, results, citation."""
    lines = README.read_text().splitlines()
    assert len(lines) <= 90, f"README.md has {len(lines)} lines; the limit is 90"

"""The Sphinx site builds without warnings (API pages from the docstrings, myst pages)."""

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Intersphinx inventories are fetched from the network, which CI and offline users lack.
OFFLINE_NOISE = (
    "inventor",
    "objects.inv",
    "intersphinx",
    "HTTPSConnection",
    "Max retries",
    "urllib3",
)


def test_sphinx_build_has_no_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-q", str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    problems = [
        line
        for line in proc.stderr.splitlines()
        if ("WARNING" in line or "ERROR" in line) and not any(n in line for n in OFFLINE_NOISE)
    ]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not problems, "\n".join(problems)
    html = (tmp_path / "html" / "api.html").read_text()
    for name in ("forward_grad", "forward_gradient", "nnx_value_and_forward_grad", "load_idx"):
        assert name in html

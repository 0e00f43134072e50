"""The overhead benchmark's pipelined mode (calls dispatched back to back, one block)."""

import time

from experiments.benchmarks import gpu_sections, overhead


def test_pipelined_rows_per_step_and_paired_ratios():
    case = gpu_sections.mlp_case(
        [16, 4, 3], 2, ("dispatched", "pipelined"), 2, 1, 0, time.time() + 60, pipeline_steps=3
    )
    modes = [(r["mode"], r["donated"], r["steps_per_call"]) for r in case["rows"]]
    assert modes == [
        ("dispatched", True, 1),
        ("dispatched", False, 1),
        ("pipelined", True, 3),
        ("pipelined", False, 3),
    ]
    for row in case["rows"]:
        assert row["rademacher"]["ms"] > 0 and row["rademacher"]["over_backprop"] > 0
    text = overhead.table({"cases": [{"sizes": [16, 4, 3], **case}]})
    assert "3 dispatched, blocked once" in text

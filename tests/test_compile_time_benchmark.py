"""The compile-time benchmark runs and reports every program (tiny transformer, one round)."""

from experiments.benchmarks import compile_time


def test_tiny_transformer_reports_every_program():
    cfg = compile_time.Config(
        models=("transformer",),
        tangents=("rademacher", "sphere"),
        rounds=1,
        depth=1,
        width=16,
        heads=2,
        seq_len=4,
        batch=2,
    )
    out = compile_time.run_model("transformer", cfg)
    assert set(out["rows"]) == {"jax.grad", "rademacher", "sphere", "user"}
    for row in out["rows"].values():
        assert row["seconds"] > 0 and row["instructions"] > 100
    assert out["rows"]["jax.grad"]["over_grad"] == 1.0
    assert "| transformer | sphere |" in compile_time.table({"models": [out]})

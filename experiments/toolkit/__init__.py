"""What every experiment shares (``from experiments.toolkit import ...``): IO and the run's
environment, one timing harness, dataclass configs with one override helper, the model zoo,
the one training loop, its analysis, and the runtime ratios with their memory reader and
result records. Each module imports only those before it in that order; matplotlib is never
imported here, so that the timing scripts run without it.
"""

# ruff: noqa: F401  (this module re-exports)
from .analysis import (
    add_estimates,
    first_crossing,
    format_entry,
    mean_curve,
    num_params,
    pick_tuned,
    run_band,
    smooth,
    summarise_pair,
    time_per_iter,
)
from .config import add_overrides, apply_overrides, from_dict
from .io import environment, read_json, read_jsonl, to_jsonable, write_json
from .models import (
    CNN,
    FUNCTIONS,
    MINIMA,
    MLP,
    Block,
    LogReg,
    Transformer,
    classifier_loss,
    init_mlp,
    landscape,
    mlp_loss,
    mlp_problem,
    synthetic_batch,
)
from .ratios import compiled_memory, donated_step, measure_ratios, measure_runtime, memory_of
from .timing import Runner, paired_ratio, time_interleaved
from .train import Arm, train_arms

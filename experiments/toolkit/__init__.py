"""What every experiment shares: one timing harness, one memory reader, one ``environment()``,
the model zoo, IO, dataclass configs with one override helper, the one training loop and
typed result records (``from experiments.toolkit import ...``).

Layering (each module imports only those above it): ``io`` -> ``env``, ``memory``,
``timing``, ``records``, ``config``, ``models`` -> ``train`` -> ``analysis``, ``ratios`` ->
the experiments' own ``plots`` and ``report`` modules (matplotlib is never imported here, so
that the timing scripts run without it).
"""

# ruff: noqa: F401  (this module re-exports)
from .analysis import (
    add_estimates,
    diverged,
    first_crossing,
    fmt,
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
from .env import environment
from .io import Checkpointer, JsonlLogger, read_json, read_jsonl, to_jsonable, write_json
from .memory import compiled_memory, device_peak_bytes, memory_of
from .models import (
    CNN,
    FUNCTIONS,
    MINIMA,
    MLP,
    Block,
    LogReg,
    Transformer,
    beale,
    classifier_loss,
    init_mlp,
    landscape,
    mlp_apply,
    mlp_loss,
    rosenbrock,
    synthetic_batch,
    xent,
)
from .ratios import (
    make_backprop_step,
    make_fg_step,
    make_forward,
    measure_ratios,
    measure_runtime,
    summarise,
)
from .records import RatioResult, Record, VariantTiming
from .timing import Runner, median, paired_ratio, time_interleaved
from .train import METHODS, Arm, ArmResult, make_step, make_tx, train_arms

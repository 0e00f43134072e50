"""The experiment toolkit: one timing harness, one memory reader, one ``environment()``, the
model zoo, IO, dataclass configs with one override helper, the training loop and typed
result records. Entry scripts in ``experiments/`` import it as ``from toolkit import ...``
(a script's own directory is on ``sys.path``).

Layering (each module imports only those above it): ``io`` -> ``env``, ``memory``,
``timing``, ``records``, ``config``, ``models`` -> ``train`` -> ``analysis``, ``ratios`` ->
``plots``, ``report`` (these two only read results and are not imported here, so that the
timing scripts never import matplotlib).
"""

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
from .config import add_overrides, apply_overrides
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

__all__ = [
    "CNN",
    "FUNCTIONS",
    "METHODS",
    "MINIMA",
    "MLP",
    "Arm",
    "ArmResult",
    "Block",
    "Checkpointer",
    "JsonlLogger",
    "LogReg",
    "RatioResult",
    "Record",
    "Runner",
    "Transformer",
    "VariantTiming",
    "add_estimates",
    "add_overrides",
    "apply_overrides",
    "beale",
    "classifier_loss",
    "compiled_memory",
    "device_peak_bytes",
    "diverged",
    "environment",
    "first_crossing",
    "fmt",
    "format_entry",
    "init_mlp",
    "landscape",
    "make_backprop_step",
    "make_fg_step",
    "make_forward",
    "make_step",
    "make_tx",
    "mean_curve",
    "measure_ratios",
    "measure_runtime",
    "median",
    "memory_of",
    "mlp_apply",
    "mlp_loss",
    "num_params",
    "paired_ratio",
    "pick_tuned",
    "read_json",
    "read_jsonl",
    "rosenbrock",
    "run_band",
    "smooth",
    "summarise",
    "summarise_pair",
    "synthetic_batch",
    "time_interleaved",
    "time_per_iter",
    "to_jsonable",
    "train_arms",
    "write_json",
    "xent",
]

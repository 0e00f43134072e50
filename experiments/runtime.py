"""Runtime and memory of a forward-gradient step against a backprop step and a forward pass.

Everything is measured in one process, jitted, warmed up, with the candidates interleaved
(round-robin, one call each per round) so that a noisy shared machine slows them alike, and
reported as medians. The paper's quantities (Baydin et al. 2022, Sec. 5):

* ``R_f`` = time of one forward-gradient SGD step / time of one evaluation of f;
* ``R_b`` = time of one backprop SGD step / time of one evaluation of f;
* ``fg_over_bp`` = ``R_f / R_b`` (the paper's MLP: 2.329 / 3.971 = 0.586).

``paired_ratio`` is the median over rounds of (fg step time / backprop step time) within the
same round: the most noise-robust form of ``fg_over_bp`` on a shared machine.

Reusable entry point: :func:`measure_ratios`. Command line::

    python experiments/runtime.py --preset quick --out runtime.json
    python experiments/runtime.py --preset full --out runtime.json   # every config below

Memory: ``jax.jit(step).lower(...).compile().memory_analysis()`` (XLA's static buffer
assignment: temp bytes are the working memory beyond arguments and outputs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# `--mesh N` on a CPU host: N host devices must be requested before jax is imported.
if "--mesh" in sys.argv[1:-1] and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    _n = sys.argv[sys.argv.index("--mesh") + 1]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}"
    ).strip()

# The torch peer runs in the same process: stop OpenMP worker threads from busy-waiting
# after each torch op, which would steal the 2 cores from the JAX step that runs next.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgrad_jax

# ----------------------------------------------------------------------------- models


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    """Dense layers with ReLU between them; LeCun-normal kernels, zero biases."""
    params = []
    for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes)):
        params.append(
            {
                "w": jax.random.normal(k, (m, n), jnp.float32) / math.sqrt(m),
                "b": jnp.zeros((n,), jnp.float32),
            }
        )
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def xent(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def mlp_loss(params, batch):
    x, y = batch
    return xent(mlp_apply(params, x), y)


def init_cnn(key: jax.Array, channels: int = 64, classes: int = 10):
    """Four 3x3 convolutions (64 channels), max-pool after every second, dense to 10.

    The architecture independent reimplementations used for the paper's MNIST CNN
    (DSSC-projects/veni); the paper does not print it.
    """
    ks = jax.random.split(key, 5)
    params = {}
    cin = 1
    for i in range(4):
        params[f"conv{i}"] = {
            "w": jax.random.normal(ks[i], (3, 3, cin, channels), jnp.float32) / math.sqrt(9 * cin),
            "b": jnp.zeros((channels,), jnp.float32),
        }
        cin = channels
    params["dense"] = {
        "w": jax.random.normal(ks[4], (7 * 7 * channels, classes), jnp.float32)
        / math.sqrt(7 * 7 * channels),
        "b": jnp.zeros((classes,), jnp.float32),
    }
    return params


def cnn_apply(params, x):
    # x: (B, 28, 28, 1), NHWC
    for i in range(4):
        w = params[f"conv{i}"]["w"]
        x = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + params[f"conv{i}"]["b"])
        if i % 2 == 1:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = x.reshape(x.shape[0], -1)
    return x @ params["dense"]["w"] + params["dense"]["b"]


def cnn_loss(params, batch):
    x, y = batch
    return xent(cnn_apply(params, x), y)


def synthetic_batch(key, batch_size, in_shape, classes=10):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch_size, *in_shape), jnp.float32)
    y = jax.random.randint(ky, (batch_size,), 0, classes)
    return x, y


# ----------------------------------------------------------------------------- steps


def make_forward(loss_fn):
    return jax.jit(loss_fn)


def make_backprop_step(loss_fn, lr):
    tx = optax.sgd(lr)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jax.jit(step, donate_argnums=(0, 1))


def make_fg_step(loss_fn, lr, tangent, num_tangents, key=0):
    tx = fgrad_jax.fgd(lr, key=key, num_tangents=num_tangents, tangent=tangent)

    def step(params, opt_state, batch):
        updates, opt_state = tx.update(
            None, opt_state, params, value_fn=lambda p: loss_fn(p, batch)
        )
        return optax.apply_updates(params, updates), opt_state, opt_state[0].value

    return tx, jax.jit(step, donate_argnums=(0, 1))


def memory_of(jitted, *args) -> dict[str, int] | None:
    return compiled_memory(jitted.lower(*args).compile())


def compiled_memory(compiled) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled program (bytes), or None where unavailable."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backend without memory analysis
        return None
    if ma is None:
        return None
    out = {}
    for name in (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    ):
        if hasattr(ma, name):
            out[name.replace("_size_in_bytes", "_bytes")] = int(getattr(ma, name))
    return out


def _copy(tree):
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


class _Runner:
    """A stateful step: keeps its own params/opt-state copy, threads donated buffers."""

    def __init__(self, name, step, tx, params, batch):
        self.name = name
        self.step = step
        self.params = _copy(params)
        self.state = tx.init(self.params)
        self.batch = batch

    def __call__(self):
        self.params, self.state, loss = self.step(self.params, self.state, self.batch)
        jax.block_until_ready((self.params, loss))


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int, seed: int = 0):
    """Times every callable once per round, in a fresh random order each round.

    A random order, not a rotation: with a rotation every callable always follows the same
    neighbour, and one neighbour slowed its successor in every round: the low-rank step
    measured 0.56x backprop when it came first and 0.88x when it followed the orthogonal
    tangent's step (same process; probably LAPACK threads of its QR still spinning).
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        order = rng.sample(names, len(names))
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def measure_ratios(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    tangent: Any = "rademacher",
    num_tangents: int = 1,
    variants: Sequence[tuple[Any, int]] | None = None,
    lr: float = 1e-4,
    reps: int = 15,
    warmup: int = 2,
    memory: bool = True,
    extra: dict[str, Callable[[], None]] | None = None,
) -> dict[str, Any]:
    """Times f, a backprop SGD step and forward-gradient SGD steps, interleaved; medians.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params, batch: Inputs (params are copied, the caller's are not donated).
        tangent, num_tangents: The forward-gradient variant, unless ``variants`` is given.
        variants: A list of ``(tangent, num_tangents)`` pairs, all timed in the same rounds.
        lr: SGD learning rate of both steps.
        reps, warmup: Timed rounds and untimed warm-up rounds.
        memory: Also report XLA's compiled memory analysis of each step.
        extra: More zero-argument callables to time in the same rounds (e.g. a PyTorch
            peer); each must block until its work is done.

    Returns:
        ``{"t_forward_s", "t_backprop_s", "R_b", "R_f", "fg_over_bp", "paired_ratio",
        "variants": [{"tangent", "num_tangents", "t_step_s", "R_f", "fg_over_bp",
        "paired_ratio", "paired_over_k1" (K > 1, when the same tangent with K = 1 is
        measured), "memory"}...], "memory": {...}, "extra": {...}}``; the top-level
        ``R_f``/``fg_over_bp``/``paired_ratio`` are those of the first variant.
    """
    if variants is None:
        variants = [(tangent, num_tangents)]
    fwd = make_forward(loss_fn)
    fns: dict[str, Callable[[], None]] = {}
    fns["forward"] = lambda: jax.block_until_ready(fwd(params, batch))
    bp_tx, bp_step = make_backprop_step(loss_fn, lr)
    bp = _Runner("backprop", bp_step, bp_tx, params, batch)
    fns["backprop"] = bp
    fg_runners = []
    for i, (tan, k) in enumerate(variants):
        tx, st = make_fg_step(loss_fn, lr, tan, k)
        r = _Runner(f"fg{i}", st, tx, params, batch)
        fg_runners.append((tan, k, r))
        fns[f"fg{i}"] = r
    for name, f in (extra or {}).items():
        fns[f"extra:{name}"] = f
    mem = {}
    if memory:
        mem["forward"] = memory_of(fwd, params, batch)
        mem["backprop"] = memory_of(bp.step, bp.params, bp.state, batch)
    times = time_interleaved(fns, reps, warmup)
    med = {n: statistics.median(t) for n, t in times.items()}
    t_f, t_b = med["forward"], med["backprop"]
    out: dict[str, Any] = {
        "t_forward_s": t_f,
        "t_backprop_s": t_b,
        "R_b": t_b / t_f,
        "reps": reps,
        "variants": [],
        "memory": mem,
        "extra": {},
    }
    for i, (tan, k, r) in enumerate(fg_runners):
        t = med[f"fg{i}"]
        paired = statistics.median(a / b for a, b in zip(times[f"fg{i}"], times["backprop"]))
        v = {
            "tangent": tan if isinstance(tan, str) else repr(tan),
            "num_tangents": k,
            "t_step_s": t,
            "R_f": t / t_f,
            "fg_over_bp": t / t_b,
            "paired_ratio": paired,
            "final_loss": float(r.state[0].value),
        }
        single = next(
            (j for j, (t1, k1, _) in enumerate(fg_runners) if k1 == 1 and t1 == tan), None
        )
        if k > 1 and single is not None:
            # Cost of K tangents relative to one, paired within each round (issue 4's
            # "K=4 step <= 2.5x the K=1 step").
            v["paired_over_k1"] = statistics.median(
                a / b for a, b in zip(times[f"fg{i}"], times[f"fg{single}"])
            )
        if memory:
            v["memory"] = memory_of(r.step, r.params, r.state, batch)
        out["variants"].append(v)
    for name in extra or {}:
        t = med[f"extra:{name}"]
        out["extra"][name] = {"t_s": t, "over_jax_backprop": t / t_b}
    first = out["variants"][0]
    out.update(R_f=first["R_f"], fg_over_bp=first["fg_over_bp"], paired_ratio=first["paired_ratio"])
    return out


def measure_sharded(
    loss_fn,
    params,
    batch,
    *,
    mesh_size: int,
    variants,
    lr: float = 1e-4,
    reps: int = 9,
    warmup: int = 2,
    fsdp: bool = False,
) -> dict[str, Any]:
    """Data parallel: batch sharded over a 1-D mesh of ``mesh_size`` devices, params replicated
    (or, with ``fsdp``, each leaf sharded over the same axis along its largest axis that the
    mesh divides; leaves with none stay replicated).

    Times the backprop step and each forward-gradient variant (interleaved, medians), counts
    the bytes of every collective in each compiled step (``_sharding.collective_bytes``) and
    reports XLA's memory analysis of each (per device).
    """
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from fgrad_jax._sharding import collective_bytes

    devices = jax.devices()
    if len(devices) < mesh_size:
        raise ValueError(f"--mesh {mesh_size} needs {mesh_size} devices; found {len(devices)}.")
    mesh = Mesh(np.array(devices[:mesh_size]), ("data",))

    def spec(x):
        if not fsdp:
            return P()
        axes = [a for a in np.argsort(x.shape)[::-1] if x.shape[a] % mesh_size == 0]
        return P(*["data" if a == (axes[0] if axes else -1) else None for a in range(x.ndim)])

    params = jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params
    )
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    fns: dict[str, Callable[[], None]] = {}
    tx, st = make_backprop_step(loss_fn, lr)
    fns["backprop"] = _Runner("backprop", st, tx, params, batch)
    out: dict[str, Any] = {
        "mesh_size": mesh_size,
        "fsdp": fsdp,
        "param_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)),
        "variants": [],
    }
    compiled = st.lower(params, tx.init(params), batch).compile()
    out["backprop_collective_bytes"] = collective_bytes(compiled.as_text())
    out["backprop_memory"] = compiled_memory(compiled)
    for i, (tan, k) in enumerate(variants):
        tx, st = make_fg_step(loss_fn, lr, tan, k)
        fns[f"fg{i}"] = _Runner(f"fg{i}", st, tx, params, batch)
        compiled = st.lower(params, tx.init(params), batch).compile()
        out["variants"].append(
            {
                "tangent": tan if isinstance(tan, str) else repr(tan),
                "num_tangents": k,
                "collective_bytes": collective_bytes(compiled.as_text()),
                "memory": compiled_memory(compiled),
            }
        )
    times = time_interleaved(fns, reps, warmup)
    out["t_backprop_s"] = statistics.median(times["backprop"])
    for i, v in enumerate(out["variants"]):
        v["t_step_s"] = statistics.median(times[f"fg{i}"])
        v["paired_ratio"] = statistics.median(
            a / b for a, b in zip(times[f"fg{i}"], times["backprop"])
        )
    return out


# ----------------------------------------------------------------------------- torch peer


def torch_peer(sizes: Sequence[int], batch_size: int, lr: float = 1e-4, seed: int = 0):
    """The PyTorch peers' recipe (orobix/fwdgrad style): torch.func.jvp with Gaussian tangents.

    Returns ``{"torch_forward", "torch_backprop", "torch_fg_normal", "torch_fg_rademacher"}``
    zero-argument callables, or ``None`` when torch is not installed.
    """
    try:
        import torch
        from torch.func import functional_call, jvp
    except ImportError:
        return None
    torch.manual_seed(seed)
    layers = []
    for m, n in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(m, n), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    x = torch.randn(batch_size, sizes[0])
    y = torch.randint(0, sizes[-1], (batch_size,))
    lossf = torch.nn.functional.cross_entropy
    params = {k: v.detach() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def forward():
        with torch.no_grad():
            lossf(model(x), y).item()

    def backprop():
        opt.zero_grad(set_to_none=True)
        loss = lossf(model(x), y)
        loss.backward()
        opt.step()
        loss.item()

    def f(p):
        return lossf(functional_call(model, p, (x,)), y)

    def fg(kind):
        def step():
            with torch.no_grad():
                if kind == "normal":
                    v = {k: torch.randn_like(p) for k, p in params.items()}
                else:
                    v = {
                        k: torch.randint(0, 2, p.shape).to(p.dtype) * 2 - 1
                        for k, p in params.items()
                    }
                loss, d = jvp(f, (params,), (v,))
                for k, p in params.items():
                    p.sub_(lr * d * v[k])
                loss.item()

        return step

    return {
        "torch_forward": forward,
        "torch_backprop": backprop,
        "torch_fg_normal": fg("normal"),
        "torch_fg_rademacher": fg("rademacher"),
    }


# ----------------------------------------------------------------------------- presets


def environment() -> dict[str, Any]:
    env = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    env["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import subprocess

        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        pass
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return env


ALL_TANGENTS = ("rademacher", "normal", "sphere", "orthogonal", "lowrank")


class ThreefryNormal:
    """A user tangent callable drawing ``jax.random.normal`` per leaf: the naive baseline
    (the estimator's generic path, the same work as the original implementation)."""

    def __call__(self, key, tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(
            treedef, [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
        )

    def __repr__(self):
        return "threefry_normal"


THREEFRY_NORMAL = ThreefryNormal()


def _tangents_available(names):
    return [t for t in names if t in fgrad_jax.TANGENT_NAMES]


def run_config(
    name,
    *,
    model,
    batch_size,
    variants,
    reps,
    warmup,
    torch_sizes=None,
    memory=True,
    width=1024,
    depth=2,
):
    key = jax.random.key(0)
    kp, kb = jax.random.split(key)
    if model == "mlp":
        sizes = [784] + [width] * depth + [10]
        params = init_mlp(kp, sizes)
        batch = synthetic_batch(kb, batch_size, (784,))
        loss = mlp_loss
    elif model == "cnn":
        sizes = None
        params = init_cnn(kp)
        batch = synthetic_batch(kb, batch_size, (28, 28, 1))
        loss = cnn_loss
    else:
        raise ValueError(model)
    extra = None
    if torch_sizes is not None:
        extra = torch_peer(sizes, batch_size)
    res = measure_ratios(
        loss, params, batch, variants=variants, reps=reps, warmup=warmup, memory=memory, extra=extra
    )
    res.update(
        name=name,
        model=model,
        batch_size=batch_size,
        width=width,
        depth=depth,
        num_params=int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
    )
    if extra:
        tf = res["extra"]["torch_forward"]["t_s"]
        tb = res["extra"]["torch_backprop"]["t_s"]
        res["torch"] = {
            "R_b": tb / tf,
            **{
                k: {
                    "R_f": res["extra"][k]["t_s"] / tf,
                    "fg_over_bp": res["extra"][k]["t_s"] / tb,
                    "t_s": res["extra"][k]["t_s"],
                }
                for k in ("torch_fg_normal", "torch_fg_rademacher")
            },
        }
    return res


def configs(preset: str):
    tans = _tangents_available(ALL_TANGENTS)
    every = [(t, 1) for t in tans] + [(THREEFRY_NORMAL, 1)]
    ks = [
        (t, k) for t in _tangents_available(("rademacher", "normal", "lowrank")) for k in (2, 4, 8)
    ]
    quick = preset == "quick"
    reps = 7 if quick else 15
    out = [
        dict(
            name="mlp_b64", model="mlp", batch_size=64, variants=every + ks, reps=reps, torch=True
        ),
        dict(
            name="mlp_b1024",
            model="mlp",
            batch_size=1024,
            variants=every + ([] if quick else ks),
            reps=reps,
            torch=True,
        ),
    ]
    if quick:
        return out
    out.append(
        dict(
            name="mlp_w4096_b64",
            model="mlp",
            batch_size=64,
            width=4096,
            variants=every,
            reps=9,
            torch=True,
        )
    )
    out.append(dict(name="cnn_b64", model="cnn", batch_size=64, variants=every, reps=9))
    for depth in (2, 4, 8, 16, 32, 64):
        out.append(
            dict(
                name=f"depth{depth}_b64",
                model="mlp",
                batch_size=64,
                depth=depth,
                variants=[(t, 1) for t in _tangents_available(("rademacher", "normal", "lowrank"))],
                reps=7,
            )
        )
    return out


def memory_sweep(depths=(2, 4, 8, 16, 32), width=1024, batch_size=1024, tangents=None):
    """XLA temp bytes of each step vs depth (compile only, nothing is run)."""
    tangents = tangents or _tangents_available(("rademacher", "normal", "lowrank"))
    rows = []
    for depth in depths:
        kp, kb = jax.random.split(jax.random.key(0))
        sizes = [784] + [width] * depth + [10]
        params = init_mlp(kp, sizes)
        batch = synthetic_batch(kb, batch_size, (784,))
        row = {
            "depth": depth,
            "width": width,
            "batch_size": batch_size,
            "param_bytes": int(sum(p.nbytes for p in jax.tree_util.tree_leaves(params))),
        }
        tx, st = make_backprop_step(mlp_loss, 1e-4)
        row["backprop"] = memory_of(st, params, tx.init(params), batch)
        for t in tangents:
            tx, st = make_fg_step(mlp_loss, 1e-4, t, 1)
            row[t] = memory_of(st, params, tx.init(params), batch)
            row[f"{t}_temp_over_backprop"] = row[t]["temp_bytes"] / row["backprop"]["temp_bytes"]
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", choices=("quick", "full"), default="quick")
    ap.add_argument("--only", nargs="*", help="config names to run (default: all of the preset)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.func peer")
    ap.add_argument("--no-memory-sweep", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default="runtime.json")
    ap.add_argument(
        "--mesh",
        type=int,
        default=None,
        help="also run the MLP steps data-parallel on a 1-D mesh of N devices (on a CPU host "
        "N host devices are requested automatically) and count their collective bytes",
    )
    ap.add_argument(
        "--fsdp",
        action="store_true",
        help="with --mesh: shard the parameters FSDP-style (largest axis over the mesh)",
    )
    args = ap.parse_args(argv)
    results = {"environment": environment(), "preset": args.preset, "configs": []}
    if args.mesh:
        results["mesh"] = []
        for bsz in (64, 1024):
            kp, kb = jax.random.split(jax.random.key(0))
            params = init_mlp(kp, [784, 1024, 1024, 10])
            batch = synthetic_batch(kb, bsz, (784,))
            res = measure_sharded(
                mlp_loss,
                params,
                batch,
                mesh_size=args.mesh,
                reps=args.reps or 9,
                fsdp=args.fsdp,
                variants=[(t, 1) for t in _tangents_available(("rademacher", "normal", "lowrank"))]
                + [("rademacher", 4), ("normal", 4)],
            )
            res["batch_size"] = bsz
            results["mesh"].append(res)
            print(
                f"== mesh {args.mesh}, B={bsz}: backprop {res['t_backprop_s'] * 1e3:.2f} ms, "
                f"collectives {res['backprop_collective_bytes']} (params {res['param_bytes']} B)",
                flush=True,
            )
            for v in res["variants"]:
                print(
                    f"   {v['tangent']:>11} K={v['num_tangents']}: {v['t_step_s'] * 1e3:.2f} ms "
                    f"(paired {v['paired_ratio']:.2f}), collectives {v['collective_bytes']}",
                    flush=True,
                )
    for cfg in configs(args.preset):
        if args.only and cfg["name"] not in args.only:
            continue
        cfg = dict(cfg)
        use_torch = cfg.pop("torch", False) and not args.no_torch
        if args.reps:
            cfg["reps"] = args.reps
        t0 = time.perf_counter()
        res = run_config(cfg.pop("name"), torch_sizes=True if use_torch else None, warmup=2, **cfg)
        res["wall_s"] = time.perf_counter() - t0
        results["configs"].append(res)
        print(format_result(res), flush=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    if not args.no_memory_sweep and (not args.only or "memory" in args.only):
        depths = (2, 4, 8, 16, 32) if args.preset == "full" else (2, 8, 32)
        results["memory_sweep"] = memory_sweep(depths)
        for row in results["memory_sweep"]:
            print(
                "memory depth",
                row["depth"],
                "backprop temp MB",
                round(row["backprop"]["temp_bytes"] / 2**20, 1),
                {
                    t: round(row[t]["temp_bytes"] / 2**20, 1)
                    for t in row
                    if isinstance(row[t], dict) and t != "backprop"
                },
                flush=True,
            )
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    return results


def format_result(res) -> str:
    lines = [
        f"== {res['name']}: t_fwd {res['t_forward_s'] * 1e3:.2f} ms, backprop {res['t_backprop_s'] * 1e3:.2f} ms, R_b {res['R_b']:.2f}"
    ]
    for v in res["variants"]:
        mem = v.get("memory") or {}
        lines.append(
            f"   {v['tangent']:>11} K={v['num_tangents']}: {v['t_step_s'] * 1e3:8.2f} ms  R_f {v['R_f']:.2f}  "
            f"fg/bp {v['fg_over_bp']:.2f} (paired {v['paired_ratio']:.2f})  temp {mem.get('temp_bytes', 0) / 2**20:.1f} MB"
            + (f"  /K=1 {v['paired_over_k1']:.2f}" if "paired_over_k1" in v else "")
        )
    if "torch" in res:
        t = res["torch"]
        lines.append(
            f"   torch: R_b {t['R_b']:.2f}; fg normal {t['torch_fg_normal']['t_s'] * 1e3:.2f} ms (fg/bp {t['torch_fg_normal']['fg_over_bp']:.2f}); "
            f"fg rademacher {t['torch_fg_rademacher']['t_s'] * 1e3:.2f} ms"
        )
    bm = (res.get("memory") or {}).get("backprop") or {}
    lines.append(f"   backprop temp {bm.get('temp_bytes', 0) / 2**20:.1f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

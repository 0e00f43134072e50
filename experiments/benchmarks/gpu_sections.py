"""The measurements of ``gpu_check.py``: one function per section, each run in its own process.

Every section function takes ``(smoke, deadline, spec, emit)``: ``smoke`` picks tiny sizes,
``deadline`` (``time.time()`` seconds) is when it should stop taking more timing rounds,
``spec`` its parameters from the orchestrator, and ``emit(result)`` stores the partial result
so that a section killed at its time limit still reports what it measured. Each returns its
result dict.
"""

from __future__ import annotations

import re
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.benchmarks.gpu_report import TANGENTS, _gib
from experiments.benchmarks.transformer import Config as TransformerConfig
from experiments.benchmarks.transformer import run as run_transformer
from experiments.toolkit import (
    Block,
    Runner,
    compiled_memory,
    environment,
    mlp_loss,
    mlp_problem,
    paired_ratio,
    time_interleaved,
)
from experiments.toolkit.ratios import memory_stats, sgd_step

LR = 1e-4


def device_info() -> dict:
    d = jax.devices()[0]
    info = {"device_kind": d.device_kind, "platform": d.platform, "jax": jax.__version__}
    info["bytes_limit"] = memory_stats().get("bytes_limit")
    return info


def make_step(loss_fn, kind, num_tangents=1, lr=LR):
    """``(tx, step)`` of backprop's (``kind="backprop"``) or the forward gradient's SGD step
    with tangent ``kind``, not jitted (the toolkit's steps, as every experiment times them)."""
    return sgd_step(loss_fn, lr, None if kind == "backprop" else kind, num_tangents)


def first_tangent(sampler, key, params):
    """The first tangent that a library ``sampler(key, leaves, K)`` draws for ``params``."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([t[0] for t in sampler(key, leaves, 1)])


def compile_program(loss_fn, kind, params, batch, num_tangents=1, lr=LR):
    """``(compiled, optimiser state)``, compiled, not run: the forward pass (``kind="forward"``,
    state ``None``) or the :func:`make_step` step of ``kind``, donated."""
    if kind == "forward":
        return jax.jit(loss_fn).lower(params, batch).compile(), None
    tx, step = make_step(loss_fn, kind, num_tangents, lr)
    state = tx.init(params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile(), state


def in_loop(step, n):
    """``n`` steps inside one compiled ``fori_loop`` on the same batch."""

    def run(params, state, batch):
        body = lambda _, c: step(c[0], c[1], batch)
        return jax.lax.fori_loop(0, n, body, (params, state, jnp.zeros((), jnp.float32)))

    return run


def forward_in_loop(loss_fn, n):
    """``n`` forward passes in one ``fori_loop``; each reads the last loss, so that XLA cannot
    hoist the (otherwise loop-invariant) pass out of the loop."""

    def run(params, batch):
        x, y = batch
        body = lambda _, loss: loss_fn(params, (x + 1e-30 * loss, y))
        return jax.lax.fori_loop(0, n, body, jnp.zeros((), jnp.float32))

    return run


def timed_rounds(fns, reps, warmup, deadline, chunk=5):
    """``runtime.time_interleaved`` in chunks of rounds until ``reps`` or the deadline."""
    times = {n: [] for n in fns}
    done = 0
    while done < reps and (done == 0 or time.time() < deadline):
        r = min(chunk, reps - done)
        chunk_times = time_interleaved(fns, r, warmup if done == 0 else 0, seed=done)
        for n, ts in chunk_times.items():
            times[n] += ts
        done += r
    return times, {"reps_requested": reps, "reps_done": done, "cut": done < reps}


def timing_row(times, names, base, per_call=1):
    """Median ms per step of each program and its paired ratio to ``base``."""
    row = {}
    for label, name in names.items():
        row[label] = {"ms": 1e3 * statistics.median(times[name]) / per_call}
        if name != base:
            row[label]["over_backprop"] = paired_ratio(times[name], times[base])
    return row


def mlp_case(sizes, batch_size, modes, loop_steps, reps, warmup, deadline, pipeline_steps=10):
    params, batch = mlp_problem(sizes, batch_size)
    fns = {}
    for kind in ("backprop", *TANGENTS):
        tx, step = make_step(mlp_loss, kind)
        if "dispatched" in modes:
            for donate in (True, False):
                fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
                fns[f"{kind}/dispatched/{donate}"] = Runner(tx, fn, params, batch)
                if "pipelined" in modes:
                    fns[f"{kind}/pipelined/{donate}"] = Runner(
                        tx, fn, params, batch, pipeline_steps
                    )
        loop = jax.jit(in_loop(step, loop_steps), donate_argnums=(0, 1))
        fns[f"{kind}/loop/True"] = Runner(tx, loop, params, batch)
    if "dispatched" in modes:
        fwd = jax.jit(mlp_loss)
        fns["forward/dispatched"] = lambda: jax.block_until_ready(fwd(params, batch))
        if "pipelined" in modes:
            fns["forward/pipelined"] = lambda: jax.block_until_ready(
                [fwd(params, batch) for _ in range(pipeline_steps)]
            )
    floop = jax.jit(forward_in_loop(mlp_loss, loop_steps))
    fns["forward/loop"] = lambda: jax.block_until_ready(floop(params, batch))
    t0 = time.perf_counter()
    times, reps_info = timed_rounds(fns, reps, warmup, deadline)
    rows = []
    per_call = {"dispatched": 1, "pipelined": pipeline_steps, "loop": loop_steps}
    for mode, donate in [(m, d) for m in per_call if m in modes for d in (True, False)]:
        if mode == "loop" and not donate:
            continue
        names = {"forward": f"forward/{mode}"}
        names |= {k: f"{k}/{mode}/{donate}" for k in ("backprop", *TANGENTS)}
        row = timing_row(times, names, f"backprop/{mode}/{donate}", per_call[mode])
        info = {"batch_size": batch_size, "mode": mode, "donated": donate}
        rows.append(info | {"steps_per_call": per_call[mode]} | row)
    return {"rows": rows, "wall_s": time.perf_counter() - t0, **reps_info}


def section_mlp(smoke, deadline, spec, emit):
    """Paper MLP, SGD step, dispatched or pipelined (donated or not) and in a compiled loop."""
    sizes = [784, 32, 32, 10] if smoke else [784, 1024, 1024, 10]
    loop_steps, reps = (5, 3) if smoke else (100, 30)
    out = {"sizes": sizes, "loop_steps": loop_steps, "lr": LR, "tangents": TANGENTS, "cases": []}
    out["environment"] = environment()
    for batch_size in (8,) if smoke else (64, 1024):
        modes = ("dispatched", "pipelined", "loop")
        case = mlp_case(sizes, batch_size, modes, loop_steps, reps, 2, deadline)
        out["cases"].append(case)
        emit(out)
        print(f"  mlp B={batch_size}: {_brief(case['rows'])}", flush=True)
    return out


def section_wide(smoke, deadline, spec, emit):
    """W=4096, depth 4, B=8192 MLP, in a compiled loop."""
    width, depth, batch_size = (64, 2, 64) if smoke else (4096, 4, 8192)
    loop_steps, reps = (2, 2) if smoke else (10, 5)
    sizes = [784] + [width] * depth + [10]
    case = mlp_case(sizes, batch_size, ("loop",), loop_steps, reps, 1, deadline)
    print(f"  wide: {_brief(case['rows'])}", flush=True)
    return {"sizes": sizes, "loop_steps": loop_steps, "lr": LR, "cases": [case]}


def _brief(rows):
    return "; ".join(
        f"{r['mode']}{'' if r['donated'] else ' (not donated)'} "
        + " ".join(f"{t} {r[t]['over_backprop']:.2f}x" for t in TANGENTS)
        for r in rows
    )


def section_depth_memory(smoke, deadline, spec, emit):
    """XLA temp bytes (and compile seconds) of the donated steps at depth 32 and 2."""
    width, batch_size = (32, 16) if smoke else (1024, 1024)
    out = {"width": width, "batch_size": batch_size, "donated": True, "depths": []}
    for depth in (4, 2) if smoke else (32, 2):
        params, batch = mlp_problem([784] + [width] * depth + [10], batch_size)
        row = {"depth": depth}
        out["depths"].append(row)
        for kind in ("forward", "backprop", *TANGENTS):
            if time.time() > deadline:
                row["cut"] = True
                break
            t0 = time.perf_counter()
            compiled, _ = compile_program(mlp_loss, kind, params, batch)
            mem = compiled_memory(compiled) or {}
            row[kind] = {"temp_bytes": mem.get("temp_bytes"), "compile_s": time.perf_counter() - t0}
            bp = row.get("backprop", {}).get("temp_bytes")
            if kind in TANGENTS and bp and mem.get("temp_bytes") is not None:
                row[kind]["over_backprop"] = mem["temp_bytes"] / bp
            emit(out)
        print(f"  depth {depth}: {row}", flush=True)
    return out


def section_transformer(smoke, deadline, spec, emit):
    """bench_transformer's 6-block nnx transformer: gradient time and compile time."""
    cfg = TransformerConfig(rounds=15, tangents=TANGENTS)
    if smoke:
        cfg = TransformerConfig(
            depth=1, width=16, heads=2, seq_len=8, batch=4, rounds=3, tangents=("rademacher",)
        )
    res = run_transformer(cfg)
    for name, row in res["rows"].items():
        print(
            f"  {name:15s} {row['median_ms']:8.2f} ms  /backprop {row['per_backprop']:5.2f}  "
            f"compile {row['compile_s']:5.1f} s",
            flush=True,
        )
    return res


@dataclass
class GPTConfig:
    vocab: int = 50257
    width: int = 768
    depth: int = 12
    heads: int = 12
    seq_len: int = 1024
    batch: int = 8


class GPT(nnx.Module):
    """A GPT-2-style causal language model: token and position embeddings, pre-LN blocks,
    output projection tied to the token embedding."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab, cfg.width, rngs=rngs)
        self.pos = nnx.Embed(cfg.seq_len, cfg.width, rngs=rngs)
        self.blocks = nnx.List([Block(cfg.width, cfg.heads, rngs) for _ in range(cfg.depth)])
        self.ln_f = nnx.LayerNorm(cfg.width, rngs=rngs)

    def __call__(self, tokens):
        t = tokens.shape[-1]
        x = self.embed(tokens) + self.pos(jnp.arange(t))
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.ln_f(x))


def _oom_bytes(message: str):
    m = re.search(r"allocate (\d+) bytes", message) or re.search(r"(\d+) bytes", message)
    return int(m.group(1)) if m else None


def _compile_gpt(cfg, spec, graphdef, params, out):
    tokens = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.seq_len + 1), 0, cfg.vocab)
    batch = (tokens[:, :-1], tokens[:, 1:])

    def loss_fn(p, b):
        logits = nnx.merge(graphdef, p)(b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    t0 = time.perf_counter()
    kind = spec["tangent"] if spec["program"] == "fg" else spec["program"]
    k, lr = spec.get("num_tangents", 1), spec.get("lr", 1e-5)
    compiled, state = compile_program(loss_fn, kind, params, batch, k, lr)
    out.update(batch=cfg.batch, donated=state is not None, compile_s=time.perf_counter() - t0)
    out["memory"] = compiled_memory(compiled)
    out["xla_needs_bytes"] = (out["memory"] or {}).get("total_bytes")
    return compiled, state, batch


def gpt_measure(smoke, deadline, spec, emit):
    """One program on a GPT, in a fresh process so that the peak memory is its own.

    ``spec``: ``config`` (GPTConfig fields), ``program`` (``forward``, ``backprop`` or ``fg``),
    ``tangent``, ``num_tangents``, ``steps`` (calls; the first loss is at the initial
    parameters), and optionally ``oom_target`` with ``bytes_per_sample``: the batch is then
    set to about ``oom_target`` times the device's ``bytes_limit`` over ``bytes_per_sample``
    and, with ``grow`` (backprop), raised until XLA's compiled memory analysis needs more than
    ``0.7 * oom_target * bytes_limit``.
    """
    cfg = GPTConfig(**spec["config"])
    out = {k: spec.get(k) for k in ("program", "tangent", "num_tangents")}
    out["env"] = device_info()
    limit, target = out["env"]["bytes_limit"], spec.get("oom_target")
    if target and limit:
        cfg.batch = max(8, 8 * round(target * limit / spec["bytes_per_sample"] / 8))
    model = GPT(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    out["num_params"] = int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
    out["config"] = asdict(cfg)
    try:
        compiled, state, batch = _compile_gpt(cfg, spec, graphdef, params, out)
        needs = out["xla_needs_bytes"]
        if spec.get("grow") and target and limit and needs < 0.7 * target * limit:
            cfg.batch = max(cfg.batch + 8, 8 * round(cfg.batch * target * limit / needs / 8))
            out["config"] = asdict(cfg)
            print(f"  raising the batch to {cfg.batch} to exceed the memory", flush=True)
            compiled, state, batch = _compile_gpt(cfg, spec, graphdef, params, out)
        stats = memory_stats()
        out["peak_after_compile_bytes"] = stats.get("peak_bytes_in_use")
        out["in_use_before_run_bytes"] = stats.get("bytes_in_use")
        emit(out)
        losses, t0 = [], None
        for i in range(spec.get("steps", 2)):
            if i == 1:
                t0 = time.perf_counter()
            if state is None:
                loss = compiled(params, batch)
            else:
                params, state, loss = compiled(params, state, batch)
            losses.append(float(loss))
        if t0 is not None:
            out["ms_per_step"] = 1e3 * (time.perf_counter() - t0) / (len(losses) - 1)
        out.update(losses=losses, outcome="ran")
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        exhausted = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
        out["outcome"] = "RESOURCE_EXHAUSTED" if exhausted else "error"
        out["error"] = msg[:2000] if exhausted else traceback.format_exc()[-4000:]
        out["oom_request_bytes"] = _oom_bytes(msg) if exhausted else None
    stats = memory_stats()
    out |= {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_limit")}
    print(
        f"  gpt {out['program']} {out['tangent'] or ''} K={out['num_tangents'] or '-'} "
        f"B={cfg.batch}: {out['outcome']}, "
        f"peak {_gib(out['peak_bytes_in_use'])}, XLA needs {_gib(out.get('xla_needs_bytes'))}",
        flush=True,
    )
    return out


SECTIONS = {
    "mlp": section_mlp,
    "wide": section_wide,
    "depth_memory": section_depth_memory,
    "transformer": section_transformer,
    "gpt": gpt_measure,
}

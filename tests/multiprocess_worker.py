"""One process of tests/test_multiprocess.py: data-parallel training on 4 CPU devices.

``python multiprocess_worker.py single OUT``: one process with 4 host devices.
``python multiprocess_worker.py multi OUT PORT ID``: process ID of 2, each with 2 host
devices, joined by ``jax.distributed`` over 127.0.0.1:PORT (gloo collectives).

Both train the same MLP from the same seed for 5 steps (global batch 16 sharded over the
4 devices, parameters replicated; and parameters FSDP-sharded, constrained inside the
loss) with weight- and activity-perturbed ``forward_gradient`` and with an
``nnx.Optimizer``, and write the final parameters and each step's collective bytes to
``OUT/<mode>_<id>.npz``. In multi mode the worker also checks that a key differing
between the processes is refused.
"""

import os
import sys

MODE, OUT = sys.argv[1], sys.argv[2]
DEVICES = 4 if MODE == "single" else 2
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
)

import jax  # noqa: E402

if MODE == "multi":
    PORT, PID = int(sys.argv[3]), int(sys.argv[4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{PORT}", num_processes=2, process_id=PID, initialization_timeout=60
    )
else:
    PID = 0

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fgrad_jax  # noqa: E402

assert jax.device_count() == 4, jax.devices()
MESH = Mesh(np.array(jax.devices()), ("data",))
REPLICATED, BY_ROW = NamedSharding(MESH, P()), NamedSharding(MESH, P("data"))


def global_array(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def local_copy(array):
    """The full value of a (replicated or sharded) global array, on this process."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


rng = np.random.default_rng(0)
PARAMS = {
    "w1": rng.normal(size=(8, 16)).astype(np.float32) / np.sqrt(8),
    "b1": np.zeros(16, np.float32),
    "w2": rng.normal(size=(16, 4)).astype(np.float32) / 4,
}
X = rng.normal(size=(16, 8)).astype(np.float32)
Y = (np.arange(16) % 4).astype(np.int32)
FSDP = {"w1": P(None, "data"), "b1": P("data"), "w2": P("data", None)}


def per_example(p, x, y):
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def fsdp_per_example(p, x, y):
    p = jax.lax.with_sharding_constraint(p, {k: NamedSharding(MESH, s) for k, s in FSDP.items()})
    return per_example(p, x, y)


results = {}
x, y = global_array(X, BY_ROW), global_array(Y, BY_ROW)
runs = {
    "weights": (per_example, "weights", REPLICATED),
    "activations": (per_example, "activations", REPLICATED),
    "fsdp_weights": (fsdp_per_example, "weights", None),
    "fsdp_activations": (fsdp_per_example, "activations", None),
}
for name, (loss, perturb, sharding) in runs.items():
    params = {
        k: global_array(v, sharding or NamedSharding(MESH, FSDP[k])) for k, v in PARAMS.items()
    }
    tx = optax.chain(
        fgrad_jax.forward_gradient(key=0, num_tangents=4, perturb=perturb), optax.sgd(0.1)
    )
    state = tx.init(params)
    scalar = loss if perturb == "activations" else (lambda p, x, y, f=loss: f(p, x, y).mean())

    @jax.jit
    def step(params, state, x, y, scalar=scalar, tx=tx):
        updates, state = tx.update(None, state, params, value_fn=lambda p: scalar(p, x, y))
        return optax.apply_updates(params, updates), state

    counted = fgrad_jax.diagnostics.collective_bytes(step, params, state, x, y)
    results[f"{name}/bytes"] = np.int64(sum(counted.values()))
    for _ in range(5):
        params, state = step(params, state, x, y)
    for k, v in params.items():
        results[f"{name}/{k}"] = local_copy(v)
        if sharding is REPLICATED:  # this process's own copy, not a gathered one
            results[f"{name}/{k}/own"] = np.asarray(v.addressable_data(0))


# Backprop's bytes, for comparison.
@jax.jit
def backprop(params, x, y):
    g = jax.grad(lambda p: per_example(p, x, y).mean())(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, g)


replicated = {k: global_array(v, REPLICATED) for k, v in PARAMS.items()}
results["backprop/bytes"] = np.int64(
    sum(fgrad_jax.diagnostics.collective_bytes(backprop, replicated, x, y).values())
)


# The nnx path: nnx.Optimizer with the forward-gradient transformation, replicated model.
class MLP(nnx.Module):
    def __init__(self):
        self.w1 = nnx.Param(jnp.asarray(PARAMS["w1"]))
        self.b1 = nnx.Param(jnp.asarray(PARAMS["b1"]))
        self.w2 = nnx.Param(jnp.asarray(PARAMS["w2"]))

    def __call__(self, x):
        return jnp.tanh(x @ self.w1 + self.b1) @ self.w2


model = MLP()
graphdef, state = nnx.split(model)
state = jax.tree.map(lambda a: global_array(a, REPLICATED), state)
model = nnx.merge(graphdef, state)
opt = nnx.Optimizer(
    model, optax.chain(fgrad_jax.forward_gradient(key=0, num_tangents=4), optax.sgd(0.1)),
    wrt=nnx.Param,
)  # fmt: skip


@nnx.jit
def nnx_step(model, opt, x, y):
    def loss(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    opt.update(model, None, value_fn=fgrad_jax.nnx_value_fn(loss, model, x, y))


for _ in range(5):
    nnx_step(model, opt, x, y)
for k in PARAMS:
    results[f"nnx/{k}"] = np.asarray(getattr(model, k).get_value().addressable_data(0))

if MODE == "multi":
    try:
        fgrad_jax.forward_gradient(key=jax.process_index())
    except ValueError as err:
        results["guard"] = np.str_(str(err))
    else:
        results["guard"] = np.str_("")

np.savez(os.path.join(OUT, f"{MODE}_{PID}.npz"), **results)
if MODE == "multi":
    jax.distributed.shutdown()

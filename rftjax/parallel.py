"""Device meshes and declared sharding rules, on JAX's own SPMD machinery.

A mesh has three named axes, always all three (unused ones have size 1):

- ``data``: data parallelism. Parameters are replicated along it; batches are split.
- ``fsdp``: fully sharded data parallelism. Batches are split along it too (``data`` and
  ``fsdp`` together are the batch axes), and every weight matrix is sharded along its larger
  free dimension, so each device holds 1/fsdp of the weights and optimizer moments.
- ``tensor``: Megatron-style tensor parallelism: q/k/v/gate/up projections split their output
  rows (attention heads, MLP hidden units), o/down projections their input columns, so that
  one all-reduce per block joins the partial sums.

Placement is declared, not coded: `PARTITION_RULES` map parameter names (the Hugging Face
names, e.g. ``model.layers.0.self_attn.q_proj.weight``, layout [out, in]) to the dimension the
tensor axis splits and whether fsdp may split another. Any pytree whose leaf paths end in such
names follows the rules (reference params, Adam moments, a stale copy of the weights); every
other leaf (step counters, keys, detector state) is replicated. Inside the compiled step the
state is constrained back to the same shardings, so the next step never recompiles.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fm import integrity

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class Rule(NamedTuple):
    """How a parameter is split: `tensor`, the dimension the tensor axis splits (None: not
    split by it); `fsdp`, whether the fsdp axis splits the largest remaining dimension."""

    tensor: int | None = None
    fsdp: bool = False


# First match wins; names are searched, so prefixes (params.policy., opt_state.mu.) do not matter.
PARTITION_RULES: tuple[tuple[str, Rule], ...] = (
    (r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", Rule(tensor=0, fsdp=True)),
    (r"\.(q_proj|k_proj|v_proj)\.bias$", Rule(tensor=0)),  # aligned with the split rows
    (r"\.(o_proj|down_proj)\.weight$", Rule(tensor=1, fsdp=True)),
    (r"(^|\.)(embed_tokens|lm_head)\.weight$", Rule(fsdp=True)),
    (r"norm\.weight$", Rule()),
)


def parse_mesh(spec: str, num_devices: int | None) -> dict[str, int]:
    """Parses ``data:2,fsdp:4[,tensor:2]`` into axis sizes (all of `AXES`, missing ones 1).

    An empty spec or ``auto`` puts every device on ``data``. One size may be ``-1``: it takes
    whatever the others leave. With `num_devices` None only the syntax is checked. Raises
    ValueError naming what is accepted.
    """
    accepted = f"accepted: comma-separated axis:size with axes {', '.join(AXES)}"
    sizes = dict.fromkeys(AXES, 1)
    if spec.strip() in ("", "auto"):
        sizes["data"] = num_devices or 1
        return sizes
    seen, fill = set(), None
    for part in spec.split(","):
        name, sep, size = part.strip().partition(":")
        if not sep or not name or not re.fullmatch(r"-?\d+", size.strip()):
            raise ValueError(f"--mesh={spec!r}: bad entry {part!r}; {accepted}, e.g. data:2,fsdp:4")
        if name not in AXES:
            raise ValueError(f"--mesh={spec!r}: unknown axis {name!r}; {accepted}")
        if name in seen:
            raise ValueError(f"--mesh={spec!r}: axis {name!r} given twice")
        seen.add(name)
        value = int(size)
        if value == -1 and fill is None:
            fill = name
        elif value < 1:
            raise ValueError(f"--mesh={spec!r}: size of {name!r} must be >= 1 (or one -1)")
        sizes[name] = max(value, 1)
    product = math.prod(sizes.values())
    if num_devices is None:
        return sizes
    if fill is not None:
        if num_devices % product:
            raise ValueError(
                f"--mesh={spec!r}: {num_devices} devices are not divisible by {product}"
            )
        sizes[fill] = num_devices // product
    elif product != num_devices:
        raise ValueError(
            f"--mesh={spec!r}: the axis sizes multiply to {product}, but {num_devices} devices "
            "are visible; the product must equal the device count"
        )
    return sizes


def make_mesh(spec: str = "", devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all visible, every process)."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    # Devices come in process order, so each process holds a contiguous block of batch rows.
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def leaf_name(path) -> str:
    """Dotted name of a pytree path (dict keys, attributes, indices; nnx's `.value` dropped)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def rule_for(name: str) -> Rule | None:
    for pattern, rule in PARTITION_RULES:
        if re.search(pattern, name):
            return rule
    return None


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of a leaf by the rules; an axis that does not divide its dimension is
    left out (that dimension is replicated along it)."""
    rule = rule_for(name)
    spec: list[Any] = [None] * len(shape)
    if rule is None or not shape:
        return PartitionSpec()
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    if rule.tensor is not None and t > 1 and shape[rule.tensor] % t == 0:
        spec[rule.tensor] = "tensor"
    if rule.fsdp and f > 1 and len(shape) >= 2:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % f == 0]
        if free:
            spec[max(free, key=lambda d: shape[d])] = "fsdp"
    return _spec(spec)


def _spec(entries: list) -> PartitionSpec:
    # Without trailing Nones: the form jit gives its outputs, so input and output shardings
    # compare equal and a second step finds the compiled program.
    while entries and entries[-1] is None:
        entries = entries[:-1]
    return PartitionSpec(*entries)


def state_shardings(tree, mesh: Mesh):
    """NamedShardings of every leaf of `tree` (arrays or tracers) by `PARTITION_RULES`."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, param_spec(leaf_name(p), np.shape(x), mesh)), tree
    )


def batch_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Rows split over the batch axes when they divide them; otherwise replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if not shape or n == 1 or shape[0] % n:
        return PartitionSpec()
    return PartitionSpec(BATCH_AXES)


def cache_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """KV cache keys/values [B, K, L, D]: rows on the batch axes, kv heads on tensor."""
    rows = batch_spec(shape, mesh)
    spec = [*rows, *([None] * (len(shape) - len(rows)))]
    if len(shape) == 4 and mesh.shape["tensor"] > 1 and shape[1] % mesh.shape["tensor"] == 0:
        spec[1] = "tensor"
    return _spec(spec)


def place_state(state, mesh: Mesh | None):
    """Puts a train state (or any tree of named parameters) on `mesh` by the rules."""
    if mesh is None:
        return state
    return jax.device_put(state, state_shardings(state, mesh))


def constrain_state(state, mesh: Mesh | None):
    """Inside jit: pins a state to the shardings it came in with (no recompile next step)."""
    if mesh is None:
        return state
    return jax.lax.with_sharding_constraint(state, state_shardings(state, mesh))


def constrain_cache(cache, mesh: Mesh | None):
    """Inside jit: KV cache rows on the batch axes, kv heads on tensor; the rest as is."""
    if mesh is None:
        return cache

    def one(x):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, cache_spec(x.shape, mesh)))

    return cache._replace(keys=tuple(map(one, cache.keys)), values=tuple(map(one, cache.values)))


def replicate(tree, mesh: Mesh | None):
    """Replicates small runtime arrays (knobs, fault parameters) on every device of `mesh`."""
    if mesh is None or tree is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def place_batch(tree, mesh: Mesh | None):
    """Puts a host batch (numpy, leading dim = rows) on `mesh`, rows over the batch axes.

    With several processes each one passes the *global* batch and keeps only its own rows:
    every process feeds its share, and the global array is assembled without a gather.
    """
    if mesh is None:
        return jax.device_put(tree)

    def one(x):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, batch_spec(x.shape, mesh))
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        with jax.transfer_guard("allow"):  # explicit, though not a device_put
            return jax.make_array_from_process_local_data(
                sharding, local_rows(x, sharding), x.shape
            )

    return jax.tree.map(one, tree)


def local_rows(x: np.ndarray, sharding: NamedSharding) -> np.ndarray:
    """The rows of a global host array that this process's devices hold."""
    index = sharding.addressable_devices_indices_map(x.shape)
    starts = [i[0].start or 0 for i in index.values()]
    stops = [x.shape[0] if i[0].stop is None else i[0].stop for i in index.values()]
    return x[min(starts) : max(stops)]


def fetch(tree):
    """Host numpy copies, also of arrays spread over several processes (allgathered)."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def initialize_distributed(
    coordinator: str = "", num_processes: int | None = None, process_id: int | None = None
) -> None:
    """`jax.distributed.initialize`, from flags or (all empty) the cluster's environment
    (TPU pods, SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID). On CPU the cross-process collectives go through gloo."""
    # Only CPU devices use it; it must be set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator:
        kwargs = dict(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    jax.distributed.initialize(**kwargs)


def make_integrity_check(mesh: Mesh):
    """Compiled check of a placed state: {leaf name: bool} of leaves (parameters, reference
    parameters, optimizer moments) whose replicas disagree bit for bit (`fm.integrity`)."""

    def check(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        arrays = [x for _, x in flat]
        specs = [param_spec(leaf_name(p), np.shape(x), mesh) for p, x in flat]
        flags = integrity.tree_mismatches(arrays, mesh, specs)
        return {leaf_name(p): f for (p, _), f in zip(flat, flags, strict=True)}

    return jax.jit(check)


def diverged(flags: dict[str, Any]) -> list[str]:
    """Names of the leaves a `make_integrity_check` result flags, sorted."""
    return sorted(name for name, bad in fetch(flags).items() if bool(bad))


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collective ops in a compiled program's HLO text (`jitted.lower(...).compile().as_text()`),
    by kind; an asynchronous pair (``-start`` / ``-done``) counts once."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for kind in re.findall(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text):
        counts[kind] += 1
    return counts


def mesh_of(x: jax.Array) -> Mesh | None:
    """The mesh an array is placed on; None for a single-device array."""
    sharding = getattr(x, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None

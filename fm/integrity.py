"""Cross-replica integrity: copies of a replicated tensor must agree bit for bit.

On a device mesh, an array sharded as ``P("fsdp")`` over axes (data, fsdp) has one block per
fsdp index, and every ``data`` replica holds its own copy of that block. Nothing in SPMD
checks that the copies stay equal: a flaky device, a missed all-reduce or a non-deterministic
kernel lets one replica drift while the loss looks normal (in a well-known 176B run such a
divergence went unseen for days). Each device fingerprints its own block (`checksum`, bit
exact), and the fingerprints are compared along the mesh axes the array is replicated on.

Usage (works inside or outside jit; the mesh and specs are those the arrays are placed with)::

  sums = integrity.device_checksums(x, mesh, spec)    # uint32, shaped like the mesh
  bad = integrity.replica_mismatch(sums, integrity.replicated_axes(spec, mesh.axis_names))

`tree_mismatches` does the same for a pytree and returns one bool per leaf. `tree_checksum`
fingerprints a whole pytree (one device's view of it): a train step compares the weights it
reads with the fingerprint the previous step sealed, and the reference weights with the
fingerprint taken when they were loaded (`fm.stats.integrity_stats`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

_GOLDEN = 0x9E3779B1  # odd: every position's weight is odd, so any single-word change shows


def _as_words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, in its own shape (16-bit and 8-bit values widened;
    64-bit values split, adding a trailing axis of 2)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major position (mod 2³²), built from per-axis iotas so that a
    sharded array is never flattened (no gather onto one device)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * jnp.uint32(stride % (1 << 32))
        stride *= shape[axis]
    return index


def checksum(x: jax.Array) -> jax.Array:
    """Bit-exact uint32 fingerprint of an array: Σ_i bits_i · w_i mod 2³², with odd w_i
    (i the row-major position).

    Position-weighted, so swapped elements change it too; −0.0 and 0.0, or two NaN payloads,
    differ (what matters here is bit identity, not numerical equality).
    """
    words = _as_words(x)
    weights = (2 * _flat_index(words.shape) + 1) * jnp.uint32(_GOLDEN)
    return jnp.sum(_fold_leading(words * weights), dtype=jnp.uint32)


def _fold_leading(x: jax.Array) -> jax.Array:
    """Σ over every axis but the last, mod 2³², by adding halves: elementwise adds, which
    compile to vector code, where an integer reduction is a scalar loop on the CPU (about 3×
    slower over a model's weights). Zero padding to a power of two adds nothing, and the sum is
    modular, so the result equals `jnp.sum` over those axes bit for bit."""
    while x.ndim > 1:
        rows = x.shape[0]
        size = 1 << (rows - 1).bit_length()
        x = jnp.pad(x, [(0, size - rows)] + [(0, 0)] * (x.ndim - 1))
        while x.shape[0] > 1:
            half = x.shape[0] // 2
            x = x[:half] + x[half:]
        x = x[0]
    return x


def tree_checksum(tree) -> jax.Array:
    """Bit-exact uint32 fingerprint of a pytree: the `checksum` of its leaves' checksums, in
    leaf order (a change in any leaf, or two leaves swapped, changes it). Works on sharded
    arrays: the sum is modular, so it does not depend on the reduction order."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.uint32)
    return checksum(jnp.stack([checksum(x) for x in leaves]))


def device_checksums(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """Per-device fingerprints: uint32 array shaped like the mesh, entry = `checksum` of the
    block that device holds. `x` must be placed (or constrained) with ``NamedSharding(mesh,
    spec)``; each device reads only its own copy, so differing replicas stay visible."""
    names = mesh.axis_names
    ones = (1,) * len(names)
    fn = jax.shard_map(
        lambda block: checksum(block).reshape(ones),
        mesh=mesh,
        in_specs=spec,
        out_specs=PartitionSpec(*names),
        check_vma=False,
    )
    return fn(x)


def replicated_axes(spec: PartitionSpec, axis_names: tuple[str, ...]) -> tuple[int, ...]:
    """Positions of the mesh axes that `spec` does not shard over (the replica axes)."""
    used = set()
    for entry in spec:
        if entry is None:
            continue
        used.update(entry if isinstance(entry, tuple) else (entry,))
    return tuple(i for i, name in enumerate(axis_names) if name not in used)


def replica_mismatch(sums: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """True when the fingerprints of some block differ along the replica `axes`."""
    if not axes:
        return jnp.zeros((), bool)
    return jnp.any(jnp.max(sums, axis=axes) != jnp.min(sums, axis=axes))


def tree_mismatches(tree, mesh: Mesh, specs):
    """One bool scalar per leaf of `tree`: do the replicas of that leaf disagree?

    Args:
      tree: pytree of arrays placed on `mesh`.
      mesh: the device mesh.
      specs: pytree of PartitionSpec matching `tree` (how each leaf is placed).
    """
    names = mesh.axis_names

    def one(x, spec):
        return replica_mismatch(device_checksums(x, mesh, spec), replicated_axes(spec, names))

    leaves, treedef = jax.tree.flatten(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    if len(spec_leaves) != len(leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(spec_leaves)} PartitionSpecs")
    return treedef.unflatten([one(x, s) for x, s in zip(leaves, spec_leaves, strict=True)])

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


def _weights(shape: tuple[int, ...], start: int, count: int) -> jax.Array:
    """The odd weights (2i + 1)·golden of the rows [start, start + count) along axis 0 of an
    array of `shape` (i = each element's row-major position, mod 2³²). Written as a part per
    row ([count, ..., 1], from per-axis iotas) plus a part per column ([C]): XLA computes the
    weights inside the fused product, a broadcast add per element, and never materializes
    them; a sharded array is never flattened (no gather onto one device)."""
    golden = jnp.uint32(_GOLDEN)
    if len(shape) == 1:
        return (jnp.uint32(2) * (jax.lax.iota(jnp.uint32, count) + jnp.uint32(start)) + 1) * golden
    cols = jax.lax.iota(jnp.uint32, shape[-1])
    rows = (count, *shape[1:-1], 1)
    row_index = jnp.zeros(rows, jnp.uint32)
    stride = shape[-1]
    for axis in reversed(range(len(shape) - 1)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, rows, axis)
        if axis == 0:
            iota = iota + jnp.uint32(start)
        row_index = row_index + iota * jnp.uint32(stride % (1 << 32))
        stride *= shape[axis]
    return row_index * (jnp.uint32(2) * golden) + (jnp.uint32(2) * cols + 1) * golden


def _folded(xs: list[jax.Array], scales: list[int] | None = None) -> jax.Array:
    """uint32[C]: a vector whose sum mod 2³² is Σ_k scales[k]·`checksum`(xs[k]), for arrays xs
    of one shape and dtype (scales default 1).

    One pass over the arrays: the two halves along axis 0 (the second zero-padded to the
    first's rows, a power of two) of every array are scaled, weighted and added, then
    `_fold_leading`; Σ_k s_k·Σ_i b_ki·w_i = Σ_i (Σ_k s_k·b_ki)·w_i mod 2³², so arrays of one
    shape share one fold. The halves are sliced from each array itself: a producer read by two
    slices is materialized by XLA's CPU fusion, so weighting or bit-casting the whole array
    first would write and read it once more."""
    xs = [jnp.atleast_1d(jnp.asarray(x)) for x in xs]
    scales = [1] * len(xs) if scales is None else scales
    x0 = xs[0]
    wide = x0.dtype != jnp.bool_ and x0.dtype.itemsize == 8  # two words an element
    shape = (*x0.shape, 2) if wide else x0.shape

    def mixed(part):
        out = None
        for x, scale in zip(xs, scales, strict=True):
            words = _as_words(part(x))
            words = words if scale == 1 else words * jnp.uint32(scale % (1 << 32))
            out = words if out is None else out + words
        return out

    rows = x0.shape[0]
    if rows == 1:
        return _fold_leading(mixed(lambda x: x) * _weights(shape, 0, 1))
    half = 1 << ((rows - 1).bit_length() - 1)
    top = mixed(lambda x: x[:half]) * _weights(shape, 0, half)
    bottom = mixed(lambda x: x[half:]) * _weights(shape, half, rows - half)
    pad = [(0, 2 * half - rows)] + [(0, 0)] * (bottom.ndim - 1)
    return _fold_leading(top + jnp.pad(bottom, pad))


def checksum(x: jax.Array) -> jax.Array:
    """Bit-exact uint32 fingerprint of an array: Σ_i bits_i · w_i mod 2³², with odd
    w_i = (2i + 1)·0x9E3779B1 (i the row-major position of each 32-bit word).

    Position-weighted, so swapped elements change it too; −0.0 and 0.0, or two NaN payloads,
    differ (what matters here is bit identity, not numerical equality).
    """
    return jnp.sum(_folded([x]), dtype=jnp.uint32)


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


def tree_checksum(tree, *, by_shape: bool = True) -> jax.Array:
    """Bit-exact uint32 fingerprint of a pytree: the `checksum` of its leaves' checksums, in
    leaf order (a change in any leaf, or two leaves swapped, changes it). Works on sharded
    arrays: the sum is modular, so it does not depend on the reduction order.

    Computed as one sum: Σ_i (2i + 1)·golden·checksum(leaf i) mod 2³², the leaves of one shape
    and dtype folded together (`by_shape`: a few large operations instead of two or three per
    leaf, the same value). Pass `by_shape=False` where same-shaped leaves may be laid out
    differently on a device mesh: folding them together would move one to the other's layout."""
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.uint32)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.shape, x.dtype) if by_shape else (i,), []).append(i)
    weight = lambda i: (2 * i + 1) * _GOLDEN % (1 << 32)  # noqa: E731
    parts = [_folded([leaves[i] for i in g], [weight(i) for i in g]) for g in groups.values()]
    return jnp.sum(jnp.concatenate(parts), dtype=jnp.uint32)


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

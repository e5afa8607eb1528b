"""A step's named scalars out of a compiled function as one array per dtype.

A jitted function returns every leaf of its output as its own device buffer, and the host
spends a few microseconds wrapping each one. fm's statistics and detector output are about a
hundred scalars a step; returned as a dict of scalars they cost rftjax's default step 0.55 ms
of its 34 ms, about as much as fm's own computation in the step (BUILD_NOTES, "fm overhead").
Packed, they are one buffer per dtype::

  @jax.jit
  def train_step(state, batch):
      ...
      return state, fm.scalars.pack({**metrics, **stats, **flags})

  state, metrics = train_step(state, batch)
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}

`Scalars` is a pytree (`jax.device_get`, `jax.tree.map` and vmap keep it a `Scalars`) and a
read-only mapping from name to value: `metrics["loss"]` is that scalar (a device slice before
the fetch, a numpy scalar of its own dtype after it), in sorted key order as a dict returned
by jit would be. Entries that are not scalars (arrays, nested dicts) pass through unpacked.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_pytree_node_class
class Scalars(Mapping):
    """Named scalars held as columns: `columns[g][..., i]` is the value of `names[g][i]`
    (leading axes are those a transformation such as vmap or scan added); `rest` holds the
    entries that are not scalars."""

    def __init__(self, names: tuple[tuple[str, ...], ...], columns: tuple, rest: dict):
        self.names, self.columns, self.rest = names, columns, rest
        self._where = {n: (g, i) for g, group in enumerate(names) for i, n in enumerate(group)}
        self._order = tuple(sorted([*self._where, *rest]))

    def tree_flatten(self):
        return (self.columns, self.rest), self.names

    @classmethod
    def tree_unflatten(cls, names, children):
        return cls(names, *children)

    def __getitem__(self, name: str) -> Any:
        if name in self.rest:
            return self.rest[name]
        g, i = self._where[name]
        return self.columns[g][..., i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        return f"Scalars({', '.join(self._order)})"


def pack(values: Mapping[str, Any]) -> Scalars:
    """`values` (name -> scalar array, or anything else) as a `Scalars`: the scalars stacked
    into one 1-D array per dtype (values unchanged, dtypes kept), the rest as given."""
    groups: dict[np.dtype, list[tuple[str, jax.Array]]] = {}
    rest = {}
    for name in sorted(values):
        value = values[name]
        if isinstance(value, (jax.Array, np.ndarray, np.generic, float, int, bool)):
            value = jnp.asarray(value)
            if value.ndim == 0:
                groups.setdefault(value.dtype, []).append((name, value))
                continue
        rest[name] = value
    order = sorted(groups, key=str)
    names = tuple(tuple(n for n, _ in groups[d]) for d in order)
    columns = tuple(jnp.stack([v for _, v in groups[d]]) for d in order)
    return Scalars(names, columns, rest)

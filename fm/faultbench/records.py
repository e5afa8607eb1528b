"""Reading and writing FaultBench tables (Parquet, through pyarrow).

Tables are handled as dicts of equal-length numpy columns. pyarrow is imported when a table is
read or written, so the rest of `fm.faultbench` (scoring, baselines) works on arrays without it.
"""

from __future__ import annotations

import os
from collections.abc import Container, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fm.faultbench import schema
from fm.faultbench.scoring import RunLabel

Columns = dict[str, np.ndarray]


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency of the package
        raise ImportError("FaultBench tables need pyarrow: pip install 'pyarrow>=14'") from e
    return pa, pq


def _arrow_type(dtype: str):
    pa, _ = _pa()
    return {
        "string": pa.string(),
        "int64": pa.int64(),
        "int32": pa.int32(),
        "float64": pa.float64(),
        "float32": pa.float32(),
    }[dtype]


class TableWriter:
    """Appends batches of rows to one Parquet file with a fixed schema.

    Columns are `schema.TABLES[table]` followed by `extra` ({name: dtype}, e.g. the metric
    columns of steps.parquet). A batch may leave extra float columns out: they are NaN there.
    """

    def __init__(self, path: str, table: str, extra: Mapping[str, str] = ()):
        pa, pq = _pa()
        extra = dict(extra)
        self.dtypes = {c.name: c.dtype for c in schema.TABLES[table]}
        clash = sorted(set(self.dtypes) & set(extra))
        if clash:
            raise ValueError(f"extra columns {clash} clash with fixed {table} columns")
        self.dtypes.update(extra)
        self.schema = pa.schema([(n, _arrow_type(t)) for n, t in self.dtypes.items()])
        self.rows = 0
        self._tmp = path + ".partial"
        self._path = path
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")

    def write(self, columns: Mapping[str, Any]) -> None:
        """Writes one batch: {column: sequence} of equal lengths."""
        pa, _ = _pa()
        n = len(next(iter(columns.values())))
        arrays = []
        for name, dtype in self.dtypes.items():
            if name in columns:
                values = columns[name]
            elif dtype.startswith("float"):
                values = np.full(n, np.nan)
            else:
                raise ValueError(f"batch lacks column {name!r} ({dtype})")
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} rows, expected {n}")
            if dtype != "string":
                values = np.asarray(values, dtype)
            arrays.append(pa.array(values, type=_arrow_type(dtype)))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += n

    def close(self) -> None:
        """Finishes the file; it appears under its name only once complete."""
        self._writer.close()
        os.replace(self._tmp, self._path)


def read(path: str, columns: Sequence[str] | None = None) -> Columns:
    """A Parquet table as {column: numpy array} (strings as object arrays)."""
    _, pq = _pa()
    table = pq.read_table(path, columns=list(columns) if columns is not None else None)
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}


def columns_of(path: str) -> list[str]:
    """Column names of a Parquet file, without reading its rows."""
    _, pq = _pa()
    return list(pq.read_schema(path).names)


class Records(NamedTuple):
    """A campaign's manifest and step table; steps sorted by (run_id, step)."""

    manifest: Columns
    steps: Columns
    runs: dict[str, slice]  # run_id → its rows in `steps`


def load(data_dir: str, step_columns: Sequence[str] | None = None) -> Records:
    """Reads manifest.parquet and steps.parquet of `data_dir` (all or only `step_columns`
    besides the fixed ones) and checks the fixed columns."""
    manifest_path = os.path.join(data_dir, "manifest.parquet")
    steps_path = os.path.join(data_dir, "steps.parquet")
    for path in (manifest_path, steps_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: is {data_dir} a FaultBench folder?")
    manifest = read(manifest_path)
    schema.check_columns("manifest", list(manifest))
    wanted = None
    if step_columns is not None:
        wanted = list(dict.fromkeys([*schema.names("steps"), *step_columns]))
    steps = read(steps_path, wanted)
    schema.check_columns("steps", list(steps))
    order = np.lexsort((steps["step"], steps["run_id"]))
    steps = {k: v[order] for k, v in steps.items()}
    return Records(manifest, steps, run_slices(steps["run_id"]))


def run_slices(run_ids: np.ndarray) -> dict[str, slice]:
    """run_id → slice of its rows, for rows grouped by run."""
    if run_ids.size == 0:
        return {}
    starts = np.flatnonzero(np.r_[True, run_ids[1:] != run_ids[:-1]])
    ends = np.r_[starts[1:], run_ids.size]
    slices = {str(run_ids[s]): slice(int(s), int(e)) for s, e in zip(starts, ends, strict=True)}
    if len(slices) != starts.size:
        raise ValueError("rows of a run are not contiguous; sort by run_id first")
    return slices


def labels(
    manifest: Columns,
    runs: Mapping[str, slice],
    split: str | None = None,
    *,
    exclude: Container[str] = (),
) -> list[RunLabel]:
    """Scoring labels of the manifest's runs (of one `split`, or all for None), with the number
    of recorded steps from `runs`.

    A faulted run's event starts at `first_acted`, the first step its fault changed anything
    (where the manifest has that column; else at `onset`). A faulted run whose fault never
    acted is left out: it computed exactly what its clean twin did, whose alarms already count.
    Runs named in `exclude` are left out too (e.g. the inert ones, `fm.faultbench.harm`).
    """
    out = []
    acted = manifest.get("first_acted", manifest["onset"])
    for i, run_id in enumerate(manifest["run_id"]):
        if split is not None and manifest["split"][i] != split:
            continue
        clean = manifest["type"][i] == schema.CLEAN
        if not clean and (int(acted[i]) < 0 or run_id in exclude):
            continue
        if run_id not in runs:
            raise ValueError(f"run {run_id!r} is in the manifest but has no step rows")
        rows = runs[run_id]
        out.append(
            RunLabel(
                str(run_id),
                str(manifest["type"][i]),
                str(manifest["family"][i]),
                str(manifest["severity"][i]),
                int(manifest["onset"][i]) if clean else int(acted[i]),
                rows.stop - rows.start,
            )
        )
    return out

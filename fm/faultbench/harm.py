"""What a fault did to its run, judged against the run's clean twin (same seed, data, steps).

Every faulted run of a campaign gets one label:

- `inert`: every recorded statistic of every step and the final held-out evaluation equal
  the twin's (NaN equals NaN): the fault changed nothing anyone could observe, e.g. a clip-ε
  change while each step makes one update (the importance ratio is 1, so the clip never acts).
  Detection scoring leaves it out, as it leaves out runs whose fault never acted.
- `harmless`: it differs from the twin, but its final held-out accuracy is no more than
  `tolerance` below the twin's.
- `harmful`: final held-out accuracy more than `tolerance` below the twin's.
- `unknown`: the twin (or either final accuracy) is missing, so there is nothing to compare.

Clean runs are labelled `none`. Only the tables are read, so records written before this
label existed are labelled the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np

from fm.faultbench import schema

INERT, HARMLESS, HARMFUL, UNKNOWN = "inert", "harmless", "harmful", "unknown"
LABELS = (INERT, HARMLESS, HARMFUL, UNKNOWN)
# Accuracy lost against the twin that still counts as harmless: the closed-loop recovery
# criterion's margin (the spread of two runs of one seed whose trajectories diverged is of
# this order at 512 held-out prompts).
TOLERANCE = 0.05


def compared_columns(columns: Iterable[str]) -> list[str]:
    """The step columns an `inert` run must match: trainer statistics (`schema.is_feature`)
    and held-out evaluations (`eval_*`); labels and the detector's own outputs are left out."""
    return sorted(c for c in columns if schema.is_feature(c) or c.startswith("eval_"))


def identical(run: Mapping[str, np.ndarray], twin: Mapping[str, np.ndarray]) -> bool:
    """Whether two runs' step columns hold the same values (NaN equal to NaN) over the same
    steps, on every compared column either run has.

    Args:
      run, twin: {column: array[T]} of one run each (T may differ: then not identical).
    """
    names = compared_columns(set(run) | set(twin))
    for name in names:
        if name not in run or name not in twin:
            return False
        a, b = np.asarray(run[name], np.float64), np.asarray(twin[name], np.float64)
        if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
            return False
    return True


def label(
    run: Mapping[str, np.ndarray] | None,
    twin: Mapping[str, np.ndarray] | None,
    *,
    final: float,
    twin_final: float,
    tolerance: float = TOLERANCE,
) -> str:
    """One faulted run's label (see the module docstring).

    Args:
      run, twin: step columns ({column: array[T]}) of the run and of its clean twin; None if
        missing.
      final, twin_final: final held-out accuracy of each (NaN if not measured).
      tolerance: accuracy the run may lose against its twin and still be harmless (>= 0).
    """
    if run is None or twin is None:
        return UNKNOWN
    return of_accuracy(final, twin_final, same_records=identical(run, twin), tolerance=tolerance)


def of_accuracy(
    final: float, twin_final: float, *, same_records: bool, tolerance: float = TOLERANCE
) -> str:
    """The label from the two final accuracies and whether the step records are identical
    (`identical`, or equal `fingerprint`s)."""
    if not tolerance >= 0:
        raise ValueError(f"harm tolerance must be >= 0 (accuracy, 0..1), got {tolerance}")
    if same_records and (final == twin_final or (np.isnan(final) and np.isnan(twin_final))):
        return INERT
    if np.isnan(final) or np.isnan(twin_final):
        return UNKNOWN
    return HARMLESS if final >= twin_final - tolerance else HARMFUL


def fingerprint(columns: Mapping[str, np.ndarray]) -> str:
    """A digest of a run's compared step columns (NaN canonical): two runs whose step tables
    have the same columns are `identical` exactly when their fingerprints are equal (up to a
    SHA-256 collision). Lets a writer keep one string per clean run instead of its columns."""
    digest = hashlib.sha256()
    for name in compared_columns(columns):
        values = np.asarray(columns[name], np.float64)
        digest.update(name.encode() + b"\0" + np.where(np.isnan(values), np.nan, values).tobytes())
    return digest.hexdigest()


def label_runs(
    manifest: Mapping[str, np.ndarray],
    steps: Mapping[str, np.ndarray],
    runs: Mapping[str, slice],
    *,
    tolerance: float = TOLERANCE,
) -> dict[str, str]:
    """run_id → label for every run of a campaign (`fm.faultbench.records.Records` fields: the
    manifest, the step table and each run's rows in it); clean runs get `schema.CLEAN`."""
    row_of = {str(r): i for i, r in enumerate(manifest["run_id"])}
    final = np.asarray(manifest["eval_accuracy_final"], np.float64)

    def columns(run_id: str):
        rows = runs.get(run_id)
        return None if rows is None else {k: v[rows] for k, v in steps.items()}

    out = {}
    for run_id, i in row_of.items():
        if manifest["type"][i] == schema.CLEAN:
            out[run_id] = schema.CLEAN
            continue
        twin = str(manifest["twin"][i])
        j = row_of.get(twin)
        out[run_id] = label(
            columns(run_id),
            columns(twin) if j is not None else None,
            final=float(final[i]),
            twin_final=float(final[j]) if j is not None else np.nan,
            tolerance=tolerance,
        )
    return out

"""Diagnosis on FaultBench records: examples at the detector's first alarm, training the learned
diagnoser, and top-k accuracy (macro over types) of any diagnoser."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from fm import diagnose as dg
from fm import taxonomy
from fm.bench import baselines, schema
from fm.bench import records as rec

BEFORE, AFTER = 32, 2  # steps of baseline before the alarm, of evidence after it


class Example(NamedTuple):
    run_id: str
    type: str
    severity: str
    window: list[dict[str, float]]  # step records from BEFORE steps before the alarm
    alarm_index: int  # the alarm's index in `window`
    flagged: tuple[str, ...]


def _record(columns: dict[str, np.ndarray], i: int, names: Sequence[str]) -> dict[str, float]:
    return {n: float(columns[n][i]) for n in names if n in columns}


def examples(
    records: rec.Records, *, split: str | None, window: int = 50, replay: bool = True
) -> list[Example]:
    """One example per faulted run of `split` whose detector alarmed in [onset, onset +
    window): the records around that first alarm. The detector is fm.detect's default one
    replayed over the recorded statistics (as the trainer now runs it), or with
    `replay=False` the alarms and flags the trainer recorded."""
    recorded_flags = [c for c in records.steps if c.startswith("flag/")]
    names = [*dg.FEATURES, "alarm", *recorded_flags]
    out = []
    for lab in rec.labels(records.manifest, records.runs, split):
        if lab.type == schema.CLEAN:
            continue
        rows = records.runs[lab.run_id]
        steps = records.steps["step"][rows]
        if replay:
            signals, flags = baselines.replay_flags({k: v[rows] for k, v in records.steps.items()})
            signal_names = [s.name for s in signals]
            alarm = flags.any(axis=-1)
        else:
            flags = np.stack([records.steps[f][rows] > 0 for f in recorded_flags], axis=-1)
            signal_names = [f.split("/", 1)[1] for f in recorded_flags]
            alarm = records.steps["alarm"][rows] > 0
        hit = np.flatnonzero(alarm & (steps >= lab.onset) & (steps < lab.onset + window))
        if hit.size == 0:
            continue
        i = int(hit[0])
        lo, hi = max(0, i - BEFORE), min(len(steps), i + AFTER + 1)
        cols = {n: records.steps[n][rows] for n in names if n in records.steps}
        win = [_record(cols, j, names) for j in range(lo, hi)]
        flagged = tuple(n for n, f in zip(signal_names, flags[i], strict=True) if f)
        if i - lo == 0:  # an alarm on the first step: no baseline
            continue
        out.append(Example(lab.run_id, lab.type, lab.severity, win, i - lo, flagged))
    return out


def accuracy(diagnoser: Callable[..., dg.Diagnosis], data: Sequence[Example]) -> dict:
    """Top-1, top-3 and family accuracy, macro over types (and micro), with per-type counts."""
    per: dict[str, list[tuple[bool, bool, bool]]] = {}
    for ex in data:
        d = diagnoser(ex.window, ex.alarm_index, flagged=ex.flagged)
        family = taxonomy.get(ex.type).family
        per.setdefault(ex.type, []).append(
            (d.top == ex.type, ex.type in d.top_k(3), d.family == family)
        )
    if not per:
        return {"examples": 0}
    macro = np.mean([np.mean(v, axis=0) for v in per.values()], axis=0)
    micro = np.mean([x for v in per.values() for x in v], axis=0)
    return {
        "examples": int(sum(len(v) for v in per.values())),
        "types": len(per),
        "top1_macro": float(macro[0]),
        "top3_macro": float(macro[1]),
        "family_macro": float(macro[2]),
        "top1_micro": float(micro[0]),
        "per_type_top1": {t: float(np.mean([x[0] for x in v])) for t, v in sorted(per.items())},
    }


def train(data: Sequence[Example], **fit_options) -> dg.Model:
    """The learned diagnoser fit on `data`."""
    if not data:
        raise ValueError("no training examples: no faulted run alarmed within the window")
    x = np.stack([dg.features(ex.window, ex.alarm_index) for ex in data])
    return dg.fit(x, [ex.type for ex in data], **fit_options)

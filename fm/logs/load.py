"""A run's log files -> fm signals per step, under one declared mapping table.

`load(paths, fmt)` reads the files (`fm.logs.readers`), picks the table (`fm.logs.mappings`;
`auto` by the files' layout and the metric names they hold), and returns the step records in
fm's signal names with an account of every name: used (and from which trainer name), declared
unused, unknown, text, and signals logged at too few steps to be monitored.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from fm.logs import mappings, readers
from fm.logs.readers import LogError

# A signal logged at fewer than this share of the steps is listed, not monitored: a missing
# value reads as non-finite to the detector, which would alarm on every gap.
MIN_COVERAGE = 0.5


class Run(NamedTuple):
    files: tuple[str, ...]
    format: str  # the trainer's format (tensorboard: the table its tags matched)
    source: str  # how the files were read (a reader's name)
    table: mappings.Table
    steps: list[int]
    records: list[dict[str, float]]  # {"step", fm signal: value}; NaN where not measured
    mapped: mappings.Mapped
    signals: tuple[str, ...]  # fm signals logged at enough steps
    sparse: dict[str, int]  # fm signal -> steps it was logged at (too few to monitor)
    text: tuple[str, ...]  # names whose values were not numbers
    empty_steps: int  # step records with none of the table's signals (left out)


def _best_table(names: set[str], candidates: tuple[str, ...]) -> mappings.Table:
    scores = {f: len(mappings.resolve(mappings.get(f), names).used) for f in candidates}
    best = max(candidates, key=lambda f: scores[f])
    if scores[best] == 0:
        raise LogError(
            "none of the metrics fm needs is in this log; its names: "
            f"{', '.join(sorted(names)[:30])}{' ...' if len(names) > 30 else ''}"
        )
    return mappings.get(best)


def _merge(parts: list[readers.Records]) -> readers.Records:
    if len(parts) == 1:
        return parts[0]
    pairs = [(s, m) for part in parts for s, m in zip(part.steps, part.metrics, strict=True)]
    merged = readers.records_from_dicts(pairs, source="the logs")
    text = tuple(sorted({t for p in parts for t in p.text}))
    return merged._replace(text=text)


def load(paths: list[str] | tuple[str, ...], fmt: str = "auto") -> Run:
    """Reads a run's log files (all in one format) into fm signals.

    Args:
      paths: log files or run folders (a folder resolves to its trainer_state.json, latest
        TRL checkpoint, metrics.jsonl or TensorBoard event files).
      fmt: "auto" or one of `readers.FORMATS`.
    """
    if fmt != "auto" and fmt not in readers.FORMATS:
        raise LogError(f"unknown format {fmt!r}; accepted: auto, {', '.join(readers.FORMATS)}")
    if not paths:
        raise LogError("no log files given")
    files = tuple(readers.resolve_path(p) for p in paths)
    sources = []
    for f in files:
        source = fmt
        if fmt == "auto":
            source = readers.sniff(f)
            if source == "unknown":
                raise LogError(
                    f"{f}: cannot tell its format from its first record; pass --format "
                    f"({', '.join(readers.FORMATS)})"
                )
        sources.append(source)
    if len(set(sources)) > 1:
        raise LogError(
            f"the logs are in different formats: {dict(zip(files, sources, strict=True))}"
        )
    source = sources[0]
    reader = readers.READERS.get(source, readers.read_openrlhf if source == "jsonl" else None)
    parts = [reader(f) for f in files]
    raw = _merge(parts)
    names = {n for m in raw.metrics for n in m}
    if source in ("tensorboard", "jsonl"):
        candidates = ("trl", "verl", "openrlhf", "rftjax")
        if source == "jsonl":
            candidates = ("rftjax", "trl", "openrlhf")
        table = _best_table(names, candidates)
        if source == "jsonl" and table.format != "openrlhf":
            parts = [readers.READERS[table.format](f) for f in files]
            raw = _merge(parts)
    else:
        table = mappings.get(source)
    return _to_signals(files, source, table, raw)


def _to_signals(files, source, table, raw: readers.Records) -> Run:
    names = {n for m in raw.metrics for n in m}
    mapped = mappings.resolve(table, names)
    if not mapped.used:
        raise LogError(
            f"none of the metrics fm needs is in this {table.format} log (table {table.tag}); "
            f"it expects some of: {', '.join(a for al in table.signals.values() for a in al)}"
        )
    steps, records = [], []
    counts = dict.fromkeys(mapped.used, 0)  # steps each signal was logged at (NaN included)
    for step, metrics in zip(raw.steps, raw.metrics, strict=True):
        row = {s: metrics.get(name) for s, name in mapped.used.items()}
        if all(v is None for v in row.values()):
            continue
        for s, v in row.items():
            counts[s] += v is not None
        steps.append(step)
        records.append({"step": step, **{s: math.nan if v is None else v for s, v in row.items()}})
    enough = max(1, math.ceil(MIN_COVERAGE * len(records)))
    signals = tuple(s for s in mapped.used if counts[s] >= enough)
    sparse = {s: counts[s] for s in mapped.used if counts[s] < enough}
    records = [{"step": r["step"], **{s: r[s] for s in signals}} for r in records]
    return Run(
        files=tuple(files),
        format=table.format,
        source=source,
        table=table,
        steps=steps,
        records=records,
        mapped=mapped,
        signals=signals,
        sparse=sparse,
        text=raw.text,
        empty_steps=len(raw.steps) - len(steps),
    )

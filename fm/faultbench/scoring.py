"""Event-level scoring of a detector on FaultBench runs, with no point adjustment.

A faulted run is one event that starts at its onset o. With window W:

- the event is detected iff the detector raises an alarm on some step s with o ≤ s < o + W
  (W steps, half-open: an alarm at exactly o + W is too late); its delay is s - o for the first
  such s, so delays lie in [0, W);
- every alarm step before onset, and every alarm step of a clean run, is one false alarm;
- alarm steps of a faulted run from o + W on are neither: the run is faulty, but a detection
  that late does not count.

No point adjustment: a detection credits its event once, never the steps around it, and each
false alarm step counts (a detector that stays raised for ten healthy steps made ten false
alarms, as a trainer acting on every alarm would see it). Then

    recall    = detected events / events
    precision = detected events / (detected events + false alarms)
    F1        = 2 · precision · recall / (precision + recall)     (0 when both are 0)

and false alarms per 1,000 clean steps = 1000 · clean-run alarm steps / clean-run steps. With no
alarm at all, precision is 0 (the zero-division convention of scikit-learn). Per family,
severity or type, recall and delays are over that group's events, and precision charges the
group its own pre-onset false alarms plus the clean runs' false alarms in proportion to its
share of the events, so the groups' denominators add up to the overall one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fm.faultbench.schema import CLEAN


class RunLabel(NamedTuple):
    """What scoring needs to know about a run (a manifest row)."""

    run_id: str
    type: str  # CLEAN for a clean run
    family: str
    severity: str
    onset: int  # first faulty step; ignored for a clean run
    steps: int  # steps recorded: alarms[run_id] has this length

    @property
    def clean(self) -> bool:
        return self.type == CLEAN


class Outcome(NamedTuple):
    """One run's result: `delay` is None when missed (or clean)."""

    detected: bool
    delay: int | None
    false_alarms: int  # alarm steps of a clean run, or before onset
    clean_steps: int  # steps of a clean run, 0 for a faulted one


def run_outcome(alarm: np.ndarray, *, onset: int | None, window: int) -> Outcome:
    """Scores one run.

    Args:
      alarm: bool[T], alarm[i] for step i + 1.
      onset: first faulty step (1-based); None for a clean run.
      window: W, steps after onset in which an alarm is a detection (o ≤ s < o + W).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 step, got {window}")
    alarm = np.asarray(alarm, bool)
    steps = np.flatnonzero(alarm) + 1
    if onset is None:
        return Outcome(False, None, int(steps.size), int(alarm.size))
    hits = steps[(steps >= onset) & (steps < onset + window)]
    delay = int(hits[0] - onset) if hits.size else None
    return Outcome(bool(hits.size), delay, int(np.sum(steps < onset)), 0)


def _percentile(values: list[int], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _prf(detected: int, events: int, false_alarms: float) -> dict[str, float]:
    recall = detected / events if events else 0.0
    alarms = detected + false_alarms
    precision = detected / alarms if alarms else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _group(outcomes: Sequence[Outcome], clean_share: float) -> dict[str, Any]:
    """Scores of a group of faulted runs, charged `clean_share` clean false alarms."""
    delays = [o.delay for o in outcomes if o.delay is not None]
    detected = len(delays)
    pre = sum(o.false_alarms for o in outcomes)
    return {
        "events": len(outcomes),
        "detected": detected,
        **_prf(detected, len(outcomes), pre + clean_share),
        "false_alarms_before_onset": pre,
        "delay_median": _percentile(delays, 50),
        "delay_p90": _percentile(delays, 90),
    }


def aggregate(
    labels: Sequence[RunLabel], outcomes: Sequence[Outcome], *, window: int
) -> dict[str, Any]:
    """Overall scores and scores by family, severity and type from per-run outcomes."""
    faulted = [(lab, o) for lab, o in zip(labels, outcomes, strict=True) if not lab.clean]
    clean = [o for lab, o in zip(labels, outcomes, strict=True) if lab.clean]
    clean_alarms = sum(o.false_alarms for o in clean)
    clean_steps = sum(o.clean_steps for o in clean)
    events = len(faulted)
    overall = _group([o for _, o in faulted], clean_alarms)
    overall.update(
        clean_runs=len(clean),
        clean_steps=clean_steps,
        clean_false_alarms=clean_alarms,
        false_alarms_per_1000_clean_steps=1000 * clean_alarms / clean_steps if clean_steps else 0.0,
    )
    result: dict[str, Any] = {"window": window, "overall": overall}
    for key in ("family", "severity", "type"):
        groups: dict[str, list[Outcome]] = {}
        for lab, o in faulted:
            groups.setdefault(getattr(lab, key), []).append(o)
        result[f"by_{key}"] = {
            name: _group(group, clean_alarms * len(group) / events)
            for name, group in sorted(groups.items())
        }
    return result


def by_harm(
    labels: Sequence[RunLabel],
    outcomes: Sequence[Outcome],
    harm: Mapping[str, str],
    *,
    window: int,
) -> dict[str, Any]:
    """Detection scored on harmful and on harmless faults apart (`fm.faultbench.harm`).

    "harmful" is `aggregate` over the clean runs and the harmful runs only: a missed harmful
    fault lowers recall, while alarms on a harmless run are neither detections nor false
    alarms there, so a detector that flags a harmless fault early is not penalized.
    "harmless" is the same over the clean runs and the harmless runs (its recall is how often
    harmless faults are flagged). Faulted runs labelled otherwise (unknown) are in neither.

    Args:
      labels, outcomes: per run, as given to `aggregate` (inert runs already left out).
      harm: run_id → harm label of each faulted run.

    Returns:
      {"counts": {label: runs}, "harmful": aggregate(...), "harmless": aggregate(...)}.
    """
    counts: dict[str, int] = {}
    for h in harm.values():
        if h != CLEAN:
            counts[h] = counts.get(h, 0) + 1
    result: dict[str, Any] = {"counts": dict(sorted(counts.items()))}
    for group in ("harmful", "harmless"):
        pick = [
            (lab, o)
            for lab, o in zip(labels, outcomes, strict=True)
            if lab.clean or harm.get(lab.run_id) == group
        ]
        result[group] = aggregate([p[0] for p in pick], [p[1] for p in pick], window=window)
    return result


def outcomes_of(
    labels: Sequence[RunLabel], alarms: Mapping[str, np.ndarray], *, window: int
) -> list[Outcome]:
    """`run_outcome` of each run, its alarms checked against its recorded steps."""
    outcomes = []
    for lab in labels:
        if lab.run_id not in alarms:
            raise KeyError(f"no alarms given for run {lab.run_id!r}")
        alarm = np.asarray(alarms[lab.run_id])
        if alarm.shape != (lab.steps,):
            raise ValueError(
                f"alarms of run {lab.run_id!r} have shape {alarm.shape}; expected ({lab.steps},)"
            )
        onset = None if lab.clean else lab.onset
        outcomes.append(run_outcome(alarm, onset=onset, window=window))
    return outcomes


def score(
    labels: Sequence[RunLabel],
    alarms: Mapping[str, np.ndarray],
    *,
    window: int,
    harm: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Scores a detector's alarms on a set of runs.

    Args:
      labels: one per run (clean and faulted).
      alarms: run_id → bool[steps], the detector's alarm on each step of that run.
      window: W in steps (see the module docstring).

    Returns:
      {"window", "overall": {...}, "by_family": {name: {...}}, "by_severity", "by_type"} with
      events, detected, precision, recall, f1, false_alarms_before_onset, delay_median,
      delay_p90 per group, and clean_runs, clean_steps, clean_false_alarms and
      false_alarms_per_1000_clean_steps overall; with `harm` (run_id → `fm.faultbench.harm`
      label) also "by_harm" (`by_harm`).
    """
    outcomes = outcomes_of(labels, alarms, window=window)
    result = aggregate(labels, outcomes, window=window)
    if harm is not None:
        result["by_harm"] = by_harm(labels, outcomes, harm, window=window)
    return result


def score_detector(
    labels: Sequence[RunLabel],
    alarms_of: Callable[[RunLabel], np.ndarray],
    *,
    window: int,
    harm: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`score` with alarms computed per run by `alarms_of(label)` (e.g. a baseline)."""
    alarms = {lab.run_id: alarms_of(lab) for lab in labels}
    return score(labels, alarms, window=window, harm=harm)

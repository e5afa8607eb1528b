"""Harm-aware FaultBench: labels against the clean twin, and detection scored on harmful and
harmless faults apart (hand-made records, values worked out by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from fm.faultbench import harm, records, report, scoring
from fm.faultbench.schema import CLEAN

T = 20  # steps of every hand-made run


def _alarms(*at):
    a = np.zeros(T, bool)
    a[np.asarray(at, int) - 1] = True  # steps are 1-based
    return a


def test_label_inert_harmless_harmful_unknown():
    twin = {"reward_mean": np.r_[np.zeros(T - 1), np.nan], "eval_accuracy": np.full(T, 0.5)}
    same = {k: v.copy() for k, v in twin.items()}
    moved = {**twin, "reward_mean": twin["reward_mean"] + 1e-9}
    # Labels and the detector's own outputs may differ: they are not what the run computed.
    assert harm.identical({**same, "fault_active": np.ones(T), "alarm": np.ones(T)}, twin)
    assert harm.label(same, twin, final=0.5, twin_final=0.5) == harm.INERT
    # Identical statistics but another final evaluation: not inert.
    assert harm.label(same, twin, final=0.49, twin_final=0.5) == harm.HARMLESS
    # Tolerance 0.05: 0.45 is within it, 0.44 is not (both against a twin at 0.5).
    assert harm.label(moved, twin, final=0.45, twin_final=0.5) == harm.HARMLESS
    assert harm.label(moved, twin, final=0.44, twin_final=0.5) == harm.HARMFUL
    assert harm.label(moved, twin, final=0.9, twin_final=0.5) == harm.HARMLESS  # gained
    assert harm.label(moved, twin, final=0.44, twin_final=0.5, tolerance=0.1) == harm.HARMLESS
    # A statistic one run lacks, or another run length, is a difference.
    assert not harm.identical({**same, "grad_norm": np.ones(T)}, twin)
    assert not harm.identical({k: v[:-1] for k, v in same.items()}, twin)
    assert harm.label(moved, None, final=0.5, twin_final=np.nan) == harm.UNKNOWN
    assert harm.label(moved, twin, final=np.nan, twin_final=0.5) == harm.UNKNOWN
    with pytest.raises(ValueError, match="harm tolerance must be >= 0"):
        harm.label(same, twin, final=0.5, twin_final=0.5, tolerance=-0.1)


def _records():
    """A clean twin c; harmful h1 (detected at delay 2) and h2 (missed); harmless s1 (flagged
    at onset) and s2 (an alarm before onset only); inert i (identical to c, alarmed at onset);
    all with onset 10."""
    runs = ["c", "h1", "h2", "s1", "s2", "i"]
    final = {"c": 0.6, "h1": 0.5, "h2": 0.3, "s1": 0.58, "s2": 0.7, "i": 0.6}
    alarm = {"c": _alarms(5), "h1": _alarms(12), "h2": _alarms(), "s1": _alarms(10),
             "s2": _alarms(3), "i": _alarms(10)}  # fmt: skip
    reward = {r: np.linspace(0, 1, T) + (0 if r in ("c", "i") else 0.1) for r in runs}
    faulted = [r != "c" for r in runs]
    manifest = {
        "run_id": np.array(runs, object),
        "split": np.array(["eval"] * 6, object),
        "type": np.array(["OD1" if f else CLEAN for f in faulted], object),
        "family": np.array(["optimization-dynamics" if f else CLEAN for f in faulted], object),
        "severity": np.array(["moderate" if f else CLEAN for f in faulted], object),
        "twin": np.array(["c"] * 6, object),
        "onset": np.array([10 if f else -1 for f in faulted]),
        "first_acted": np.array([10 if f else -1 for f in faulted]),
        "eval_accuracy_final": np.array([final[r] for r in runs]),
    }
    steps = {
        "run_id": np.repeat(np.array(runs, object), T),
        "step": np.tile(np.arange(1, T + 1), len(runs)),
        "alarm": np.concatenate([alarm[r] for r in runs]).astype(float),
        "reward_mean": np.concatenate([reward[r] for r in runs]),
    }
    return records.Records(manifest, steps, records.run_slices(steps["run_id"]))


def test_label_runs_of_a_campaign():
    r = _records()
    assert harm.label_runs(r.manifest, r.steps, r.runs) == {
        "c": CLEAN, "h1": harm.HARMFUL, "h2": harm.HARMFUL, "s1": harm.HARMLESS,
        "s2": harm.HARMLESS, "i": harm.INERT,
    }  # fmt: skip


def test_evaluate_scores_harmful_and_harmless_apart_and_leaves_inert_out():
    result = report.evaluate(_records(), ["fm_recorded"], window=5, log=lambda _: None)
    assert result["data"]["faulted_runs"] == 4  # the inert run is not an event
    assert result["data"]["harm"] == {"inert": 1, "harmless": 2, "harmful": 2, "unknown": 0}
    r = result["detectors"]["fm_recorded"]
    # All four events: h1 and s1 detected; false alarms: c's step 5 and s2's step 3.
    assert r["overall"]["recall"] == 0.5 and r["overall"]["precision"] == 2 / 4
    bad = r["by_harm"]["harmful"]["overall"]
    # Harmful: h1 detected (delay 2), h2 missed; false alarms: c's step 5 only.
    assert (bad["events"], bad["detected"], bad["delay_median"]) == (2, 1, 2.0)
    assert bad["recall"] == 0.5 and bad["precision"] == 1 / 2 and bad["f1"] == 0.5
    fine = r["by_harm"]["harmless"]["overall"]
    # Harmless: s1 flagged at onset; s2's pre-onset alarm and c's are false alarms there.
    assert (fine["events"], fine["detected"], fine["delay_median"]) == (2, 1, 0.0)
    assert fine["precision"] == pytest.approx(1 / 3) and fine["f1"] == pytest.approx(0.4)
    assert r["by_harm"]["counts"] == {"harmful": 2, "harmless": 2, "inert": 1}
    text = report.markdown(result)
    assert "| fm_recorded | 0.500 | 0.500 | 0.500 | 2 | 1/2 | 0 |" in text


def test_a_detector_that_flags_harmless_faults_is_not_penalized_on_harmful_ones():
    r = _records()
    labels = records.labels(r.manifest, r.runs, exclude={"i"})
    harms = harm.label_runs(r.manifest, r.steps, r.runs)
    quiet = {lab.run_id: _alarms(12) if lab.run_id == "h1" else _alarms() for lab in labels}
    eager = {**quiet, "s1": _alarms(10, 11, 12), "s2": _alarms(10)}
    scores = [scoring.score(labels, a, window=5, harm=harms)["by_harm"] for a in (quiet, eager)]
    assert scores[0]["harmful"] == scores[1]["harmful"]
    assert scores[1]["harmless"]["overall"]["recall"] == 1.0

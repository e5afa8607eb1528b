"""Power curves: detection rate and delay against fault magnitude, at one false-alarm budget.

A detector's alarms are made comparable with another's by debouncing: the k-debounced alarm
at step t is raised when the detector alarmed on each of steps t-k+1..t. Raising k never adds
a false alarm, so each detector gets the smallest k (1..`max_k`) whose false alarms on the
clean runs are within the budget (per 1,000 clean steps), and is scored with it on every
faulted run. A detector that misses the budget even at `max_k` is reported with its rate at
`max_k` and `within_budget: false`.

Per (type, variant) and magnitude: the detection rate (an alarm in [onset, onset + W) as in
`fm.faultbench.scoring`) and the median delay; the minimal detectable magnitude is the weakest
magnitude from which on every stronger one of the sweep is detected in at least half of its
runs (None if the strongest is not).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fm.faultbench import baselines, report
from fm.faultbench import records as rec
from fm.faultbench.records import Records
from fm.faultbench.schema import CLEAN
from fm.faultbench.scoring import RunLabel, run_outcome

DETECTABLE = 0.5  # detection rate from which a magnitude counts as detectable


def debounce(alarm: np.ndarray, k: int) -> np.ndarray:
    """bool[T]: step t alarms iff `alarm` holds on each of steps t-k+1..t (k >= 1)."""
    if k < 1:
        raise ValueError(f"debounce needs k >= 1 consecutive alarm steps, got {k}")
    alarm = np.asarray(alarm, bool)
    if k == 1:
        return alarm
    run = np.zeros(alarm.size, np.int64)  # length of the alarm streak ending at each step
    streak = 0
    for i, a in enumerate(alarm):
        streak = streak + 1 if a else 0
        run[i] = streak
    return run >= k


def false_alarm_rate(clean: Sequence[np.ndarray], k: int) -> float:
    """k-debounced alarm steps per 1,000 steps over the clean runs' alarms."""
    steps = sum(a.size for a in clean)
    if steps == 0:
        raise ValueError("no clean-run steps to measure false alarms on")
    return 1000.0 * sum(int(debounce(a, k).sum()) for a in clean) / steps


def calibrate(clean: Sequence[np.ndarray], budget: float, max_k: int = 10) -> tuple[int, float]:
    """(k, its false alarms per 1,000 clean steps): the smallest k whose rate is <= `budget`,
    or `max_k` and its rate when none is."""
    for k in range(1, max_k + 1):
        rate = false_alarm_rate(clean, k)
        if rate <= budget:
            return k, rate
    return max_k, rate


def minimal_detectable(points: Sequence[Mapping[str, Any]]) -> float | None:
    """The weakest magnitude from which on every stronger point is detected at a rate of at
    least `DETECTABLE`; `points` sorted from weakest to strongest, each with "magnitude" and
    "detection_rate"."""
    found = None
    for p in reversed(points):
        if p["detection_rate"] < DETECTABLE:
            break
        found = p["magnitude"]
    return found


def curves(
    labels: Sequence[RunLabel],
    variant_magnitude: Mapping[str, tuple[str, float]],
    alarms_of: Mapping[str, Callable[[RunLabel], np.ndarray]],
    strength: Callable[[str, str, float], float],
    *,
    window: int,
    budget: float,
    max_k: int = 10,
) -> dict[str, Any]:
    """Power curves of each detector.

    Args:
      labels: the runs (clean and faulted; `RunLabel.onset` is the event's start).
      variant_magnitude: run_id → (variant, magnitude) of each faulted run.
      alarms_of: detector name → (label → bool[steps] alarms of that run).
      strength: (type, variant, magnitude) → a number that grows with the fault's strength
        (orders each sweep from weakest to strongest).
      window: W of the detection window [onset, onset + W).
      budget: false alarms per 1,000 clean steps every detector is held to.

    Returns:
      {"budget", "window", "detectors": {name: {"k", "false_alarms_per_1000_clean_steps",
      "within_budget", "curves": {"TYPE/variant": {"points": [{"magnitude", "runs",
      "detected", "detection_rate", "delay_median"}], "minimal_detectable"}}}}}.
    """
    clean = [lab for lab in labels if lab.clean]
    faulted = [lab for lab in labels if not lab.clean]
    out: dict[str, Any] = {"budget": budget, "window": window, "detectors": {}}
    for name, fn in alarms_of.items():
        raw = {lab.run_id: np.asarray(fn(lab), bool) for lab in labels}
        k, rate = calibrate([raw[lab.run_id] for lab in clean], budget, max_k)
        groups: dict[str, dict[float, list]] = {}
        for lab in faulted:
            variant, magnitude = variant_magnitude[lab.run_id]
            o = run_outcome(debounce(raw[lab.run_id], k), onset=lab.onset, window=window)
            key = f"{lab.type}/{variant}"
            groups.setdefault(key, {}).setdefault(magnitude, []).append(o)
        result = {}
        for key, by_magnitude in sorted(groups.items()):
            type_id, variant = key.split("/", 1)
            points = []
            for m in sorted(by_magnitude, key=lambda m: strength(type_id, variant, m)):
                outcomes = by_magnitude[m]
                delays = [o.delay for o in outcomes if o.delay is not None]
                points.append(
                    {
                        "magnitude": m,
                        "runs": len(outcomes),
                        "detected": len(delays),
                        "detection_rate": len(delays) / len(outcomes),
                        "delay_median": float(np.median(delays)) if delays else None,
                    }
                )
            result[key] = {"points": points, "minimal_detectable": minimal_detectable(points)}
        out["detectors"][name] = {
            "k": k,
            "false_alarms_per_1000_clean_steps": rate,
            "within_budget": rate <= budget,
            "curves": result,
        }
    return out


def evaluate(
    records: Records,
    detectors: Sequence[str],
    strength: Callable[[str, str, float], float],
    *,
    window: int,
    budget: float,
    max_k: int = 10,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`curves` of the named detectors (`fm.faultbench.baselines`) on a campaign's records (all
    runs; learned baselines fit on the train split's clean runs, else on all clean runs).
    Detectors whose optional package is missing are skipped with a note."""
    notes: list[str] = []
    labels = rec.labels(records.manifest, records.runs)
    m = records.manifest
    variant_magnitude = {
        str(r): (str(v), float(x))
        for r, v, x, t in zip(m["run_id"], m["variant"], m["magnitude"], m["type"], strict=True)
        if t != CLEAN
    }
    alarms_of = {}
    for name in detectors:
        baseline = baselines.get(name)
        if not baselines.available(baseline):
            notes.append(f"{name}: skipped, {baseline.requires} is not installed")
            log(notes[-1])
            continue
        train = report._train_runs(records, notes) if baseline.requires else []
        fn = baseline.fit(train)
        alarms_of[name] = lambda lab, fn=fn: fn(report.run_columns(records, lab.run_id))
    result = curves(labels, variant_magnitude, alarms_of, strength, window=window,
                    budget=budget, max_k=max_k)  # fmt: skip
    result["notes"] = sorted(set(notes))
    return result


def markdown(result: Mapping[str, Any]) -> str:
    """The minimal detectable magnitude per variant (rows) and detector (columns)."""
    dets = result["detectors"]
    keys = sorted({k for d in dets.values() for k in d["curves"]})
    lines = [
        f"False-alarm budget {result['budget']:g} per 1,000 clean steps (each detector "
        f"debounced to k consecutive alarm steps to meet it); detection window "
        f"{result['window']} steps; minimal detectable magnitude: the weakest from which on "
        f"every stronger one is detected in ≥ {DETECTABLE:.0%} of runs.",
        "",
        "| detector | k | false alarms / 1k clean steps | within budget |",
        "|---|---|---|---|",
    ]
    for name, d in dets.items():
        lines.append(
            f"| {name} | {d['k']} | {d['false_alarms_per_1000_clean_steps']:.2f} | "
            f"{'yes' if d['within_budget'] else 'no'} |"
        )
    lines += ["", "| type/variant | " + " | ".join(dets) + " |"]
    lines.append("|---|" + "---|" * len(dets))
    for key in keys:
        cells = []
        for d in dets.values():
            c = d["curves"].get(key)
            m = None if c is None else c["minimal_detectable"]
            cells.append("–" if m is None else f"{m:g}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [f"Note: {n}" for n in result.get("notes", ())]
    return "\n".join(lines)


def plot(
    result: Mapping[str, Any],
    family_of: Callable[[str], str],
    out_dir: str,
    log: Callable[[str], None] = print,
) -> list[str]:
    """One PNG per fault family (`power_<family>.png`): detection rate against magnitude, a
    panel per type/variant, a line per detector. Returns the paths; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("power plots skipped: matplotlib is not installed (pip install 'rftjax[faultbench]')")
        return []
    dets = result["detectors"]
    keys = sorted({k for d in dets.values() for k in d["curves"]})
    families: dict[str, list[str]] = {}
    for key in keys:
        families.setdefault(family_of(key.split("/", 1)[0]), []).append(key)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for family, members in sorted(families.items()):
        fig, axes = plt.subplots(1, len(members), figsize=(3.2 * len(members), 2.8), squeeze=False)
        for ax, key in zip(axes[0], members, strict=True):
            for name, d in dets.items():
                points = d["curves"].get(key, {}).get("points", [])
                if points:
                    x = [p["magnitude"] for p in points]
                    ax.plot(x, [p["detection_rate"] for p in points], marker="o", label=name)
            ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("magnitude", fontsize=8)
        axes[0][0].set_ylabel("detection rate")
        handles, labels = axes[0][0].get_legend_handles_labels()
        # Outside the panels, so that no curve is hidden behind it.
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
        fig.suptitle(f"{family} (false-alarm budget {result['budget']:g} / 1k clean steps)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"power_{family}.png")
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths

"""Scores detectors on FaultBench records; the report as JSON-ready dict, Markdown and plots."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fm import taxonomy
from fm.faultbench import baselines, harm
from fm.faultbench.records import Records, labels
from fm.faultbench.scoring import RunLabel, score_detector

SEVERITIES = ("subtle", "moderate", "severe")


def run_columns(records: Records, run_id: str) -> dict[str, np.ndarray]:
    """One run's step columns (arrays over its steps)."""
    rows = records.runs[run_id]
    return {k: v[rows] for k, v in records.steps.items()}


def _split_labels(
    records: Records, split: str, notes: list[str], exclude: frozenset[str] = frozenset()
) -> tuple[list[RunLabel], str]:
    """The scored runs' labels, and the split they came from ("all" when `split` is "all" or
    holds no runs)."""
    if split != "all":
        chosen = labels(records.manifest, records.runs, split, exclude=exclude)
        if chosen:
            return chosen, split
        notes.append(f"no runs in split {split!r}: scored on all runs")
    return labels(records.manifest, records.runs, exclude=exclude), "all"


def _train_runs(records: Records, notes: list[str]) -> list[dict[str, np.ndarray]]:
    train = [lab for lab in labels(records.manifest, records.runs, "train") if lab.clean]
    if not train:
        notes.append("no clean runs in the train split: learned baselines fit on all clean runs")
        train = [lab for lab in labels(records.manifest, records.runs) if lab.clean]
    return [run_columns(records, lab.run_id) for lab in train]


def evaluate(
    records: Records,
    detectors: Sequence[str],
    *,
    window: int,
    split: str = "eval",
    harm_tolerance: float = harm.TOLERANCE,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Scores each detector on the runs of `split` ("train", "eval" or "all"); learned baselines
    fit on the clean runs of the train split. Detectors whose optional package is missing are
    skipped with a note. Each faulted run is labelled against its clean twin (`fm.faultbench.harm`,
    `harm_tolerance`): inert runs are left out, and each detector's "by_harm" scores harmful
    and harmless faults apart."""
    notes: list[str] = []
    harms = harm.label_runs(records.manifest, records.steps, records.runs, tolerance=harm_tolerance)
    inert = frozenset(r for r, h in harms.items() if h == harm.INERT)
    run_labels, chosen = _split_labels(records, split, notes, inert)
    splits = dict(zip(records.manifest["run_id"], records.manifest["split"], strict=True))
    in_split = {r: h for r, h in harms.items() if chosen == "all" or splits[r] == chosen}
    wanted = [baselines.get(name) for name in detectors]  # unknown names fail before any work
    train = None
    report: dict[str, Any] = {"window": window, "split": split, "detectors": {}, "notes": notes}
    for baseline in wanted:
        if not baselines.available(baseline):
            notes.append(f"{baseline.name}: skipped, {baseline.requires} is not installed")
            log(notes[-1])
            continue
        if baseline.requires and train is None:
            train = _train_runs(records, notes)
        alarms_of = baseline.fit(train or [])
        result = score_detector(
            run_labels,
            lambda lab, fn=alarms_of: fn(run_columns(records, lab.run_id)),
            window=window,
            harm=in_split,
        )
        result["description"] = baseline.description
        report["detectors"][baseline.name] = result
        log(f"{baseline.name}: scored")  # the scores are in the table printed at the end
    faulted = [lab for lab in run_labels if not lab.clean]
    report["data"] = {
        "runs": len(run_labels),
        "faulted_runs": len(faulted),
        "clean_runs": len(run_labels) - len(faulted),
        "steps": sum(lab.steps for lab in run_labels),
        "harm_tolerance": harm_tolerance,
        "harm": {h: sum(v == h for v in in_split.values()) for h in harm.LABELS},
    }
    return report


def campaign_info(data_dir: str) -> dict[str, str]:
    """The campaign's name and description from `data_dir/campaign.json` ({} if absent)."""
    path = os.path.join(data_dir, "campaign.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    spec = spec.get("spec", spec)  # (the file holds the spec with the runs it resolved to)
    return {k: str(spec[k]) for k in ("name", "description") if k in spec}


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _d(x: float | None) -> str:
    return "–" if x is None else f"{x:g}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: an overall table, F1 by family, and each detector's recall by
    fault type."""
    dets = report["detectors"]
    data = report["data"]
    w = report["window"]
    campaign = report.get("campaign") or {}
    lines = []
    if campaign.get("name"):
        lines += [f"Campaign `{campaign['name']}`: {campaign.get('description', '')}", ""]
    lines += [
        f"Split `{report['split']}`: {data['runs']} runs ({data['faulted_runs']} faulted, "
        f"{data['clean_runs']} clean), {data['steps']} steps. Event-level, no point adjustment: "
        f"a detection is an alarm in [onset, onset + {w}); alarms in clean runs and before "
        "onset are false alarms, one per alarm step.",
        "",
        "| detector | F1 | precision | recall | false alarms / 1k clean steps | delay median "
        "| delay p90 | " + " | ".join(f"F1 {s}" for s in SEVERITIES) + " |",
        "|---|" + "---|" * (6 + len(SEVERITIES)),
    ]
    for name, r in dets.items():
        o = r["overall"]
        sev = [_f(r["by_severity"].get(s, {}).get("f1")) for s in SEVERITIES]
        lines.append(
            f"| {name} | {_f(o['f1'])} | {_f(o['precision'])} | {_f(o['recall'])} | "
            f"{_f(o['false_alarms_per_1000_clean_steps'], 2)} | {_d(o['delay_median'])} | "
            f"{_d(o['delay_p90'])} | " + " | ".join(sev) + " |"
        )
    lines += _harm_markdown(report)
    families = [f for f in taxonomy.FAMILIES if any(f in r["by_family"] for r in dets.values())]
    lines += ["", "F1 by family:", "", "| detector | " + " | ".join(families) + " |"]
    lines.append("|---|" + "---|" * len(families))
    for name, r in dets.items():
        cells = [_f(r["by_family"].get(f, {}).get("f1")) for f in families]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    types = sorted({t for r in dets.values() for t in r["by_type"]})
    lines += ["", "Recall (median delay) by fault type:", "", "| detector | " + " | ".join(types)]
    lines[-1] += " |"
    lines.append("|---|" + "---|" * len(types))
    for name, r in dets.items():
        cells = []
        for t in types:
            g = r["by_type"].get(t)
            cells.append("–" if g is None else f"{g['recall']:.2f} ({_d(g['delay_median'])})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report["notes"]:
        lines += ["", *[f"Note: {n}" for n in report["notes"]]]
    return "\n".join(lines)


def _harm_markdown(report: dict[str, Any]) -> list[str]:
    """The harm-aware table (reports written before harm labels existed have none)."""
    counts = report["data"].get("harm")
    if counts is None:
        return []
    tol = report["data"]["harm_tolerance"]
    lines = [
        "",
        f"Against each run's clean twin: {counts[harm.HARMFUL]} harmful (final accuracy more "
        f"than {tol:g} below the twin's), {counts[harm.HARMLESS]} harmless, "
        f"{counts[harm.INERT]} inert (identical records: not scored), "
        f"{counts[harm.UNKNOWN]} unknown (no twin). Alarms on harmless runs are neither "
        "detections nor false alarms in the harmful columns.",
        "",
        "| detector | harmful F1 | harmful precision | harmful recall | harmful delay median "
        "| harmless flagged | harmless delay median |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["detectors"].items():
        bad, fine = r["by_harm"]["harmful"]["overall"], r["by_harm"]["harmless"]["overall"]
        flagged = f"{fine['detected']}/{fine['events']}"
        lines.append(
            f"| {name} | {_f(bad['f1'])} | {_f(bad['precision'])} | {_f(bad['recall'])} | "
            f"{_d(bad['delay_median'])} | {flagged} | {_d(fine['delay_median'])} |"
        )
    return lines


def plot_onsets(records: Records, out_dir: str, **kwargs) -> list[str]:
    """`fm.faultbench.plots.plot_onsets` (the signals around onset, a PNG per fault type)."""
    from fm.faultbench import plots  # matplotlib only when drawing

    return plots.plot_onsets(records, out_dir, **kwargs)


def write(
    data_dir: str,
    out: str,
    detectors: Sequence[str],
    *,
    window: int = 50,
    split: str = "eval",
    harm_tolerance: float = 0.05,
) -> str:
    """`launch.faultbench evaluate`: scores `detectors` on the records of `data_dir` and writes
    everything into the folder `out` (report.json, report.md, summary.png, plots/<type>.png;
    pictures only where matplotlib is installed). Returns the Markdown report."""
    import time

    from fm.faultbench import records as fb_records

    for name in detectors:
        baselines.get(name)  # names an unknown detector
    if window < 1:
        raise ValueError(f"--window must be >= 1 step, got {window}")
    data = fb_records.load(data_dir)
    t0 = time.time()
    result = evaluate(data, detectors, window=window, split=split, harm_tolerance=harm_tolerance)
    result["data_dir"] = os.path.abspath(data_dir)
    result["campaign"] = campaign_info(data_dir)
    result["seconds"] = time.time() - t0
    pictures = plot_onsets(data, os.path.join(out, "plots"), window=window)
    result["plots"] = [os.path.join("plots", os.path.basename(p)) for p in pictures]
    if pictures:
        from fm.faultbench import plots

        plots.summary_figure(result, os.path.join(out, "summary.png"))
    text = markdown(result)
    if pictures:
        text += f"\n\nPictures in {out}: summary.png, plots/ ({len(pictures)} fault types)."
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text

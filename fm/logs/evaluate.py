"""How much fm loses with log-level metrics only: FaultBench records reduced to each trainer's view.

  python -m fm.logs.evaluate --data DIR [--views full,trl,verl,openrlhf] [--window 50]
                             [--split eval] [--out REPORT.json]

A view keeps, of a campaign's step records, only the fm statistics a trainer's log carries
(the fm signals of its table in `fm.logs.mappings`; `full` keeps every statistic fm computes
in-step). Each run is then replayed through `fm.logs.monitor.Monitor` — the detector over the
view's signals and the rules diagnoser over the fault types the view can show — exactly as
`fm.analyze` reads a log, and scored like `launch.faultbench evaluate` (`fm.faultbench.scoring`,
event-level, no point adjustment): detection F1, precision, recall, delay, false alarms per
1,000 clean steps; and the first diagnosis of each event detected within the window: top-1,
top-3 and family accuracy, macro over the types with such an event (as `fm.faultbench.diagnosis`
scores diagnosers: conditional on detection, so read it next to recall), of the rules and of
the view's learned diagnoser (`fm.logs.learned`) cross-validated leave one seed out on the same
events. `train` fits and writes the per-view learned diagnosers.

The records hold fm's own statistics, so a view stands for "the trainer logged these
statistics", not for the trainer's exact estimators (TRL's `kl` is a k3 estimate where the
records hold k1; verl's score is before its in-reward KL penalty).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from fm import detect
from fm import diagnose as dg
from fm.faultbench import diagnosis as fb_diagnosis
from fm.faultbench import harm, scoring
from fm.faultbench import records as rec
from fm.logs import learned, load, mappings, monitor

VIEWS = learned.VIEWS
FULL = tuple(dict.fromkeys([*dg.FEATURES, *(s.name for s in detect.default_signals())]))


def view_signals(view: str) -> tuple[str, ...]:
    """The fm statistics a view keeps."""
    if view == "full":
        return FULL
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; accepted: {', '.join(VIEWS)}")
    return tuple(mappings.get(view).signals)


def replay_run(columns: dict[str, np.ndarray], signals: Sequence[str]):
    """(alarm bool[T], diagnosis events, the monitor) of one run's step columns through a
    Monitor over `signals` (those the run recorded; the rules diagnose)."""
    steps = columns["step"]
    mon = monitor.Monitor(signals)
    alarm = np.zeros(len(steps), bool)
    diagnoses = []
    for i, step in enumerate(steps):
        events = mon.observe(int(step), {s: float(columns[s][i]) for s in signals})
        alarm[i] = any(e["event"] == "alarm" for e in events)
        diagnoses += [e for e in events if e["event"] == "diagnosis"]
    diagnoses += mon.finish()
    return alarm, diagnoses, mon


class Replayed(NamedTuple):
    signals: tuple[str, ...]  # the view's statistics the campaign recorded
    visible: tuple[str, ...]  # the fault types they show
    alarms: dict[str, np.ndarray]  # run id -> alarm bool[T]
    examples: list[fb_diagnosis.Example]  # per faulted run, its first diagnosis in the window


def replay_view(
    records: rec.Records, labels: Sequence[scoring.RunLabel], view: str, *, window: int
) -> Replayed:
    """Every run of `labels` replayed through the view's monitor: alarms, and the window of
    each faulted run's first diagnosis of an alarm within `window` steps of its onset."""
    # Statistics the campaign recorded (finite at most steps: not, e.g., all NaN for an
    # algorithm that does not compute them).
    signals = tuple(
        s for s in view_signals(view)
        if s in records.steps and np.isfinite(records.steps[s]).mean() >= load.MIN_COVERAGE
    )  # fmt: skip
    alarms, examples, visible = {}, [], ()
    for lab in labels:
        rows = records.runs[lab.run_id]
        columns = {k: records.steps[k][rows] for k in ("step", *signals)}
        alarm, _, mon = replay_run(columns, signals)
        alarms[lab.run_id], visible = alarm, mon.view.visible
        if lab.clean:
            continue
        hit = [c for c in mon.cases if lab.onset <= c.alarm_step < lab.onset + window]
        if hit and int(columns["step"][0]) <= hit[0].alarm_step:
            c = hit[0]
            examples.append(fb_diagnosis.Example(lab.run_id, lab.type, lab.severity,
                                                 c.records, c.index, c.flagged))  # fmt: skip
    return Replayed(signals, visible, alarms, examples)


def evaluate_view(
    records: rec.Records, labels: Sequence[scoring.RunLabel], view: str, *, window: int
) -> dict[str, Any]:
    """Detection and diagnosis scores of one view over the runs of `labels`: the rules, and
    the view's learned diagnoser by leave-one-seed-out cross-validation on the same events
    (`fm.logs.learned`; leave-one-run-out where the manifest has no seeds)."""
    r = replay_view(records, labels, view, window=window)
    scored = scoring.score(labels, r.alarms, window=window)
    detection = {
        **scored["overall"],
        "recall_by_type": {t: g["recall"] for t, g in scored["by_type"].items()},
    }
    seeds = records.manifest.get("seed", records.manifest["run_id"])
    seed_of = dict(zip(records.manifest["run_id"], seeds, strict=True))
    cv = learned.cross_validate(r.examples, seed_of, view, r.visible)
    return {"signals": list(r.signals), "visible_types": list(r.visible),
            "detection": detection, "diagnosis": _brief(cv["rules"]),
            "learned": {"folds": cv["folds"], **_brief(cv["learned"])}}  # fmt: skip


def _brief(s: dict) -> dict:
    keys = ("examples", "types", "top1_macro", "top3_macro", "family_macro", "per_type_top1")
    return {k: s[k] for k in keys if k in s}


def _load(data_dir: str, split: str):
    present = set(rec.columns_of(os.path.join(data_dir, "steps.parquet")))
    records = rec.load(data_dir, [c for c in FULL if c in present])
    # Faulted runs identical to their clean twin (inert) are left out, as evaluate does.
    harms = harm.label_runs(records.manifest, records.steps, records.runs)
    inert = frozenset(r for r, h in harms.items() if h == harm.INERT)
    chosen = None if split == "all" else split
    labels = rec.labels(records.manifest, records.runs, chosen, exclude=inert)
    if not labels:
        raise ValueError(f"{data_dir}: no runs in split {split!r}")
    return records, labels


def evaluate(
    data_dir: str, views: Sequence[str] = VIEWS, *, window: int = 50, split: str = "eval"
) -> dict[str, Any]:
    """Every view's scores on the campaign in `data_dir` (runs of `split`; "all" for all)."""
    for view in views:
        view_signals(view)  # unknown names fail before any work
    records, labels = _load(data_dir, split)
    return {
        "data": data_dir, "window": window, "split": split, "runs": len(labels),
        "views": {v: evaluate_view(records, labels, v, window=window) for v in views},
    }  # fmt: skip


def _campaign(data_dir: str) -> dict[str, Any]:
    """The campaign's name and description from its campaign.json (where it has one)."""
    try:
        with open(os.path.join(data_dir, "campaign.json"), encoding="utf-8") as f:
            spec = json.load(f).get("spec", {})
    except FileNotFoundError:
        spec = {}
    return {"campaign": spec.get("name"), "campaign_description": spec.get("description")}


def train(
    data_dir: str, views: Sequence[str], out: str, *, window: int = 50, split: str = "all"
) -> dict[str, dict]:
    """Fits each view's learned diagnoser on every run of `split` in `data_dir` and writes it
    to `out`/diagnoser_<view>.json, with its data and its cross-validated scores in `info`."""
    for view in views:
        learned.features(view)
    records, labels = _load(data_dir, split)
    seeds = records.manifest.get("seed", records.manifest["run_id"])
    seed_of = dict(zip(records.manifest["run_id"], seeds, strict=True))
    infos = {}
    for view in views:
        r = replay_view(records, labels, view, window=window)
        cv = learned.cross_validate(r.examples, seed_of, view, r.visible)
        info = {
            **_campaign(data_dir), "split": split, "window": window,
            "runs": len(labels), "seeds": len({seed_of[x.run_id] for x in labels}),
            "signals": list(r.signals),
            "cross_validation": {"folds": cv["folds"], "learned": _brief(cv["learned"]),
                                 "rules": _brief(cv["rules"])},
        }  # fmt: skip
        model = learned.fit(r.examples, view, r.visible, info)
        dg.save_model(model, learned.path(view, out))
        infos[view] = model.info
    return infos


def markdown(report: dict[str, Any]) -> str:
    """The per-view table."""
    lines = [
        "| view | signals | types visible | detection F1 | recall | precision | delay median "
        "(p90) | false alarms / 1,000 clean steps | diagnosed events (types) | rules top-1 | "
        "top-3 | family | learned top-1 | top-3 | family |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    for view, r in report["views"].items():
        d, g, m = r["detection"], r["diagnosis"], r.get("learned", {})
        lines.append(
            f"| {view} | {len(r['signals'])} | {len(r['visible_types'])} | {fmt(d['f1'])} | "
            f"{fmt(d['recall'])} | {fmt(d['precision'])} | {fmt(d['delay_median'])} "
            f"({fmt(d['delay_p90'])}) | {fmt(d['false_alarms_per_1000_clean_steps'])} | "
            f"{g['examples']} ({g.get('types', 0)}) | {fmt(g.get('top1_macro'))} | "
            f"{fmt(g.get('top3_macro'))} | {fmt(g.get('family_macro'))} | "
            f"{fmt(m.get('top1_macro'))} | {fmt(m.get('top3_macro'))} | "
            f"{fmt(m.get('family_macro'))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fm.logs.evaluate", description=__doc__)
    parser.add_argument("--data", required=True, help="a FaultBench campaign folder")
    parser.add_argument("--views", default=",".join(VIEWS))
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--split", default="eval")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = evaluate(args.data, args.views.split(","), window=args.window, split=args.split)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    print(markdown(report), end="")


if __name__ == "__main__":
    main()

"""Failure analysis of a finished run from its logs: TRL, verl, OpenRLHF, TensorBoard, rftjax.

  python -m fm.analyze LOG... [--format auto|trl|verl|openrlhf|tensorboard|rftjax] [--out DIR]
                      [--diagnoser auto|learned|rules]

reads the run's log files, maps the trainer's metric names to fm's signals with that trainer's
declared table (`fm.logs.mappings`), replays fm's detector over the logged values step by step
and diagnoses each alarm, ranking only the fault types the log can show (`fm.logs.views`):
with the learned diagnoser of that trainer's view where one is shipped (`fm.logs.learned`;
"auto": only where it held out at least as well as the rules), else with fm's rules. It
writes into DIR (default: `fm_analysis` beside the first log):

  events.jsonl   alarms (flagged signals, their scores and values) and diagnoses (ranking,
                 evidence in words, the types the log cannot tell apart from the top one)
  summary.json   the format and table version, every metric name's fate (used, unused,
                 unknown), the types fm can and cannot see, alarms and diagnoses
  report.md      the same for a person, with the picture
  report.png     the signals with alarms and diagnoses marked (`fm.report`; needs matplotlib)

Exit status: 0 (no alarm), 1 (alarms), 2 (the log could not be analysed: the error says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from fm import detect, report
from fm.logs import learned, monitor, readers
from fm.logs import load as load_mod
from fm.logs.readers import LogError


class Analysis(NamedTuple):
    run: load_mod.Run
    events: list[dict[str, Any]]
    summary: dict[str, Any]


def analyze(
    paths: Sequence[str],
    fmt: str = "auto",
    config: detect.DetectConfig | None = None,
    diagnoser: str = "auto",
) -> Analysis:
    """Detection and diagnosis over a run's logs (no files written). `diagnoser`: "auto",
    "learned" or "rules" (`fm.logs.learned.pick`)."""
    run = load_mod.load(list(paths), fmt)
    try:
        mon = monitor.Monitor(run.signals, config=config, trainer=run.format, diagnoser=diagnoser)
    except ValueError as e:
        raise LogError(f"{', '.join(run.files)}: {e}") from None
    events = []
    for record in run.records:
        events += mon.observe(record["step"], record)
    events += mon.finish()
    return Analysis(run, events, _summary(run, mon, events))


def _summary(run: load_mod.Run, mon: monitor.Monitor, events: list[dict]) -> dict[str, Any]:
    alarms = [e for e in events if e["event"] == "alarm"]
    return {
        "files": list(run.files),
        "format": run.format,
        "read_as": run.source,
        "table": run.table.tag,
        "steps": len(run.steps),
        "first_step": run.steps[0] if run.steps else None,
        "last_step": run.steps[-1] if run.steps else None,
        "records_without_signals": run.empty_steps,
        "signals": {s: run.mapped.used[s] for s in run.signals},
        "signal_notes": {s: run.table.notes[s] for s in run.signals if s in run.table.notes},
        "monitored": list(mon.watched),
        "not_monitored_sparse": run.sparse,
        "unused_metrics": list(run.mapped.unused),
        "unknown_metrics": list(run.mapped.unknown),
        "text_metrics": list(run.text),
        "view": mon.view.as_json(),
        "diagnoser": mon.choice.as_json(),
        "alarms": len(alarms),
        "alarm_steps": [e["step"] for e in alarms],
        "diagnoses": [
            {k: e[k] for k in ("alarm_step", "top", "family", "ranking", "evidence")}
            for e in events
            if e["event"] == "diagnosis"
        ],
    }


def write(analysis: Analysis, out: str) -> dict[str, str]:
    """Writes events.jsonl, summary.json, report.md and (with matplotlib) report.png."""
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, k) for k in ("events.jsonl", "summary.json", "report.md")}
    with open(paths["events.jsonl"], "w", encoding="utf-8") as f:
        for e in analysis.events:
            f.write(json.dumps(e, allow_nan=True) + "\n")
    picture = os.path.join(out, "report.png")
    try:
        report.draw(analysis.run.records, analysis.events, picture, title=_title(analysis))
        paths["report.png"] = picture
    except ImportError as e:
        analysis.summary["picture"] = f"not drawn: {e}"
    with open(paths["summary.json"], "w", encoding="utf-8") as f:
        json.dump(analysis.summary, f, indent=1, allow_nan=True)
    with open(paths["report.md"], "w", encoding="utf-8") as f:
        f.write(markdown(analysis, picture="report.png" if "report.png" in paths else None))
    return paths


def _title(analysis: Analysis) -> str:
    s = analysis.summary
    name = os.path.basename(s["files"][0])
    return f"{name} ({s['format']}, {s['table']}): fm alarms and diagnoses"


def markdown(analysis: Analysis, picture: str | None) -> str:
    """The report for a person."""
    s = analysis.summary
    view = s["view"]
    lines = [
        f"# fm analysis of {', '.join(s['files'])}",
        "",
        f"Format **{s['format']}** (read as {s['read_as']}), mapping table `{s['table']}`; "
        f"{s['steps']} steps ({s['first_step']}–{s['last_step']}).",
        "",
        f"**{s['alarms']} alarm step(s)**, {len(s['diagnoses'])} diagnosis(es).",
        "",
        f"Diagnoser: **{s['diagnoser']['diagnoser']}** ({s['diagnoser']['why']}).",
        "",
    ]
    for d in s["diagnoses"]:
        ranking = ", ".join(f"{t} {p:.0%}" for t, p in d["ranking"])
        lines.append(f"- alarm at step {d['alarm_step']}: **{d['top']}** ({d['family']}); "
                     f"ranking {ranking}; evidence: {'; '.join(d['evidence'])}")  # fmt: skip
    if picture:
        lines += ["", f"![signals, alarms and diagnoses]({picture})"]
    lines += ["", "## Signals", "", "| fm signal | from the log's | monitored by the detector |",
              "|---|---|---|"]  # fmt: skip
    for signal, name in s["signals"].items():
        note = s["signal_notes"].get(signal)
        watched = "yes" if signal in s["monitored"] else "no (diagnosis only)"
        lines.append(f"| {signal} | `{name}`{f' ({note})' if note else ''} | {watched} |")
    for signal, count in s["not_monitored_sparse"].items():
        lines.append(f"| {signal} | logged at {count} of {s['steps']} steps | no (too sparse) |")
    lines += ["", "## What fm can and cannot tell from this log", ""]
    visible = ", ".join(view["visible"]) or "none"
    lines.append(f"- Fault types it can see (ranked): {visible}.")
    for group in view["indistinguishable"]:
        lines.append(f"- Cannot be told apart (same observable signature): {', '.join(group)}.")
    for t, keys in view["invisible"].items():
        lines.append(f"- Cannot see **{t}**: none of {', '.join(keys)} is logged.")
    lines += ["", "## Metrics not used", ""]
    lines.append(f"- Declared unused by the table: {', '.join(s['unused_metrics']) or 'none'}.")
    lines.append(f"- **Unknown to the table**: {', '.join(s['unknown_metrics']) or 'none'}.")
    if s["text_metrics"]:
        lines.append(f"- Not numbers: {', '.join(s['text_metrics'])}.")
    if s["records_without_signals"]:
        lines.append(f"- {s['records_without_signals']} step record(s) carried no signal.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm.analyze", description=__doc__.split("\n")[0]
    )
    parser.add_argument("logs", nargs="+", metavar="LOG", help="log files or run folders")
    parser.add_argument("--format", default="auto", choices=("auto", *readers.FORMATS))
    parser.add_argument("--out", default=None, help="output folder (default: fm_analysis/ beside "
                        "the first log)")  # fmt: skip
    parser.add_argument("--diagnoser", default="auto", choices=learned.CHOICES,
                        help="auto: the trainer's learned diagnoser where it held out at least "
                        "as well as the rules; learned: it wherever shipped; rules")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        analysis = analyze(args.logs, args.format, diagnoser=args.diagnoser)
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = os.path.abspath(args.logs[0])
    out = args.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first),
                                   "fm_analysis")  # fmt: skip
    paths = write(analysis, out)
    s = analysis.summary
    print(f"{s['format']} ({s['table']}): {s['steps']} steps, {len(s['monitored'])} signals "
          f"monitored, {s['alarms']} alarm step(s)")  # fmt: skip
    print(f"  diagnoser: {s['diagnoser']['diagnoser']} ({s['diagnoser']['why']})")
    for d in s["diagnoses"]:
        print(f"  step {d['alarm_step']}: {d['top']} ({d['family']}) {'; '.join(d['evidence'])}")
    if s["unknown_metrics"]:
        print(f"  unknown metrics (not used): {', '.join(s['unknown_metrics'])}")
    print("  " + "\n  ".join(paths.values()))
    return 1 if s["alarms"] else 0


if __name__ == "__main__":
    sys.exit(main())

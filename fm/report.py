"""Run report (host side): a run's signals with fm's alarms, diagnoses, rollbacks and halt
marked, as a PNG.

It reads what a trainer writes (rftjax's `metrics.jsonl`, one JSON object a step;
`metrics_abandoned.jsonl`, the steps that rollbacks dropped; `events.jsonl`, the closed
loop's alarm / diagnosis / action / verification / halt records; `summary.json`'s fault),
so another trainer that logs the same files gets the same picture::

  python -m fm.report RUN [--out RUN/report.png] [--signals reward_mean,kl_ref_k1]

One panel a signal (by default the signals alarmed most often, else a few basic ones), step
on the x axis, above them a strip that names each event. In every panel: the timeline that
was kept (solid) and each abandoned branch (the steps a rollback dropped, faded), the fault
onset, the alarms on that signal (markers on the curve), each diagnosis, each rollback (the
replayed steps shaded, back to the step restored), each verification and the halt, with a
legend. The y range ignores the first steps' transient and clips far outliers (marked at the
edge). Drawing needs matplotlib; `timeline` and `branches` alone do not.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from fm import taxonomy

DEFAULT_SIGNALS = ("reward_mean", "kl_ref_k1", "entropy_mean", "grad_norm")


class Timeline(NamedTuple):
    alarms: list[tuple[int, tuple[str, ...]]]  # (step, flagged signals)
    diagnoses: list[tuple[int, str, float]]  # (step, top type, its confidence)
    rollbacks: list[tuple[int, int, tuple[str, ...]]]  # (step, restored to, remedies)
    halt: tuple[int, str] | None  # (step, diagnosis)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a JSON-lines file ([] if absent); a line cut short by a crash is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _knob_change(remedy: str, knobs: Mapping[str, float]) -> str:
    if not knobs:
        return remedy.replace("_", " ")
    return ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in knobs.items())


def describe(event: Mapping[str, Any]) -> str:
    """One plain sentence for a closed-loop event (the console's story of a run), e.g.
    "step 103  ALARM update_param_ratio +117σ, grad_norm +21σ" or
    "step 105  diagnosis OD1 learning-rate spike or stall (97%), plan: rollback, lr cap, halt".
    Unknown event kinds fall back to their fields."""
    kind, step = event.get("event"), event.get("step")
    head = f"step {step}  "
    if kind == "alarm":
        scores = event.get("scores", {})
        named = [f"{n} {scores[n]:+.0f}σ" if n in scores else n for n in event["signals"]]
        return head + "ALARM " + ", ".join(named)
    if kind == "diagnosis":
        name = taxonomy.get(event["top"]).name
        confidence = dict(map(tuple, event.get("ranking", [])))
        p = confidence.get(event["top"])
        plan = ", ".join(r.replace("_", " ") for r in event.get("plan", []))
        text = f"diagnosis {event['top']} {name}" + (f" ({p:.0%})" if p is not None else "")
        if event.get("unsure"):
            text = f"diagnosis unsure: one of {', '.join(event['candidates'])}" + (
                f" (best {event['top']} at {p:.0%})" if p is not None else ""
            )
        missing = [u["remedy"] for u in event.get("unavailable", [])]
        if missing:
            plan += f" (not available here: {', '.join(missing)})"
        return head + text + f", plan: {plan}"
    if kind == "action":
        extra = [_knob_change(a["remedy"], a["knobs"]) for a in event["actions"][1:]]
        return head + f"rollback to {event['restored_to']}" + "".join(f" + {e}" for e in extra)
    if kind == "verification":
        if event.get("outcome") == "recovered":
            return head + "recovered (no alarm since the remedy)"
        return head + "the alarm came back: next attempt"
    if kind == "halt":
        named = f" (diagnosis {event['diagnosis']})" if event.get("diagnosis") else ""
        if event.get("candidates"):
            named = f" (unsure: one of {', '.join(event['candidates'])})"
        return head + f"HALT: {event.get('reason')}{named}"
    if kind == "corrupt_checkpoint":  # the reason is a sentence: step, file, what came instead
        return head + str(event.get("reason"))
    if kind == "restore_failed":
        return head + f"checkpoint {event['checkpoint']} unusable ({event['reason']})"
    if kind == "fm_error":
        return head + f"fm failed in {event['where']}; training goes on unmanaged"
    fields = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("step", "event"))
    return head + f"{kind}: {fields}"


def timeline(events: Sequence[Mapping[str, Any]]) -> Timeline:
    """What the closed loop did, in order, from `events.jsonl` records."""
    alarms, diagnoses, rollbacks, halt = [], [], [], None
    for e in events:
        kind = e.get("event")
        if kind == "alarm":
            alarms.append((int(e["step"]), tuple(e.get("signals", ()))))
        elif kind == "diagnosis":
            confidence = float(e["ranking"][0][1]) if e.get("ranking") else float("nan")
            diagnoses.append((int(e["step"]), str(e["top"]), confidence))
        elif kind == "action" and e.get("restored_to") is not None:
            remedies = tuple(a["remedy"] for a in e.get("actions", ()))
            rollbacks.append((int(e["step"]), int(e["restored_to"]), remedies))
        elif kind == "halt":
            halt = (int(e["step"]), str(e.get("diagnosis")))
    return Timeline(alarms, diagnoses, rollbacks, halt)


def choose_signals(
    metrics: Sequence[Mapping[str, Any]], line: Timeline, limit: int = 6
) -> list[str]:
    """The signals that alarmed, most often first (ties: first alarmed first), then those of
    `DEFAULT_SIGNALS`; only statistics `metrics` logged, at most `limit`."""
    logged = {k for m in metrics for k in m}
    counts = collections.Counter(s for _, signals in line.alarms for s in signals)
    ordered = [s for s, _ in counts.most_common()] + list(DEFAULT_SIGNALS)
    return list(dict.fromkeys(s for s in ordered if s in logged))[:limit]


NO_MATPLOTLIB = (
    "drawing the report needs matplotlib, which is not installed: "
    "pip install matplotlib (or pip install 'rftjax[faultbench]')"
)
ABANDONED = "metrics_abandoned.jsonl"


class Branch(NamedTuple):
    """Steps a rollback dropped: `rolled_back_to` + 1 .. `rollback_step`, in step order."""

    rollback_step: int
    rolled_back_to: int
    records: list[dict[str, Any]]


def branches(abandoned: Sequence[Mapping[str, Any]]) -> list[Branch]:
    """The abandoned branches of `metrics_abandoned.jsonl` records (each tagged with its
    rollback's `rollback_step` and `rolled_back_to`), in the order they were abandoned. A step
    written twice (a resumed run replays a rollback) keeps its last record."""
    grouped: dict[tuple[int, int], dict[int, dict[str, Any]]] = {}
    for r in abandoned:
        key = (int(r["rollback_step"]), int(r["rolled_back_to"]))
        grouped.setdefault(key, {})[int(r["step"])] = dict(r)
    return [Branch(k[0], k[1], [v[s] for s in sorted(v)]) for k, v in grouped.items()]


def fault_onset(
    summary: Mapping[str, Any] | None,
    metrics: Sequence[Mapping[str, Any]],
    parts: Sequence[Branch] = (),
) -> int | None:
    """The fault's onset step: summary.json's `fault.onset` if it names one, else the first
    step with `fault_active` > 0 in the run's first pass (the steps kept up to the first
    rollback's target, then the first abandoned branch: after a rollback a persistent fault's
    clock runs on, so the replayed steps show it active earlier)."""
    fault = (summary or {}).get("fault")
    if isinstance(fault, Mapping) and fault.get("onset") is not None:
        return int(fault["onset"])
    first = [m for m in metrics if not parts or m["step"] <= parts[0].rolled_back_to]
    first += list(parts[0].records) if parts else []
    active = [int(m["step"]) for m in first if (m.get("fault_active") or 0) > 0]
    return min(active) if active else None


def draw(
    metrics: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    path: str,
    signals: Sequence[str] | None = None,
    title: str = "",
    *,
    abandoned: Sequence[Mapping[str, Any]] = (),
    summary: Mapping[str, Any] | None = None,
) -> str:
    """Writes the report PNG to `path` and returns it (`fm.report_figure.figure` draws it;
    `abandoned`: metrics_abandoned.jsonl records, `summary`: summary.json)."""
    from fm import report_figure  # matplotlib is imported only to draw

    plt = report_figure.pyplot()
    fig = report_figure.figure(
        metrics, events, signals, title, abandoned=abandoned, summary=summary
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def report(workdir: str, out: str | None = None, signals: Sequence[str] | None = None) -> str:
    """Draws `workdir`'s metrics.jsonl, metrics_abandoned.jsonl, events.jsonl and summary.json
    into `out` (default workdir/report.png)."""
    metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if not metrics:
        raise ValueError(f"{workdir} has no metrics.jsonl records to draw")
    events = read_jsonl(os.path.join(workdir, "events.jsonl"))
    summary = None
    if os.path.exists(os.path.join(workdir, "summary.json")):
        with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    out = out or os.path.join(workdir, "report.png")
    name = os.path.relpath(os.path.abspath(workdir), os.path.dirname(os.path.dirname(
        os.path.abspath(workdir))))  # fmt: skip
    abandoned = read_jsonl(os.path.join(workdir, ABANDONED))
    return draw(metrics, events, out, signals, name, abandoned=abandoned, summary=summary)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m fm.report RUN`: draws a run folder's report picture."""
    parser = argparse.ArgumentParser(prog="python -m fm.report", description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", help="a run folder with metrics.jsonl")
    parser.add_argument("--workdir", default=None, help="the run folder (same as RUN)")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN/report.png)")
    parser.add_argument("--signals", default="", help="comma-separated statistics to draw")
    args = parser.parse_args(argv)
    workdir = args.run or args.workdir
    if not workdir:
        parser.error("give the run folder: python -m fm.report RUN")
    signals = [s for s in args.signals.split(",") if s] or None
    try:
        print(report(workdir, args.out, signals))
    except (ValueError, ImportError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()

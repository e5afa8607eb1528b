"""Run report (host side): a run's signals with fm's alarms, diagnoses, rollbacks and halt
marked, as a PNG.

It reads what a trainer writes (rftjax's `metrics.jsonl`, one JSON object a step, and
`events.jsonl`, the closed loop's alarm / diagnosis / action / verification / halt records),
so another trainer that logs the same two files gets the same picture::

  python -m fm.report --workdir RUN [--out RUN/report.png] [--signals reward_mean,kl_ref_k1]

One panel a signal (by default the signals alarmed most often, else a few basic ones), step
on the x axis: red ticks where that signal alarmed, a dashed line at each diagnosis with the
type named, a grey arrow from each rollback's step back to the checkpoint it restored (with
the remedy), a black line where the run halted. The metrics are the run's final timeline (a
rollback drops the abandoned steps); the events keep the whole history. Drawing needs
matplotlib (`pip install 'rftjax[faultbench]'`); `timeline` alone does not.
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


def draw(
    metrics: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    path: str,
    signals: Sequence[str] | None = None,
    title: str = "",
) -> str:
    """Writes the report PNG to `path` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line = timeline(events)
    logged = {k for m in metrics for k in m}
    missing = sorted(set(signals or ()) - logged)
    if missing:
        raise ValueError(
            f"signals {missing} are not in the metrics; logged: {', '.join(sorted(logged))}"
        )
    names = list(signals) if signals else choose_signals(metrics, line)
    if not names:
        raise ValueError(f"nothing to draw: no signal to show among {sorted(logged)}")
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.9 * len(names) + 0.6), sharex=True)
    axes = [axes] if len(names) == 1 else list(axes)
    for ax, name in zip(axes, names, strict=True):
        points = [(m["step"], m[name]) for m in metrics if name in m and m[name] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), lw=1.0, color="tab:blue")
        ax.set_ylabel(name, fontsize=8)
        for step, flagged in line.alarms:
            if name in flagged:
                ax.axvline(step, color="tab:red", lw=0.6, alpha=0.6)
        for step, _, _ in line.diagnoses:
            ax.axvline(step, color="tab:purple", ls="--", lw=0.8)
        for step, restored, _ in line.rollbacks:
            ax.axvspan(restored, step, color="grey", alpha=0.08)
        if line.halt is not None:
            ax.axvline(line.halt[0], color="black", lw=1.5)
    top = axes[0]
    for step, name, confidence in line.diagnoses:
        top.annotate(f"{name} {confidence:.0%}", (step, 1.0), xycoords=("data", "axes fraction"),
                     fontsize=7, color="tab:purple", va="bottom", rotation=30)  # fmt: skip
    for step, restored, remedies in line.rollbacks:
        label = "+".join(r for r in remedies if r != "rollback") or "rollback"
        axes[-1].annotate(
            label, xy=(restored, 0.05), xytext=(step, 0.25), xycoords=("data", "axes fraction"),
            fontsize=7, color="dimgrey", arrowprops={"arrowstyle": "->", "color": "grey"},
        )  # fmt: skip
    if line.halt is not None:
        axes[-1].annotate(f"halt ({line.halt[1]})", (line.halt[0], 0.85),
                          xycoords=("data", "axes fraction"), fontsize=7)  # fmt: skip
    axes[-1].set_xlabel("step")
    fig.suptitle(title or "fm: signals, alarms (red), diagnoses (purple), rollbacks", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(workdir: str, out: str | None = None, signals: Sequence[str] | None = None) -> str:
    """Draws `workdir`'s metrics.jsonl and events.jsonl into `out` (default
    workdir/report.png)."""
    metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if not metrics:
        raise ValueError(f"{workdir} has no metrics.jsonl records to draw")
    events = read_jsonl(os.path.join(workdir, "events.jsonl"))
    out = out or os.path.join(workdir, "report.png")
    name = os.path.relpath(os.path.abspath(workdir), os.path.dirname(os.path.dirname(
        os.path.abspath(workdir))))  # fmt: skip
    return draw(metrics, events, out, signals, title=name)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m fm.report`: draws a run folder's report picture."""
    parser = argparse.ArgumentParser(prog="python -m fm.report", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a run folder with metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: WORKDIR/report.png)")
    parser.add_argument("--signals", default="", help="comma-separated statistics to draw")
    args = parser.parse_args(argv)
    signals = [s for s in args.signals.split(",") if s] or None
    try:
        print(report(args.workdir, args.out, signals))
    except (ValueError, ImportError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()

"""The report picture (`fm.report`), drawn with matplotlib.

Layout: a strip that names the closed loop's events in the order they happened (numbered),
then one row a signal. With events, each row has two panels: the whole run (left) and the
steps where fm acted (right, under the strip, with the legend). In every panel: the kept
timeline (solid), each abandoned branch (the steps a rollback dropped, faded, under the kept
line: where the replay did the same they coincide), the replayed steps shaded, the fault
onset, alarms on that signal as markers on the curve of the branch they were raised in, each
diagnosis, rollback, verification and the halt as vertical lines.

The y range (`robust_limits`) leaves out the first steps' transient and far outliers; the
values outside it are marked at the edge. A positive signal whose abandoned branch or alarms
lie far above (or below) the rest is drawn on a log scale, so a 10x spike stays visible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fm.report import NO_MATPLOTLIB, Branch, _knob_change, branches, choose_signals, fault_onset
from fm.report import timeline as read_timeline


def pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError naming the install command."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(NO_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def robust_limits(
    values: Sequence[float], extra: Sequence[float] = (), *, skip: int = 0, reach: float = 3.0
) -> tuple[float, float, bool] | None:
    """(lo, hi, log): the y range of a panel. None when nothing is finite.

    The range of `values[skip:]` (a start-up transient left out) within Tukey's far fences
    (quartiles ± 6 IQR; all of them when IQR is 0), widened to take in `extra` (abandoned
    branches, alarm points) up to `reach` times that range on either side; padded by 8%. If
    `extra` lies further out and every value is positive, the range takes it all in on a
    log scale (log True, padded by a factor 1.3). A constant gets ±10% (±1 for 0).

    Args:
      values: f[T] the kept timeline's values in step order.
      extra: f[E] values that should be visible unless far out.
    """
    core = np.asarray(values, float)[skip:]
    core = core[np.isfinite(core)]
    more = np.asarray(extra, float)
    more = more[np.isfinite(more)]
    if core.size == 0:
        core, more = more, np.zeros(0)
    if core.size == 0:
        return None
    q1, q3 = np.percentile(core, [25, 75])
    far = 6.0 * (q3 - q1)
    inside = core[(core >= q1 - far) & (core <= q3 + far)] if far > 0 else core
    lo, hi = float(inside.min()), float(inside.max())
    span = hi - lo or max(abs(hi), 1e-12)
    if more.size:
        out_of_reach = more.max() > hi + reach * span or more.min() < lo - reach * span
        if out_of_reach and lo > 0 and more.min() > 0:
            return min(lo, float(more.min())) / 1.3, max(hi, float(more.max())) * 1.3, True
        lo = max(min(lo, float(more.min())), lo - reach * span)
        hi = min(max(hi, float(more.max())), hi + reach * span)
    pad = 0.08 * (hi - lo) if hi > lo else (0.1 * abs(hi) or 1.0)  # a constant: ±10% or ±1
    return lo - pad, hi + pad, False


_MARK = {  # kind: (legend label, line style)
    "onset": ("fault onset", {"color": "darkred", "ls": "--", "lw": 1.3}),
    "diagnosis": ("diagnosis", {"color": "tab:purple", "ls": "-.", "lw": 1.1}),
    "action": ("rollback (replayed steps shaded)", {"color": "dimgrey", "ls": ":", "lw": 1.4}),
    "recovered": ("verified: recovered", {"color": "tab:green", "ls": "-", "lw": 1.1}),
    "returned": ("verified: alarm came back", {"color": "tab:red", "ls": ":", "lw": 1.1}),
    "halt": ("halt", {"color": "black", "ls": "-", "lw": 2.0}),
}


def story(events: Sequence[Mapping[str, Any]], onset: int | None, fault: str):
    """[(step, kind, label)] of the run-level marks in the order they happened, numbered."""
    marks = [] if onset is None else [(onset, "onset", f"fault onset{fault}")]
    for e in events:
        kind, step = e.get("event"), e.get("step")
        if kind == "diagnosis":
            p = dict(map(tuple, e.get("ranking", []))).get(e["top"])
            marks.append((step, kind, f"diagnosis {e['top']}" + (f" {p:.0%}" if p else "")))
        elif kind == "action" and e.get("restored_to") is not None:
            extra = [_knob_change(a["remedy"], a["knobs"]) for a in e["actions"][1:]]
            text = f"rollback {step}→{e['restored_to']}" + "".join(f"\n+ {x}" for x in extra)
            marks.append((step, kind, text))
        elif kind == "verification":
            ok = e.get("outcome") == "recovered"
            marks.append((step, "recovered" if ok else "returned",
                          "recovered" if ok else "alarm came back"))  # fmt: skip
        elif kind == "halt":
            marks.append((step, kind, "HALT"))
    return [(s, k, f"{i}. {text}") for i, (s, k, text) in enumerate(marks, 1)]


def _series(records: Sequence[Mapping[str, Any]], name: str) -> tuple[list[int], list[float]]:
    points = [(int(m["step"]), float(m[name])) for m in records if m.get(name) is not None]
    return [s for s, _ in points], [v for _, v in points]


def alarm_points(events, metrics, parts: Sequence[Branch], name: str) -> list[tuple[int, float]]:
    """(step, value) of each alarm on `name`, the value read from the branch the alarm was
    raised in: the first later rollback to a step before the alarm dropped it, else it was
    kept."""
    kept = {int(m["step"]): m for m in metrics}
    by_key = {(b.rollback_step, b.rolled_back_to): {int(r["step"]): r for r in b.records}
              for b in parts}  # fmt: skip
    points = []
    for i, e in enumerate(events):
        if e.get("event") != "alarm" or name not in e.get("signals", ()):
            continue
        step, record = int(e["step"]), None
        for later in events[i + 1 :]:
            if later.get("event") == "action" and later.get("restored_to") is not None:
                if int(later["restored_to"]) < step:
                    branch = by_key.get((int(later["step"]), int(later["restored_to"])), {})
                    record = branch.get(step)
                    break
        record = record if record is not None else kept.get(step)
        if record is not None and record.get(name) is not None:
            points.append((step, float(record[name])))
    return points


def _panel(ax, name, metrics, parts, events, marks, *, window=None, legend=True) -> None:
    steps, values = _series(metrics, name)
    ax.plot(steps, values, lw=1.0, color="tab:blue", label="kept timeline", zorder=3)
    kept = dict(zip(steps, values, strict=True))
    pts = [(s, v) for s, v in zip(steps, values, strict=True)]
    extra = []
    for k, b in enumerate(parts):
        bs, bv = _series(b.records, name)
        pts += list(zip(bs, bv, strict=True))
        extra += bv
        if b.rolled_back_to in kept and bs:  # joined to the step it left from
            bs, bv = [b.rolled_back_to, *bs], [kept[b.rolled_back_to], *bv]
        label = "abandoned branch (rolled back)" if k == 0 else None
        ax.plot(bs, bv, lw=1.4, color="tab:orange", alpha=0.6, label=label, zorder=2)
        ax.axvspan(b.rolled_back_to, b.rollback_step, color="grey", alpha=0.1, lw=0)
    alarms = alarm_points(events, metrics, parts, name)
    if alarms:
        ax.plot(*zip(*alarms, strict=True), ls="none", marker="v", ms=6, color="tab:red",
                label=f"alarm on {name}", zorder=4)  # fmt: skip
        extra += [v for _, v in alarms]
    seen = set()
    for step, kind, _ in marks:
        label, style = _MARK[kind]
        ax.axvline(step, **style, label=None if kind in seen else label, zorder=1)
        seen.add(kind)
    lo_x, hi_x = window or (min(steps, default=0), max(steps, default=1))
    inside = [v for s, v in zip(steps, values, strict=True) if lo_x <= s <= hi_x]
    skip = 0 if window else max(3, len(values) // 200)  # the start-up transient
    limits = robust_limits(inside, extra, skip=skip)
    if limits is not None:
        lo, hi, log = limits
        if log:
            ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        _mark_clipped(ax, [p for p in pts if lo_x <= p[0] <= hi_x], lo, hi)
    if window:
        ax.set_xlim(*window)
    ax.set_ylabel(name, fontsize=8)
    ax.tick_params(labelsize=7)
    if legend:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)


def _mark_clipped(ax, points, lo, hi) -> None:
    """Values outside (lo, hi) as grey triangles on the edge."""
    for edge, side, marker in ((hi, 1, "^"), (lo, -1, "v")):
        xs = [s for s, v in points if (v - edge) * side > 0]
        if xs:
            ax.plot(xs, [edge] * len(xs), ls="none", marker=marker, ms=4, color="0.4",
                    clip_on=False, label="off scale")  # fmt: skip


def _strip(fig, ax, marks) -> None:
    """Each mark's label at its step, left-aligned, in the first of 4 rows where it does not
    overlap the label before it (measured after layout)."""
    ax.set_ylim(0, 1)
    ax.axis("off")
    renderer = fig.canvas.get_renderer()
    ends: list[float] = []  # right edge (pixels) of the last label in each row
    for step, kind, label in sorted(marks, key=lambda m: m[0]):
        color = _MARK[kind][1]["color"]
        text = ax.text(step, 1.0, label, fontsize=7, ha="left", va="top", color=color)
        box = text.get_window_extent(renderer)
        free = [r for r, end in enumerate(ends) if end < box.x0 - 3]
        if free:
            row = free[0]
        elif len(ends) < 4:
            row, ends = len(ends), [*ends, 0.0]
        else:  # 4 rows full: the row whose last label ends first
            row = int(np.argmin(ends))
        ends[row] = box.x1
        y = 1.0 - 0.25 * row
        text.set_y(y)
        ax.plot([step, step], [0, y], color=color, lw=0.6)


def _window(marks, parts, first: int, last: int) -> tuple[float, float] | None:
    """The steps where fm acted (marks and abandoned branches) with a margin, or None when
    there is nothing to zoom into (no mark, or the window is most of the run)."""
    points = [m[0] for m in marks] + [p for b in parts for p in (b.rolled_back_to, b.rollback_step)]
    if not points:
        return None
    lo, hi = min(points), max(points)
    margin = max(10, 0.15 * (hi - lo))
    lo, hi = max(first, lo - margin), min(last, hi + margin)
    return None if hi - lo > 0.6 * (last - first) else (lo, hi)


def _title(name: str, summary: Mapping[str, Any] | None, onset: int | None) -> str:
    summary = summary or {}
    fault = summary.get("fault")
    what = "no fault injected"
    if isinstance(fault, Mapping):
        kind = " ".join(str(fault[k]) for k in ("type", "variant") if fault.get(k))
        what = f"fault {kind} ({fault.get('severity')})"
        what += f" from step {onset}" if onset is not None else ""
    acc = [summary.get(k) for k in ("eval_accuracy_initial", "eval_accuracy_final")]
    if None not in acc:
        what += f"; held-out accuracy {acc[0]:.3f} → {acc[1]:.3f}"
    if summary.get("halted"):
        what += "; halted"
    return f"{name}: {what}" if name else what


def figure(metrics, events, signals=None, title="", *, abandoned=(), summary=None):
    """The report as a matplotlib Figure (see the module docstring). `abandoned`:
    metrics_abandoned.jsonl records; `summary`: summary.json (fault, accuracies)."""
    plt = pyplot()
    line, parts = read_timeline(events), branches(abandoned)
    logged = {k for m in metrics for k in m}
    missing = sorted(set(signals or ()) - logged)
    if missing:
        raise ValueError(
            f"signals {missing} are not in the metrics; logged: {', '.join(sorted(logged))}"
        )
    names = list(signals) if signals else choose_signals(metrics, line)
    if not names:
        raise ValueError(f"nothing to draw: no signal to show among {sorted(logged)}")
    fault = (summary or {}).get("fault")
    named = f" {fault['type']} ({fault.get('severity')})" if isinstance(fault, Mapping) else ""
    onset = fault_onset(summary, metrics, parts)
    marks = story(events, onset, named)
    steps = [int(m["step"]) for m in metrics]
    window = _window(marks, parts, min(steps), max(steps))
    cols, top = (2 if window else 1), int(bool(marks))  # the strip only when there are marks
    fig = plt.figure(figsize=(14 if window else 10, 1.9 * len(names) + 0.6 + 1.2 * top))
    grid = fig.add_gridspec(len(names) + top, cols, height_ratios=[1.0] * (len(names) + top),
                            width_ratios=[1, 1.7] if window else [1])  # fmt: skip
    strip = fig.add_subplot(grid[0, cols - 1]) if marks else None
    rows = []
    for i, name in enumerate(names):
        whole = fig.add_subplot(grid[i + top, 0], sharex=rows[0][0] if rows else None)
        _panel(whole, name, metrics, parts, events, marks, legend=not window)
        zoom = None
        if window:
            zoom = fig.add_subplot(grid[i + top, 1], sharex=strip)
            _panel(zoom, name, metrics, parts, events, marks, window=window)
        rows.append((whole, zoom))
    if window:
        strip.set_xlim(*window)
        rows[0][0].set_title("whole run", fontsize=8)
        rows[-1][1].set_xlabel(f"step (steps {window[0]:.0f}–{window[1]:.0f}: where fm acted)")
    elif strip is not None:
        strip.set_xlim(rows[0][0].get_xlim())
    rows[-1][0].set_xlabel("step")
    fig.suptitle(_title(title, summary, onset), fontsize=9)
    fig.tight_layout()
    if strip is not None:
        _strip(fig, strip, marks)
    return fig

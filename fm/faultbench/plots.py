"""FaultBench pictures: signals around onset per fault type, and a one-page summary of an
`evaluate` report. Need matplotlib (`pip install matplotlib`, or `rftjax[faultbench]`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fm import taxonomy
from fm.faultbench.records import Records
from fm.faultbench.report import run_columns
from fm.faultbench.schema import CLEAN
from fm.report import NO_MATPLOTLIB
from fm.report_figure import pyplot, robust_limits

SEVERITIES = ("subtle", "moderate", "severe")
COLOURS = {"subtle": "#e9a23b", "moderate": "#d8572a", "severe": "#8f1d21"}


def aligned(values: np.ndarray, onset: int, before: int, after: int) -> np.ndarray:
    """values over steps 1..T re-indexed to step - onset in [-before, after) (NaN outside).

    Args:
      values: f[T] one run's signal, step t at index t - 1.
    Returns:
      f[before + after].
    """
    out = np.full(before + after, np.nan)
    for i, rel in enumerate(range(-before, after)):
        t = onset + rel  # 1-based step
        if 1 <= t <= values.size:
            out[i] = values[t - 1]
    return out


def nan_mean(rows: np.ndarray) -> np.ndarray:
    """Column means of f[R, S] over the finite entries; NaN where a column has none (numpy's
    nanmean warns there)."""
    finite = np.isfinite(rows)
    count = finite.sum(axis=0)
    total = np.where(finite, rows, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _mean_around_onset(records, rows, kind, signal, before, window):
    m = records.manifest
    series = [
        aligned(run_columns(records, str(m[kind][i]))[signal], int(m["onset"][i]), before, window)
        for i in rows
        if str(m[kind][i]) in records.runs
    ]
    return (nan_mean(np.asarray(series, float)), len(series)) if series else (None, 0)


def plot_onsets(
    records: Records,
    out_dir: str,
    *,
    window: int,
    before: int = 20,
    log: Callable[[str], None] = print,
) -> list[str]:
    """One PNG per fault type: its taxonomy signals around onset, the mean over runs per
    severity (run counts in the legend) next to the same steps of their clean twins (grey,
    dashed), the onset and the end of the detection window marked; a legend on every panel,
    y range robust to outliers. Returns the paths written; none (with a logged note) without
    matplotlib."""
    try:
        plt = pyplot()
    except ImportError:
        log(f"plots skipped: {NO_MATPLOTLIB}")
        return []
    m = records.manifest
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    rel = np.arange(-before, window)
    for type_id in sorted({t for t in m["type"] if t != CLEAN}):
        signals = [s for s, _ in taxonomy.get(type_id).signals if s in records.steps][:3]
        if not signals:
            continue
        rows = np.flatnonzero(m["type"] == type_id)
        fig, axes = plt.subplots(len(signals), 1, figsize=(8, 2.3 * len(signals) + 0.6),
                                 sharex=True, squeeze=False)  # fmt: skip
        for ax, signal in zip(axes[:, 0], signals, strict=True):
            drawn, after = [], []  # the scale: clean twins and steps before onset; then
            # the faulted runs after onset, as far as 10x that range (else a log scale)
            for severity in SEVERITIES:
                pick = [i for i in rows if m["severity"][i] == severity]
                twin, n_twin = _mean_around_onset(records, pick, "twin", signal, before, window)
                if twin is not None:
                    ax.plot(rel, twin, color="0.55", lw=1, ls="--",
                            label=None if drawn else "clean twins")  # fmt: skip
                    drawn.append(twin)
                mean, n = _mean_around_onset(records, pick, "run_id", signal, before, window)
                if mean is not None:
                    ax.plot(rel, mean, color=COLOURS[severity], lw=1.3,
                            label=f"{severity} (mean of {n})")  # fmt: skip
                    drawn.append(mean[rel < 0])
                    after.append(mean[rel >= 0])
            ax.axvline(0, color="darkred", lw=1.0, ls="--", label="fault onset")
            ax.axvspan(0, window, color="tab:red", alpha=0.05, label=f"{window} steps scored")
            limits = None
            if drawn:
                limits = robust_limits(np.concatenate(drawn), np.concatenate(after), reach=10)
            if limits is not None:
                ax.set_yscale("log" if limits[2] else "linear")
                ax.set_ylim(limits[0], limits[1])
            ax.set_ylabel(signal, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
        spec = taxonomy.get(type_id)
        axes[0, 0].set_title(f"{type_id}: {spec.name} ({len(rows)} runs), around onset",
                             fontsize=9)  # fmt: skip
        axes[-1, 0].set_xlabel("steps from fault onset")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{type_id}.png")
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _heatmap(ax, values: np.ndarray, rows: list[str], cols: list[str], title: str) -> None:
    """f[R, C] in [0, 1] with each value written in its cell (– where NaN)."""
    ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for (r, c), v in np.ndenumerate(values):
        text = "–" if np.isnan(v) else f"{v:.2f}"
        ax.text(c, r, text, ha="center", va="center", fontsize=6,
                color="white" if np.isnan(v) or v < 0.6 else "black")  # fmt: skip
    ax.set_title(title, fontsize=8)


def _table(dets: Mapping[str, Any], part: str, keys: list[str], field: str) -> np.ndarray:
    """f[detectors, keys]: `dets[name][part][key][field]`, NaN where absent or None."""
    out = np.full((len(dets), len(keys)), np.nan)
    for r, result in enumerate(dets.values()):
        for c, key in enumerate(keys):
            value = result[part].get(key, {}).get(field)
            out[r, c] = np.nan if value is None else value
    return out


def summary_figure(report: Mapping[str, Any], path: str) -> str:
    """Writes `summary(report)` to `path` (PNG) and returns it."""
    plt = pyplot()
    fig = summary(report)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def summary(report: Mapping[str, Any]):
    """One page for an `evaluate` report, as a matplotlib Figure: F1 / precision / recall a
    detector, F1 by family, recall by fault type, false alarms per 1,000 clean steps with the
    median delay; the campaign's description above, the report's notes below."""
    plt = pyplot()
    dets = report["detectors"]
    names = list(dets)
    families = [f for f in taxonomy.FAMILIES if any(f in r["by_family"] for r in dets.values())]
    types = sorted({t for r in dets.values() for t in r["by_type"]})
    fig, axes = plt.subplots(2, 2, figsize=(13, 3.0 + 0.5 * len(names)))
    y = np.arange(len(names))
    ax = axes[0, 0]
    for k, (key, colour) in enumerate((("f1", "black"), ("precision", "tab:blue"),
                                        ("recall", "tab:orange"))):  # fmt: skip
        ax.barh(y + (k - 1) * 0.27, [dets[n]["overall"][key] for n in names], height=0.27,
                color=colour, label=key)  # fmt: skip
    for i, n in enumerate(names):
        ax.text(1.01, i, f"F1 {dets[n]['overall']['f1']:.2f}", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title("event-level scores (no point adjustment)", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    f1 = _table(dets, "by_family", families, "f1")
    _heatmap(axes[0, 1], f1, names, families, "F1 by family")
    recall = _table(dets, "by_type", types, "recall")
    _heatmap(axes[1, 0], recall, names, types, "recall by fault type")
    ax = axes[1, 1]
    fa = [dets[n]["overall"]["false_alarms_per_1000_clean_steps"] or 0.0 for n in names]
    ax.barh(y, fa, color="tab:red")
    for i, n in enumerate(names):
        delay = dets[n]["overall"]["delay_median"]
        ax.text(fa[i], i, f"  delay {delay:g}" if delay is not None else "  no detection",
                va="center", fontsize=7)  # fmt: skip
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_title("false alarms per 1,000 clean steps (median delay in steps)", fontsize=8)
    data, campaign = report["data"], report.get("campaign") or {}
    head = (f"{campaign.get('name', 'FaultBench')} · split {report['split']}: {data['runs']} "
            f"runs ({data['faulted_runs']} faulted, {data['clean_runs']} clean), "
            f"{data['steps']} steps, window {report['window']}")  # fmt: skip
    lines = [head, *(f"{campaign['description']}",) * bool(campaign.get("description"))]
    fig.suptitle("\n".join(lines), fontsize=9)
    if report.get("notes"):
        fig.text(0.01, 0.005, "\n".join(f"Note: {n}" for n in report["notes"]), fontsize=7,
                 va="bottom", color="dimgrey")  # fmt: skip
    fig.tight_layout(rect=(0, 0.03 * (1 + len(report.get("notes", []))), 1, 1))
    return fig

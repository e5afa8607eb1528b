"""Campaigns: many training runs (clean and faulted) in worker processes, resumable.

A run is a name, a seed and its fault; its workdir is `out/name`. A run whose
`summary.json` exists is finished and skipped, so an interrupted campaign picks up where it
stopped. The clean run of each seed goes first and keeps all its checkpoints; the faulted runs
of that seed fork from it just before their onset (`TrainConfig.fork_from`): a fault is the
identity before onset, so the steps before it are neither recomputed nor changed.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, NamedTuple

import numpy as np

from faults import SEVERITIES, SPECS
from rftjax.config import TrainConfig


class Run(NamedTuple):
    name: str  # also the workdir below the campaign folder
    seed: int
    fault: dict[str, Any]  # TrainConfig fault fields (empty: a clean run)

    @property
    def clean(self) -> bool:
        return not self.fault


def severity_runs(
    seeds: Sequence[int], types: Sequence[str], severities: Sequence[str] = SEVERITIES
) -> list[Run]:
    """A clean run per seed and every (type, severity) at its default variant; seed-major, so
    the first seed's results come first."""
    runs = [Run(f"s{seed}/clean", seed, {}) for seed in seeds]
    for seed in seeds:
        for type_id in types:
            for severity in severities:
                fault = {"fault": type_id, "fault_severity": severity}
                runs.append(Run(f"s{seed}/{type_id}-{severity}", seed, fault))
    return runs


def read_summary(out: str, run: Run) -> dict[str, Any] | None:
    path = os.path.join(out, run.name, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _clean_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"s{seed}", "clean")


def config_of(base: TrainConfig, out: str, run: Run) -> TrainConfig:
    """The run's configuration: `base` with its workdir, seed and fault. Clean runs keep every
    checkpoint; faulted runs fork from their seed's clean run just before onset."""
    workdir = os.path.join(out, run.name)
    resume = os.path.isdir(os.path.join(workdir, "checkpoints"))
    extra: dict[str, Any] = dict(run.fault)
    if run.clean:
        extra.update(fault="none", keep_checkpoints=base.steps // base.checkpoint_every + 1)
    else:
        extra["fork_from"] = _clean_dir(out, run.seed)
    return dataclasses.replace(base, workdir=workdir, seed=run.seed, resume=resume, **extra)


def _run_in_process(cfg: TrainConfig) -> tuple[str, float, str]:
    """One run inside a worker process (compiled functions are reused across its runs)."""
    from rftjax.train import loop

    os.makedirs(cfg.workdir, exist_ok=True)
    t0 = time.time()
    try:
        loop.run(cfg)
    except Exception as e:  # a failed run is reported; the campaign goes on
        return cfg.workdir, time.time() - t0, f"{type(e).__name__}: {e}"
    return cfg.workdir, time.time() - t0, ""


def run_campaign(
    runs: Sequence[Run],
    out: str,
    base: TrainConfig,
    *,
    workers: int = 1,
    report: Callable[[str], None] = print,
) -> list[Run]:
    """Runs what is not finished yet (clean runs first) in `workers` processes; returns the
    runs that failed. Each worker keeps its compiled steps, so a fault type compiles once per
    worker, whatever its seeds, severities and onsets."""
    todo = [r for r in runs if read_summary(out, r) is None]
    report(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to go")
    failed: list[Run] = []
    done = 0
    context = multiprocessing.get_context("spawn")  # JAX does not survive fork
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for phase in ([r for r in todo if r.clean], [r for r in todo if not r.clean]):
            futures = {pool.submit(_run_in_process, config_of(base, out, r)): r for r in phase}
            for future in as_completed(futures):
                run = futures[future]
                _, seconds, error = future.result()
                done += 1
                if error:
                    failed.append(run)
                    report(f"[{done}/{len(todo)}] {run.name}: FAILED: {error}")
                    continue
                s = read_summary(out, run)
                report(
                    f"[{done}/{len(todo)}] {run.name}: accuracy {s['eval_accuracy_initial']:.3f}"
                    f" -> {s['eval_accuracy_final']:.3f} ({seconds:.0f} s)"
                )
    return failed


def first_alarm_after(summary: dict[str, Any], onset: int) -> int | None:
    """Steps from onset to the first alarm at or after it (None: no alarm)."""
    later = [a["step"] for a in summary["alarms"] if a["step"] >= onset]
    return min(later) - onset if later else None


def severity_table(out: str, runs: Sequence[Run], *, window: int = 200) -> dict[str, Any]:
    """Final held-out accuracy per (type, severity): mean over seeds and its change from the
    clean runs of the same seeds (paired by seed). With fm on, also how often the in-step
    detector raised an alarm within `window` steps of onset (and the median delay), and the
    clean runs' alarms per 1,000 steps from the same onset on."""
    clean = {r.seed: read_summary(out, r) for r in runs if r.clean}
    rows: dict[str, dict[str, Any]] = {}
    onsets = []
    for run in runs:
        s = read_summary(out, run)
        if run.clean or s is None or clean.get(run.seed) is None:
            continue
        fault = s["fault"]
        onsets.append(fault["onset"])
        key = f"{fault['type']}-{fault['severity']}"
        row = rows.setdefault(key, {"deltas": [], "finals": [], "delays": []})
        row.update(type=fault["type"], variant=fault["variant"], severity=fault["severity"])
        row["magnitude"] = fault["magnitude"]
        row["finals"].append(s["eval_accuracy_final"])
        row["deltas"].append(s["eval_accuracy_final"] - clean[run.seed]["eval_accuracy_final"])
        delay = first_alarm_after(s, fault["onset"])
        row["delays"].append(delay if delay is not None and delay < window else None)
    for row in rows.values():
        row["final_mean"] = float(np.mean(row["finals"]))
        row["delta_mean"] = float(np.mean(row["deltas"]))
        row["seeds"] = len(row["finals"])
        hits = [d for d in row["delays"] if d is not None]
        row["detected"] = len(hits) / len(row["delays"])
        row["delay_median"] = float(np.median(hits)) if hits else None
    done = [c for c in clean.values() if c is not None]
    onset = min(onsets) if onsets else 1
    clean_alarms = sum(len([a for a in c["alarms"] if a["step"] >= onset]) for c in done)
    clean_steps = sum(max(c["steps_completed"] - onset + 1, 0) for c in done)
    finals = [c["eval_accuracy_final"] for c in done]
    return {
        "clean_final_mean": float(np.mean(finals)) if finals else float("nan"),
        "clean_finals": finals,
        "clean_alarms_per_1000_steps": 1000 * clean_alarms / clean_steps if clean_steps else 0.0,
        "fm": done[0]["fm"] if done else "off",
        "window": window,
        "rows": rows,
    }


def markdown(table: dict[str, Any]) -> str:
    """The severity table as Markdown: one line per type, one column per severity."""
    by_type: dict[str, dict[str, dict]] = {}
    for row in table["rows"].values():
        by_type.setdefault(row["type"], {})[row["severity"]] = row
    fm = table["fm"] != "off"
    legend = "Cell: magnitude: final accuracy (change vs clean, seeds)"
    if fm:
        legend += (
            f"; detected: runs with an alarm within {table['window']} steps of onset (median "
            f"delay). Clean runs from the same onset on: "
            f"{table['clean_alarms_per_1000_steps']:.2f} alarms per 1,000 steps."
        )
    lines = [
        f"Clean final accuracy: {table['clean_final_mean']:.3f} "
        f"(seeds: {', '.join(f'{x:.3f}' for x in table['clean_finals'])})",
        "",
        legend,
        "",
        "| type | variant | " + " | ".join(SEVERITIES) + " |",
        "|---|---|" + "---|" * len(SEVERITIES),
    ]
    for type_id in SPECS:
        if type_id not in by_type:
            continue
        cells = []
        for severity in SEVERITIES:
            row = by_type[type_id].get(severity)
            if row is None:
                cells.append("")
                continue
            cell = (
                f"{row['magnitude']:g}: {row['final_mean']:.3f} "
                f"({row['delta_mean']:+.3f}, n={row['seeds']})"
            )
            if fm:
                delay = row["delay_median"]
                cell += f"; detected {row['detected']:.0%}"
                cell += f" ({delay:.0f})" if delay is not None else ""
            cells.append(cell)
        variant = next(iter(by_type[type_id].values()))["variant"]
        lines.append(f"| {type_id} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""Campaign runs: many training runs (clean and faulted) in worker processes (or as Ray tasks:
`on_ray`), resumable.

A run is a name, a seed, its fault and its settings; its workdir is `out/name`. A run whose
`summary.json` exists is finished and skipped, so an interrupted campaign picks up where it
stopped. The clean run of each (seed, settings) goes first and keeps all its checkpoints; the
faulted runs with that seed and those settings fork from it just before their onset
(`TrainConfig.fork_from`): a fault is the identity before onset, so the steps before it are
neither recomputed nor changed. Also the severity table of `launch.faultbench severity`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from faults import SEVERITIES, SPECS
from rftjax.config import RUNNER, SPEC, RLConfig, TrainConfig, names

if TYPE_CHECKING:
    from rftjax.campaign.on_ray import RayOptions


class Run(NamedTuple):
    name: str  # also the workdir below the campaign folder
    seed: int
    fault: dict[str, Any]  # TrainConfig fault fields (empty: a clean run)
    config: str = ""  # JSON of this run's settings over the campaign base ("" for none)
    split: str = "none"  # "train" | "eval" | "none"
    fork: bool = True  # a faulted run starts from its clean twin's checkpoint before onset

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
    """The run's summary if it finished (None if absent, or if the run was preempted: it
    resumes from its checkpoint when the campaign runs again)."""
    path = os.path.join(out, run.name, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    return None if summary.get("preempted") else summary


def config_prefix(config: str) -> str:
    """Folder of the runs with these settings: none for the base, else a short hash."""
    return f"c{hashlib.sha1(config.encode()).hexdigest()[:8]}/" if config else ""


def twin_name(seed: int, config: str = "") -> str:
    """Name of the clean run that the faulted runs of (seed, config) fork from."""
    return f"{config_prefix(config)}s{seed}/clean"


# Settings a campaign may change (declared in `rftjax.config`): outer-loop fields, RL step
# fields and knobs. Seeds and faults come from the runs; workdir, resume and fork_from from the
# runner, which also sets fm, fm_policy and record_trajectories (generate needs the detector).
_TRAIN_KEYS = tuple(k for k in names(TrainConfig, campaign=SPEC) if k != "knobs")
_RL_KEYS = names(RLConfig, campaign=SPEC)
OVERRIDE_KEYS = (*_TRAIN_KEYS, *_RL_KEYS, "knobs")
_RUNNER_KEYS = names(TrainConfig, campaign=RUNNER)


def apply_overrides(cfg: TrainConfig, settings: dict[str, Any]) -> TrainConfig:
    """`cfg` with campaign settings ({TrainConfig or RLConfig field: value, "knobs": {...}});
    errors name the bad key or value and what is accepted."""
    from rftjax.knobs import make_knobs

    unknown = sorted(set(settings) - set(OVERRIDE_KEYS) - set(_RUNNER_KEYS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; accepted: {', '.join(OVERRIDE_KEYS)}")
    knobs = {**cfg.knobs, **settings.get("knobs", {})}
    accepted = list(inspect.signature(make_knobs).parameters)
    bad = sorted(set(knobs) - set(accepted))
    if bad:
        raise ValueError(f"unknown knob(s) {bad}; accepted: {', '.join(accepted)}")
    rl = {k: v for k, v in settings.items() if k in _RL_KEYS}
    if "task" in settings and "max_new_tokens" not in settings:
        from rftjax.tasks import response_slots

        rl["max_new_tokens"] = response_slots(settings["task"])
    outer = {k: v for k, v in settings.items() if k in _TRAIN_KEYS or k in _RUNNER_KEYS}
    try:
        make_knobs(**knobs)
        return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, **rl), knobs=knobs, **outer)
    except TypeError as e:  # a value of the wrong type, e.g. "steps": "ten"
        raise ValueError(f"bad setting value in {settings}: {e}") from e


def overrides_of(run: Run) -> dict[str, Any]:
    return json.loads(run.config) if run.config else {}


def config_of(base: TrainConfig, out: str, run: Run) -> TrainConfig:
    """The run's configuration: `base` with its settings, workdir, seed and fault. Clean runs
    keep every checkpoint; faulted runs fork from their clean twin just before onset."""
    cfg = apply_overrides(base, overrides_of(run))
    workdir = os.path.join(out, run.name)
    resume = os.path.isdir(os.path.join(workdir, "checkpoints"))
    extra: dict[str, Any] = dict(run.fault)
    if run.clean:
        extra.update(fault="none", keep_checkpoints=cfg.steps // cfg.checkpoint_every + 1)
    elif run.fork:
        extra.update(fork_from=os.path.join(out, twin_name(run.seed, run.config)))
        extra.update(keep_checkpoints=1)  # only for resuming: nothing forks from a faulted run
    # Runs share one warm-up cache: with a fixed init_seed, one warm-up serves every seed.
    extra.update(warmup_cache=os.path.join(out, "warmup"))
    return dataclasses.replace(cfg, workdir=workdir, seed=run.seed, resume=resume, **extra)


def run_one(base: TrainConfig, out: str, run: Run) -> tuple[float, str]:
    """One run where it executes (a worker process, or a Ray task): its configuration is made
    there, so a run started again after its worker died resumes from its last checkpoint.
    Returns (seconds, error: "" if it finished). Compiled functions are reused across the
    runs of a worker."""
    from rftjax.train import loop

    cfg = config_of(base, out, run)
    os.makedirs(cfg.workdir, exist_ok=True)
    t0 = time.time()
    try:
        loop.run(cfg)
    except Exception as e:  # a failed run is reported; the campaign goes on
        return time.time() - t0, f"{type(e).__name__}: {e}"
    return time.time() - t0, ""


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _progress_line(
    out: str, run: Run, seconds: float, error: str, done: int, total: int, t0: float
) -> str:
    """The campaign's line for a run just finished: progress, elapsed time, an estimate of the
    time left, and the run's accuracy (or its error)."""
    elapsed = time.time() - t0
    left = elapsed / max(done, 1) * (total - done)
    progress = f"[{done}/{total} {100 * done // total}% {_clock(elapsed)}, ~{_clock(left)} left]"
    if error:
        return f"{progress} {run.name}: FAILED: {error}"
    s = read_summary(out, run)
    return (
        f"{progress} {run.name}: accuracy {s['eval_accuracy_initial']:.3f}"
        f" -> {s['eval_accuracy_final']:.3f} ({seconds:.0f} s)"
    )


def _in_process_pool(
    todo: Sequence[Run], out: str, base: TrainConfig, *, workers: int, runs_per_worker: int | None
) -> Iterator[tuple[Run, float, str]]:
    """The local executor: `run_one` in `workers` processes, clean runs first; yields (run,
    seconds, error) as runs finish."""
    context = multiprocessing.get_context("spawn")  # JAX does not survive fork
    for phase in ([r for r in todo if r.clean], [r for r in todo if not r.clean]):
        # A fresh pool every `runs_per_worker` runs a worker (the executor's own
        # max_tasks_per_child can hang on Python 3.11 when it replaces a worker).
        size = len(phase) if runs_per_worker is None else runs_per_worker * workers
        for chunk in (phase[i : i + size] for i in range(0, len(phase), max(size, 1))):
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {pool.submit(run_one, base, out, r): r for r in chunk}
                for future in as_completed(futures):
                    yield futures[future], *future.result()


# Runs a worker process takes before a fresh one replaces it. A process keeps every step it
# compiled, and each holds memory mappings of its machine code: after about 50 distinct
# programs (campaigns across conditions compile one per condition, type and variant) LLVM
# failed with "Cannot allocate memory" and the worker died (Linux's default limit of 65,530
# mappings a process). A fresh worker compiles again only the programs its runs need.
RUNS_PER_WORKER = 25


def run_campaign(
    runs: Sequence[Run],
    out: str,
    base: TrainConfig,
    *,
    workers: int = 1,
    runs_per_worker: int | None = None,
    ray_options: RayOptions | None = None,
    report: Callable[[str], None] = print,
) -> list[Run]:
    """Runs what is not finished yet (clean runs first) in `workers` processes, or as Ray
    tasks with `ray_options` (`workers` then does not apply: the cluster's resources decide);
    returns the runs that failed. Each worker keeps its compiled steps, so a fault type compiles
    once per worker, whatever its seeds, severities and onsets; `runs_per_worker` starts fresh
    workers after that many runs each (closed-loop runs each compile their own managed step,
    and a worker that keeps them all ran out of memory after ~35 of them). Reports a progress
    line per run with the elapsed time and an estimate of the time left."""
    todo = [r for r in runs if read_summary(out, r) is None]
    report(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to go")
    if not todo:
        return []
    if ray_options is None:
        finished = _in_process_pool(
            todo, out, base, workers=workers, runs_per_worker=runs_per_worker
        )
    else:
        from rftjax.campaign import on_ray

        # Tasks run on other machines, in other folders: the path must not depend on ours.
        out = os.path.abspath(out)
        finished = on_ray.run_all(
            todo, out, base, ray_options, runs_per_worker=runs_per_worker, report=report
        )
    failed: list[Run] = []
    t0 = time.time()
    for done, (run, seconds, error) in enumerate(finished, 1):
        if error:
            failed.append(run)
        report(_progress_line(out, run, seconds, error, done, len(todo), t0))
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

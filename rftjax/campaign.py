"""Campaigns: many training runs (clean and faulted) in worker processes, resumable.

A run is a name, a seed, its fault and its settings; its workdir is `out/name`. A run whose
`summary.json` exists is finished and skipped, so an interrupted campaign picks up where it
stopped. The clean run of each (seed, settings) goes first and keeps all its checkpoints; the
faulted runs with that seed and those settings fork from it just before their onset
(`TrainConfig.fork_from`): a fault is the identity before onset, so the steps before it are
neither recomputed nor changed.

FaultBench campaigns are described by a JSON spec (`load_spec`, `resolve`), run by `generate`
with the in-step detector on and trajectories recorded, and assembled into Parquet tables in
the schema of `fm.bench.schema` (`assemble`, re-done from the run folders every time).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, NamedTuple

import numpy as np

import faults
from faults import SEVERITIES, SPECS
from fm import taxonomy
from fm.bench import records, schema
from rftjax.config import RLConfig, TrainConfig


class Run(NamedTuple):
    name: str  # also the workdir below the campaign folder
    seed: int
    fault: dict[str, Any]  # TrainConfig fault fields (empty: a clean run)
    config: str = ""  # JSON of this run's settings over the campaign base ("" for none)
    split: str = "none"  # "train" | "eval" | "none"

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


def _prefix(config: str) -> str:
    """Folder of the runs with these settings: none for the base, else a short hash."""
    return f"c{hashlib.sha1(config.encode()).hexdigest()[:8]}/" if config else ""


def twin_name(seed: int, config: str = "") -> str:
    """Name of the clean run that the faulted runs of (seed, config) fork from."""
    return f"{_prefix(config)}s{seed}/clean"


# Settings a campaign may change: outer-loop fields, RL step fields and knobs. Seeds and faults
# come from the runs; workdir, resume, fork_from, fm and record_trajectories from the runner.
_TRAIN_KEYS = (
    "task",
    "model",
    "model_overrides",
    "steps",
    "warmup_steps",
    "warmup_batch_size",
    "warmup_lr",
    "eval_every",
    "eval_size",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
)
_RL_KEYS = tuple(f.name for f in dataclasses.fields(RLConfig))
OVERRIDE_KEYS = (*_TRAIN_KEYS, *_RL_KEYS, "knobs")


def apply_overrides(cfg: TrainConfig, settings: dict[str, Any]) -> TrainConfig:
    """`cfg` with campaign settings ({TrainConfig or RLConfig field: value, "knobs": {...}});
    errors name the bad key or value and what is accepted."""
    from rftjax.knobs import make_knobs

    unknown = sorted(set(settings) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; accepted: {', '.join(OVERRIDE_KEYS)}")
    knobs = {**cfg.knobs, **settings.get("knobs", {})}
    accepted = list(inspect.signature(make_knobs).parameters)
    bad = sorted(set(knobs) - set(accepted))
    if bad:
        raise ValueError(f"unknown knob(s) {bad}; accepted: {', '.join(accepted)}")
    rl = {k: v for k, v in settings.items() if k in _RL_KEYS}
    if "task" in settings and "max_new_tokens" not in settings:
        from rftjax.tasks import make_task

        rl["max_new_tokens"] = make_task(settings["task"], seed=0).max_new_tokens_hint
    outer = {k: v for k, v in settings.items() if k in _TRAIN_KEYS}
    try:
        make_knobs(**knobs)
        return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, **rl), knobs=knobs, **outer)
    except TypeError as e:  # a value of the wrong type, e.g. "steps": "ten"
        raise ValueError(f"bad setting value in {settings}: {e}") from e


def _overrides_of(run: Run) -> dict[str, Any]:
    return json.loads(run.config) if run.config else {}


def config_of(base: TrainConfig, out: str, run: Run) -> TrainConfig:
    """The run's configuration: `base` with its settings, workdir, seed and fault. Clean runs
    keep every checkpoint; faulted runs fork from their clean twin just before onset."""
    cfg = apply_overrides(base, _overrides_of(run))
    workdir = os.path.join(out, run.name)
    resume = os.path.isdir(os.path.join(workdir, "checkpoints"))
    extra: dict[str, Any] = dict(run.fault)
    if run.clean:
        extra.update(fault="none", keep_checkpoints=cfg.steps // cfg.checkpoint_every + 1)
    else:
        extra.update(fork_from=os.path.join(out, twin_name(run.seed, run.config)))
        extra.update(keep_checkpoints=1)  # only for resuming: nothing forks from a faulted run
    return dataclasses.replace(cfg, workdir=workdir, seed=run.seed, resume=resume, **extra)


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


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


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
    worker, whatever its seeds, severities and onsets. Reports a progress line per run with the
    elapsed time and an estimate of the time left."""
    todo = [r for r in runs if read_summary(out, r) is None]
    report(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to go")
    failed: list[Run] = []
    done = 0
    t0 = time.time()
    context = multiprocessing.get_context("spawn")  # JAX does not survive fork
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for phase in ([r for r in todo if r.clean], [r for r in todo if not r.clean]):
            futures = {pool.submit(_run_in_process, config_of(base, out, r)): r for r in phase}
            for future in as_completed(futures):
                run = futures[future]
                _, seconds, error = future.result()
                done += 1
                elapsed = time.time() - t0
                progress = (
                    f"[{done}/{len(todo)} {100 * done // len(todo)}% {_clock(elapsed)}, "
                    f"~{_clock(elapsed / done * (len(todo) - done))} left]"
                )
                if error:
                    failed.append(run)
                    report(f"{progress} {run.name}: FAILED: {error}")
                    continue
                s = read_summary(out, run)
                report(
                    f"{progress} {run.name}: accuracy {s['eval_accuracy_initial']:.3f}"
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


# FaultBench campaign specs ------------------------------------------------------------------

SPLITS = ("train", "eval")
_SPEC_KEYS = ("name", "description", "base", "splits", "grid", "runs")
_GRID_KEYS = (
    "types",
    "severities",
    "magnitudes",
    "variants",
    "onsets",
    "durations",
    "seeds",
    "overrides",
    "deal",
    "repeat",
    "shuffle",
)
_RUN_KEYS = ("seed", "type", "severity", "variant", "magnitude", "onset", "duration", "overrides")
BUILTINS = ("standard", "smoke")


class Campaign(NamedTuple):
    """A resolved spec: its name, the settings every run shares, and the runs (clean twins
    first). `spec` is the JSON it came from."""

    name: str
    base: dict[str, Any]
    runs: list[Run]
    spec: dict[str, Any]


class _Entry(NamedTuple):
    where: str  # for error messages: "grid[0]", "runs[3]"
    seed: int
    type: str  # schema.CLEAN: only the clean run of (seed, overrides)
    severity: str
    magnitude: float | None
    variant: str
    onset: int | None  # None: just after the first third of the run's steps
    duration: int
    overrides: dict[str, Any]


def _check_keys(where: str, given: Any, accepted: Sequence[str]) -> None:
    if not isinstance(given, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(given).__name__}")
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; accepted: {', '.join(accepted)}")


def _int_list(where: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{where} must be a list of integers, got {value!r}")
    return value


def _splits(value: Any) -> dict[int, str]:
    """seed → split from {"train": [seeds], "eval": [seeds]}; seeds may not be shared."""
    if value is None:
        return {}
    _check_keys("splits", value, SPLITS)
    of: dict[int, str] = {}
    for split, seeds in value.items():
        for seed in _int_list(f"splits.{split}", seeds):
            if of.get(seed, split) != split:
                raise ValueError(f"seed {seed} is in both splits: train and eval seeds must differ")
            of[seed] = split
    return of


def _seeds(where: str, value: Any, splits: dict[int, str]) -> list[int]:
    if isinstance(value, str):
        if value not in SPLITS:
            raise ValueError(f"{where}.seeds={value!r}: give a list or a split: {SPLITS}")
        seeds = [s for s, split in splits.items() if split == value]
        if not seeds:
            raise ValueError(f"{where}.seeds={value!r}, but the spec's splits give it no seeds")
        return seeds
    return _int_list(f"{where}.seeds", value)


# Types that act on tool calls: they need a task with tools (e.g. calc).
TOOL_TYPES = tuple(t for t in SPECS if taxonomy.get(t).family == "tool-environment")


@functools.cache
def has_tools(task: str) -> bool:
    """Whether the task's policy calls tools (False for a task that cannot be built)."""
    from rftjax.tasks import make_task

    try:
        return make_task(task, seed=0).tools is not None
    except (ValueError, OSError):
        return False


def _types(where: str, value: Any, tools: bool) -> list[str]:
    """Type ids; "all" is every injectable type of the catalog as it is now that the task can
    carry (tool types only on a task with tools)."""
    if value == "all":
        return [t for t in SPECS if tools or t not in TOOL_TYPES]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}.types must be 'all' or a list of type ids, got {value!r}")
    return value


def _grid_entries(
    where: str, grid: dict[str, Any], splits: dict[int, str], base_task: str
) -> list[_Entry]:
    """The grid's runs: the product of its lists on every seed, or with `deal` = k the product
    (repeated `repeat` times, shuffled with seed `shuffle`) dealt k runs a seed."""
    _check_keys(where, grid, _GRID_KEYS)
    if "seeds" not in grid:
        raise ValueError(f"{where}: 'seeds' is required (a list, 'train' or 'eval')")
    if "severities" in grid and "magnitudes" in grid:
        raise ValueError(f"{where}: give 'severities' or 'magnitudes', not both")
    seeds = _seeds(where, grid["seeds"], splits)
    strengths = [("custom", float(m)) for m in grid.get("magnitudes", [])] or [
        (s, None) for s in grid.get("severities", list(SEVERITIES))
    ]
    combos = []
    tools = has_tools(grid.get("overrides", {}).get("task", base_task))
    for type_id in _types(where, grid.get("types", "all"), tools):
        variants = grid.get("variants", [""])
        if variants == "all" and type_id != schema.CLEAN:
            variants = list(faults.spec(type_id).variants)
        combos += itertools.product(
            [type_id],
            strengths,
            variants,
            grid.get("onsets", [None]),
            grid.get("durations", [-1]),
        )
    # Each replicate is shuffled on its own, so that dealt replicates use different seeds.
    rng = np.random.default_rng(int(grid["shuffle"])) if "shuffle" in grid else None
    replicates = []
    for _ in range(int(grid.get("repeat", 1))):
        order = rng.permutation(len(combos)) if rng is not None else range(len(combos))
        replicates += [combos[i] for i in order]
    combos = replicates
    deal = grid.get("deal")
    if deal is None:
        pairs = [(seed, c) for seed in seeds for c in combos]
    else:
        if not isinstance(deal, int) or deal < 1:
            raise ValueError(f"{where}.deal must be an integer >= 1, got {deal!r}")
        pairs = [(seeds[(i // deal) % len(seeds)], c) for i, c in enumerate(combos)]
    overrides = grid.get("overrides", {})
    return [
        _Entry(where, seed, t, sev, mag, v, onset, duration, overrides)
        for seed, (t, (sev, mag), v, onset, duration) in pairs
    ]


def _run_entry(where: str, run: dict[str, Any]) -> _Entry:
    _check_keys(where, run, _RUN_KEYS)
    for key in ("seed", "type"):
        if key not in run:
            raise ValueError(f"{where}: '{key}' is required")
    magnitude = run.get("magnitude")
    severity = "custom" if magnitude is not None else run.get("severity", "moderate")
    return _Entry(
        where,
        run["seed"],
        run["type"],
        severity,
        magnitude,
        run.get("variant", ""),
        run.get("onset"),
        run.get("duration", -1),
        run.get("overrides", {}),
    )


def _fault_fields(e: _Entry, steps: int) -> dict[str, Any]:
    fields = {
        "fault": e.type,
        "fault_variant": e.variant,
        "fault_onset": e.onset if e.onset is not None else steps // 3 + 1,
        "fault_duration": e.duration,
    }
    if e.magnitude is None:
        fields["fault_severity"] = e.severity
    else:
        fields["fault_magnitude"] = float(e.magnitude)
    return fields


def _run_name(e: _Entry, config: str, fault: dict[str, Any]) -> str:
    strength = f"m{e.magnitude:g}" if e.magnitude is not None else e.severity
    variant = f"-{e.variant}" if e.variant else ""
    duration = f"-d{e.duration}" if e.duration > 0 else ""
    return (
        f"{_prefix(config)}s{e.seed}/{e.type}-{strength}{variant}-o{fault['fault_onset']}{duration}"
    )


def resolve(spec: dict[str, Any]) -> Campaign:
    """Validates a campaign spec and lists its runs; every error names where it is, what was
    wrong and what is accepted."""
    _check_keys("spec", spec, _SPEC_KEYS)
    base = spec.get("base", {})
    _check_keys("base", base, OVERRIDE_KEYS)
    base_cfg = _with_context("base", lambda: base_config("campaign", base))
    splits = _splits(spec.get("splits"))
    grids = spec.get("grid", [])
    grids = [grids] if isinstance(grids, dict) else grids
    entries = [
        e
        for i, g in enumerate(grids)
        for e in _grid_entries(f"grid[{i}]", g, splits, base_cfg.task)
    ]
    entries += [_run_entry(f"runs[{i}]", r) for i, r in enumerate(spec.get("runs", []))]
    if not entries:
        raise ValueError("the spec has no runs: give a 'grid' and/or a 'runs' list")
    twins: dict[tuple[int, str], str] = {}
    faulted: dict[str, Run] = {}
    for e in entries:
        if not isinstance(e.seed, int):
            raise ValueError(f"{e.where}: seed must be an integer, got {e.seed!r}")
        if splits and e.seed not in splits:
            raise ValueError(f"{e.where}: seed {e.seed} is in no split; splits: {spec['splits']}")
        split = splits.get(e.seed, "none")
        _check_keys(f"{e.where}.overrides", e.overrides, OVERRIDE_KEYS)
        config = json.dumps(e.overrides, sort_keys=True) if e.overrides else ""
        twins[(e.seed, config)] = split
        if e.type == schema.CLEAN:
            continue

        def check(e=e, config=config):
            cfg = apply_overrides(base_cfg, e.overrides)
            if e.type in TOOL_TYPES and not has_tools(cfg.task):
                raise ValueError(
                    f"{e.type} acts on tool calls: it needs a task with tools (e.g. calc), "
                    f"not {cfg.task!r}"
                )
            fault = _fault_fields(e, cfg.steps)
            dataclasses.replace(cfg, seed=e.seed, **fault)  # validates type, onset, strength
            return fault

        fault = _with_context(f"{e.where} (seed {e.seed}, {e.type})", check)
        run = Run(_run_name(e, config, fault), e.seed, fault, config, split)
        if run.name in faulted:
            raise ValueError(f"{e.where}: run {run.name} is listed twice")
        faulted[run.name] = run
    clean = [Run(twin_name(s, c), s, {}, c, split) for (s, c), split in twins.items()]
    return Campaign(str(spec.get("name", "campaign")), base, clean + list(faulted.values()), spec)


def _with_context(where: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def base_config(workdir: str, base: dict[str, Any]) -> TrainConfig:
    """Trainer defaults with the campaign's base settings, the in-step detector on and
    trajectories recorded."""
    cfg = TrainConfig(workdir=workdir, fm="detect", record_trajectories=True)
    return apply_overrides(cfg, base)


def builtin_spec(name: str) -> dict[str, Any]:
    """`smoke` (6 tiny runs, seconds each) or `standard` (every injectable type × 3 severities
    × onsets × seeds, each seed a clean run and two faulted ones, so that clean runs hold more
    steps than faults are active; train and eval seeds and onsets differ)."""
    if name == "smoke":
        return {
            "name": "smoke",
            "description": "6 tiny runs for tests and CI: 1-layer model, 4 prompts × 4 samples",
            "base": {
                "model_overrides": "num_layers=1,hidden_size=32,intermediate_size=64,"
                "num_heads=2,num_kv_heads=2",
                "prompts_per_step": 4,
                "group_size": 4,
                "steps": 12,
                "warmup_steps": 10,
                "warmup_batch_size": 16,
                "eval_size": 16,
                "eval_every": 6,
                "checkpoint_every": 3,
                "log_every": 6,
            },
            "splits": {"train": [0], "eval": [1]},
            "runs": [
                {"seed": 0, "type": "CA1", "severity": "severe", "onset": 7},
                {"seed": 0, "type": "PG1", "severity": "severe", "onset": 4, "duration": 3},
                {"seed": 1, "type": "CA1", "severity": "moderate", "onset": 10},
                {"seed": 1, "type": "PG1", "magnitude": 5.0, "onset": 7},
            ],
        }
    if name == "standard":
        per_type = 3 * len(SEVERITIES)  # onsets × severities
        kinds = len(SPECS) - len(TOOL_TYPES), len(TOOL_TYPES)
        n_train = [-(-k * per_type * 3 // 2) for k in kinds]  # 3 replicates, 2 runs a seed
        n_eval = [-(-k * len(SEVERITIES) * 4 // 2) for k in kinds]  # 2 onsets × 2 durations
        train = list(range(sum(n_train)))
        evaluate = list(range(1000, 1000 + sum(n_eval)))
        # Tool types run on the tool task, on seeds of their own.
        tool_task = {"task": "calc", "max_new_tokens": builtin_tool_tokens()}
        tool_grids = [
            {
                "types": list(TOOL_TYPES),
                "onsets": [76, 151, 226],
                "seeds": train[n_train[0] :],
                "deal": 2,
                "repeat": 3,
                "shuffle": 2,
                "overrides": tool_task,
            },
            {
                "types": list(TOOL_TYPES),
                "onsets": [113, 188],
                "durations": [-1, 50],
                "seeds": evaluate[n_eval[0] :],
                "deal": 2,
                "shuffle": 3,
                "overrides": tool_task,
            },
        ]
        return {
            "name": "standard",
            "description": "every injectable type × 3 severities × onsets × seeds, 300 steps, "
            "a clean twin per seed with two faulted runs forked from it",
            "base": {"steps": 300, "checkpoint_every": 75, "eval_every": 100, "log_every": 100},
            "splits": {"train": train, "eval": evaluate},
            "grid": [
                {
                    "types": "all",
                    "onsets": [76, 151, 226],
                    "seeds": train[: n_train[0]],
                    "deal": 2,
                    "repeat": 3,
                    "shuffle": 0,
                },
                {
                    "types": "all",
                    "onsets": [113, 188],
                    "durations": [-1, 50],
                    "seeds": evaluate[: n_eval[0]],
                    "deal": 2,
                    "shuffle": 1,
                },
                *(tool_grids if TOOL_TYPES else []),
            ],
        }
    raise ValueError(f"no built-in campaign {name!r}; built-ins: {', '.join(BUILTINS)}")


def builtin_tool_tokens() -> int:
    """Response slots of the built-in tool task."""
    from rftjax.tasks import make_task

    return make_task("calc", seed=0).max_new_tokens_hint


def load_spec(value: str) -> dict[str, Any]:
    """A built-in spec by name, or the JSON file `value`."""
    if value in BUILTINS:
        return builtin_spec(value)
    if not os.path.isfile(value):
        raise ValueError(
            f"--spec={value!r} is neither a built-in ({', '.join(BUILTINS)}) nor a file"
        )
    with open(value, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{value} is not valid JSON: {e}") from e


def active_steps(steps: int, onset: int, duration: int) -> int:
    """Steps on which a fault with this onset and duration acts in a run of `steps` steps."""
    last = steps if duration <= 0 else min(steps, onset + duration - 1)
    return max(0, last - onset + 1)


def plan(campaign: Campaign) -> dict[str, Any]:
    """Sizes of a campaign before it runs: runs per split, clean-run steps, fault-active steps
    and the RL steps to compute (faulted runs start at their fork step)."""
    base = base_config("campaign", campaign.base)
    sizes = {"runs": len(campaign.runs), "clean_runs": 0, "faulted_runs": 0}
    sizes.update(clean_steps=0, faulty_steps=0, computed_steps=0, splits={})
    for run in campaign.runs:
        cfg = apply_overrides(base, _overrides_of(run))
        sizes["splits"][run.split] = sizes["splits"].get(run.split, 0) + 1
        if run.clean:
            sizes["clean_runs"] += 1
            sizes["clean_steps"] += cfg.steps
            sizes["computed_steps"] += cfg.steps
            continue
        onset, duration = run.fault["fault_onset"], run.fault["fault_duration"]
        sizes["faulted_runs"] += 1
        sizes["faulty_steps"] += active_steps(cfg.steps, onset, duration)
        fork = (onset - 1) // cfg.checkpoint_every * cfg.checkpoint_every
        sizes["computed_steps"] += cfg.steps - fork
    return sizes


# FaultBench records -------------------------------------------------------------------------


def _labels(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """The fault columns of a run, from the fault its summary recorded."""
    fault = summary["fault"]
    if run.clean or fault == "none":
        clean = schema.CLEAN
        return dict(type=clean, family=clean, severity=clean, variant="", magnitude=np.nan,
                    onset=-1, duration=0)  # fmt: skip
    return {
        "type": fault["type"],
        "family": taxonomy.family_of(fault["type"]),
        "severity": fault["severity"],
        "variant": fault["variant"],
        "magnitude": float(fault["magnitude"]),
        "onset": int(fault["onset"]),
        "duration": int(fault["duration"]),
    }


def _manifest_row(run: Run, summary: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    config = {**base, **_overrides_of(run)}
    return {
        "run_id": run.name,
        "split": run.split,
        **_labels(run, summary),
        "seed": run.seed,
        "twin": twin_name(run.seed, run.config),
        "config": json.dumps(config, sort_keys=True),
        "task": summary["task"],
        "algo": summary["algo"],
        "steps": summary["steps_completed"],
        **{k: summary[k] for k in ("eval_accuracy_initial", "eval_accuracy_final")},
        **{k: summary[k] for k in ("eval_reward_initial", "eval_reward_final")},
        "steps_completed": summary["steps_completed"],
        "alarms": len(summary["alarms"]),
        "wall_seconds": summary["wall_seconds"],
    }


def _read_metrics(out: str, run: Run) -> list[dict[str, Any]]:
    from rftjax.train.logs import read_jsonl

    rows = read_jsonl(os.path.join(out, run.name, "metrics.jsonl"))
    steps = [r["step"] for r in rows]
    if steps != list(range(1, len(rows) + 1)):
        raise ValueError(f"{run.name}/metrics.jsonl does not hold steps 1..{len(rows)} in order")
    return rows


def _metric_names(out: str, runs: Sequence[Run]) -> list[str]:
    """Every metric any run logged, sorted (the extra columns of steps.parquet)."""
    fixed = set(schema.names("steps"))
    found: set[str] = set()
    for run in runs:
        for row in _read_metrics(out, run):
            found.update(row)
    return sorted(found - fixed)


def _step_columns(run: Run, rows: list[dict], labels: dict, metrics: list[str]) -> dict:
    n = len(rows)
    columns = {k: [labels[k]] * n for k in ("type", "family", "severity")}
    columns.update(run_id=[run.name] * n, split=[run.split] * n, seed=np.full(n, run.seed))
    columns["step"] = np.arange(1, n + 1)
    columns["fault_active"] = [int(r.get("fault_active", 0.0) > 0) for r in rows]
    for name in metrics:
        columns[name] = np.array([r.get(name, np.nan) for r in rows], np.float64)
    return columns


def _trajectory_columns(
    run: Run, rows: list[dict], labels: dict, active: list[int], prompts_per_step: int
) -> dict:
    derived = {"run_id", "split", "type", "family", "severity", "step", "fault_active"}
    names = [c.name for c in schema.TRAJECTORIES if c.name not in derived | {"prompt_id"}]
    per_step = [len(r["group"]) for r in rows]
    n = sum(per_step)
    columns = {k: [labels[k]] * n for k in ("type", "family", "severity")}
    columns.update(run_id=[run.name] * n, split=[run.split] * n)
    steps = np.repeat([r["step"] for r in rows], per_step)
    columns["step"] = steps
    columns["fault_active"] = np.asarray(active)[steps - 1]
    for name in names:
        columns[name] = np.concatenate([np.asarray(r[name]) for r in rows]) if rows else []
    columns["prompt_id"] = (steps - 1) * prompts_per_step + np.asarray(columns["group"])
    return columns


def assemble(out: str, campaign: Campaign, report: Callable[[str], None] = print) -> dict:
    """Writes manifest.parquet, steps.parquet and trajectories.parquet of the finished runs
    from their folders (re-done in full each time; files appear complete or not at all).
    Returns the sizes: runs, steps and trajectories, and clean and fault-active steps."""
    from rftjax.train.logs import read_jsonl

    done = [(r, s) for r in campaign.runs if (s := read_summary(out, r)) is not None]
    base = base_config(out, campaign.base)
    metrics = _metric_names(out, [r for r, _ in done])
    manifest = records.TableWriter(os.path.join(out, "manifest.parquet"), "manifest")
    steps = records.TableWriter(
        os.path.join(out, "steps.parquet"), "steps", {m: "float64" for m in metrics}
    )
    trajectories = records.TableWriter(os.path.join(out, "trajectories.parquet"), "trajectories")
    sizes = {"clean_steps": 0, "faulty_steps": 0}
    for i, (run, summary) in enumerate(done):
        labels = _labels(run, summary)
        row = _manifest_row(run, summary, campaign.base)
        manifest.write({k: [v] for k, v in row.items()})
        rows = _read_metrics(out, run)
        columns = _step_columns(run, rows, labels, metrics)
        steps.write(columns)
        sizes["faulty_steps"] += int(np.sum(columns["fault_active"]))
        sizes["clean_steps"] += len(rows) if run.clean else 0
        traj = read_jsonl(os.path.join(out, run.name, "trajectories.jsonl"))
        per_prompt = apply_overrides(base, _overrides_of(run)).rl.prompts_per_step
        if traj:
            active = columns["fault_active"]
            trajectories.write(_trajectory_columns(run, traj, labels, active, per_prompt))
        if (i + 1) % 50 == 0 or i + 1 == len(done):
            report(f"records: {i + 1}/{len(done)} runs assembled")
    for writer in (manifest, steps, trajectories):
        writer.close()
    sizes.update(runs=manifest.rows, steps=steps.rows, trajectories=trajectories.rows)
    sizes["metric_columns"] = len(metrics)
    sizes["clean_runs"] = sum(r.clean for r, _ in done)
    return sizes


def _save_campaign(out: str, campaign: Campaign) -> None:
    """Writes out/campaign.json, or checks that the folder holds this same campaign."""
    record = {"spec": campaign.spec, "runs": [r._asdict() for r in campaign.runs]}
    record = json.loads(json.dumps(record))
    path = os.path.join(out, "campaign.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) != record:
                raise ValueError(
                    f"{out} holds a different campaign (its campaign.json); resume it with the "
                    "spec it was started with, or choose a new --out"
                )
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def generate(
    campaign: Campaign,
    out: str,
    *,
    workers: int = 1,
    report: Callable[[str], None] = print,
) -> tuple[list[Run], dict[str, Any]]:
    """Runs the campaign (resumable, with the in-step detector and trajectory records), then
    assembles the Parquet tables and the dataset card. Returns (failed runs, sizes)."""
    _save_campaign(out, campaign)
    sizes = plan(campaign)
    report(
        f"campaign {campaign.name}: {sizes['runs']} runs ({sizes['clean_runs']} clean), "
        f"{sizes['clean_steps']} clean-run steps, {sizes['faulty_steps']} fault-active steps, "
        f"{sizes['computed_steps']} RL steps to compute in all"
    )
    t0 = time.time()
    failed = run_campaign(campaign.runs, out, base_config(out, campaign.base), workers=workers,
                          report=report)  # fmt: skip
    run_seconds = time.time() - t0
    sizes = assemble(out, campaign, report)
    sizes["run_seconds"] = run_seconds
    sizes["workers"] = workers
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(dataset_card(campaign, sizes))
    return failed, sizes


def dataset_card(campaign: Campaign, sizes: dict[str, Any]) -> str:
    """The dataset card (README.md next to the records): how the records were produced, their
    size and what every column means."""
    c = campaign.spec
    return f"""# FaultBench campaign `{campaign.name}`

{c.get("description", "")}

## How it was produced

`python -m launch.faultbench generate --spec {campaign.name} --out DIR` (the spec as given is
in `campaign.json` with the list of runs it resolved to). Each run trains a policy with rftjax
(GRPO/PPO, the settings in the manifest's `config` column over the trainer's defaults) with
fm's in-step detector on (`fm=detect`) and per-completion records on. For every (seed,
settings) a clean run goes first and keeps its checkpoints; each faulted run forks from that
clean twin at its last checkpoint before onset, so its steps before onset are the twin's
records (identical: a fault is the identity before onset) with `fault_active` = 0. Training and
evaluation splits never share a seed. A fault is injected from its onset for `duration` steps
(<= 0: to the end); `fault_active` says on which steps it acted.

## Size

| table | rows |
|---|---|
| manifest.parquet (runs) | {sizes["runs"]} ({sizes["clean_runs"]} clean) |
| steps.parquet (run × step) | {sizes["steps"]} ({sizes["clean_steps"]} of clean runs, \
{sizes["faulty_steps"]} fault-active) |
| trajectories.parquet (completions) | {sizes["trajectories"]} |

Runs took {sizes["run_seconds"]:.0f} s with {sizes["workers"]} worker processes (runs
finished in an earlier invocation are not counted).

## manifest.parquet

{schema.markdown_table("manifest")}

## steps.parquet

{schema.markdown_table("steps")}

followed by {sizes["metric_columns"]} float columns, one per metric the trainer logged (NaN
where a step did not log it): `fm.stats` statistics (reward, length, token, advantage,
mismatch, KL, entropy, optimization and tool statistics, cross-checks), loss terms, `lr`,
held-out `eval_accuracy` / `eval_reward` (evaluation steps only), and the in-step detector's
`alarm` (1 if it alarmed), `nonfinite`, `flag/<signal>`, `score/<signal>` (robust z) and
`cusum/<signal>`. Detectors under test should read neither the labels nor the detector columns
(`fm.bench.schema.is_feature`).

## trajectories.parquet

{schema.markdown_table("trajectories")}
"""

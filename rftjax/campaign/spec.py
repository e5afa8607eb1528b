"""FaultBench campaign specs: validation, built-in campaigns, and their sizes."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

import faults
from faults import SEVERITIES, SPECS
from fm import taxonomy
from fm.faultbench import schema
from rftjax.campaign.runs import (
    OVERRIDE_KEYS,
    Run,
    apply_overrides,
    config_prefix,
    overrides_of,
    twin_name,
)
from rftjax.config import TrainConfig

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
BUILTINS = (
    "standard",
    "smoke",
    "heldout",
    "heldout-remedy",
    "pipeline",
    "conditions",
    "conditions-faults",
)


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
    onset = fault["fault_onset"]
    return f"{config_prefix(config)}s{e.seed}/{e.type}-{strength}{variant}-o{onset}{duration}"


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
    """Trainer defaults with the campaign's base settings, the in-step detector on,
    trajectories recorded and no TensorBoard events."""
    cfg = TrainConfig(workdir=workdir, fm="detect", record_trajectories=True, tensorboard=False)
    return apply_overrides(cfg, base)


# The built-in specs, shipped as JSON files beside this module (`specs/NAME.json`):
# `smoke` (a pipeline check: 7 small runs from one shared warm-up, 75 s),
# `pipeline` (the tests' smoke: 7 tiny runs that learn nothing, 63 s), `standard`
# (every injectable type × 3 severities × onsets × seeds, a clean twin per seed with two faulted
# runs forked from it, four on the tool task; train and eval seeds and onsets differ),
# `heldout` (what `standard` never used: seeds from 5000, onsets 60, 130 and 210, each type's
# default variant at the two magnitudes between its presets) and `heldout-remedy` (heldout's
# stronger magnitude of each type and a reference corruption no knob fixes, checkpoints every
# 10 steps, for `remediate`) and `conditions` (clean runs under ten conditions: false alarms
# where the thresholds were never tuned). Each file's "description" says what it is;
# tests/test_campaign.py checks that the campaigns still cover the catalog.
SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")


def builtin_spec(name: str) -> dict[str, Any]:
    """The built-in spec `name` (one of `BUILTINS`)."""
    if name not in BUILTINS:
        raise ValueError(f"no built-in campaign {name!r}; built-ins: {', '.join(BUILTINS)}")
    with open(os.path.join(SPEC_DIR, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def _tool_task() -> dict[str, Any]:
    """Overrides that put a built-in campaign's tool-fault runs on the tool task."""
    return {"task": "calc", "max_new_tokens": builtin_tool_tokens()}


def builtin_tool_tokens() -> int:
    """Response slots of the built-in tool task."""
    from rftjax.tasks import response_slots

    return response_slots("calc")


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
        cfg = apply_overrides(base, overrides_of(run))
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

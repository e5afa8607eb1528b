"""FaultBench records: Parquet tables assembled from the run folders, and the dataset card.

`generate` runs a resolved campaign with the in-step detector on and trajectories recorded;
`assemble` (re-done from the run folders every time) writes the tables in the schema of
`fm.faultbench.schema`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fm import taxonomy
from fm.faultbench import harm, records, schema
from rftjax.campaign.runs import (
    RUNS_PER_WORKER,
    Run,
    apply_overrides,
    overrides_of,
    read_summary,
    run_campaign,
    twin_name,
)
from rftjax.campaign.spec import Campaign, base_config, plan

if TYPE_CHECKING:
    from rftjax.campaign.on_ray import RayOptions


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
    config = {**base, **overrides_of(run)}
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


def _first_acted(run: Run, summary: dict[str, Any], rows: list[dict]) -> int:
    """The manifest's `first_acted`: from the metric rows' `fault_acted`, or, for runs recorded
    before the trainer logged it, recomputed from the fault's parameters (`faults.acted` is a
    pure function of them and the step)."""
    if run.clean or summary["fault"] == "none" or not rows:
        return -1
    if "fault_acted" in rows[0]:
        flags = np.array([r.get("fault_acted", 0.0) > 0 for r in rows])
    else:
        import jax

        import faults

        f = summary["fault"]
        params = faults.params_for(f["type"], onset=int(f["onset"]), duration=int(f["duration"]),
                                   magnitude=float(f["magnitude"]), variant=f["variant"] or None,
                                   seed=run.seed)  # fmt: skip
        done = np.arange(len(rows), dtype=np.int32)  # steps completed before each step
        on = jax.vmap(lambda d: faults.acted(f["type"], faults.context(params, d)))(done)
        flags = np.asarray(on)
    hits = np.flatnonzero(flags)
    return int(hits[0]) + 1 if hits.size else -1


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


# Statistics fm's in-step detector gained after some campaigns were recorded: for runs that
# lack them, `_backfill` computes them from the run's trajectory records with the same fm.stats
# functions, so that `evaluate` scores today's detector on older records too.
BACKFILLED = ("reward_shadow_gap", "check_adv_flip")


@functools.cache
def _backfill_fn(group_size: int):
    import jax
    import jax.numpy as jnp

    from fm import stats as fs

    def per_step(reward, score, adv):
        ones = jnp.ones((adv.shape[0], 1), jnp.float32)
        return fs.merge(
            fs.reward_shadow_stats(score, reward),
            fs.advantage_stats(adv[:, None], ones, score, group_size=group_size),
        )

    return jax.jit(jax.vmap(per_step))


def _backfill(rows: list[dict], traj: list[dict]) -> None:
    """Adds the `BACKFILLED` statistics a run's metric rows lack, from its trajectory rows (the
    sequence advantage stands in for the token advantages: their masked mean is the same)."""
    missing = [n for n in BACKFILLED if n not in rows[0]] if rows else []
    if not missing or len(traj) != len(rows):
        return
    group_size = int(max(traj[0]["index"])) + 1
    arrays = [
        np.asarray([t[k] for t in traj], np.float32) for k in ("reward", "score", "advantage")
    ]
    derived = {k: np.asarray(v) for k, v in _backfill_fn(group_size)(*arrays).items()}
    for i, row in enumerate(rows):
        for name in missing:
            row[name] = float(derived[name][i])


def _harm(run: Run, row: dict, columns: dict, twins: dict[str, tuple[str, float]]) -> str:
    """The manifest's `harm` label (`fm.faultbench.harm`, at its default tolerance); clean runs
    (assembled first) leave their fingerprint and final accuracy in `twins`."""
    final = float(row["eval_accuracy_final"])
    if run.clean:
        twins[run.name] = (harm.fingerprint(columns), final)
        return schema.CLEAN
    if row["type"] == schema.CLEAN:  # a faulted run whose fault resolved to none
        return schema.CLEAN
    if row["twin"] not in twins:
        return harm.UNKNOWN
    fingerprint, twin_final = twins[row["twin"]]
    same = harm.fingerprint(columns) == fingerprint
    return harm.of_accuracy(final, twin_final, same_records=same)


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
    metrics = sorted({*_metric_names(out, [r for r, _ in done]), *BACKFILLED})
    manifest = records.TableWriter(
        os.path.join(out, "manifest.parquet"), "manifest", {"harm": "string"}
    )
    steps = records.TableWriter(
        os.path.join(out, "steps.parquet"), "steps", {m: "float64" for m in metrics}
    )
    trajectories = records.TableWriter(os.path.join(out, "trajectories.parquet"), "trajectories")
    sizes = {"clean_steps": 0, "faulty_steps": 0}
    twins: dict[str, tuple[str, float]] = {}  # clean run → (harm.fingerprint, final accuracy)
    for i, (run, summary) in enumerate(done):
        labels = _labels(run, summary)
        row = _manifest_row(run, summary, campaign.base)
        rows = _read_metrics(out, run)
        row["first_acted"] = _first_acted(run, summary, rows)
        traj = read_jsonl(os.path.join(out, run.name, "trajectories.jsonl"))
        _backfill(rows, traj)
        columns = _step_columns(run, rows, labels, metrics)
        row["harm"] = _harm(run, row, columns, twins)
        manifest.write({k: [v] for k, v in row.items()})
        steps.write(columns)
        sizes["faulty_steps"] += int(np.sum(columns["fault_active"]))
        sizes["clean_steps"] += len(rows) if run.clean else 0
        per_prompt = apply_overrides(base, overrides_of(run)).rl.prompts_per_step
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
            saved = json.load(f)
        # A run field added after the folder was started reads as its default.
        saved["runs"] = [{**Run._field_defaults, **r} for r in saved.get("runs", [])]
        if saved != record:
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
    ray_options: RayOptions | None = None,
    report: Callable[[str], None] = print,
) -> tuple[list[Run], dict[str, Any]]:
    """Runs the campaign (resumable, with the in-step detector and trajectory records) in
    `workers` processes or, with `ray_options`, as Ray tasks; then assembles the Parquet
    tables and the dataset card. Returns (failed runs, sizes). One process at a time per
    folder (a second one is refused)."""
    os.makedirs(out, exist_ok=True)
    with exclusive(out):
        return _generate(campaign, out, workers=workers, ray_options=ray_options, report=report)


@contextlib.contextmanager
def exclusive(out: str):
    """An advisory lock on `out/.generate.lock`, released by the OS if the holder dies; the
    file is removed when the holder is done."""
    path = os.path.join(out, ".generate.lock")
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ValueError(
                f"{out} is being generated by {holder}; wait for it to finish (a finished "
                "campaign is reused) or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):  # while held: nobody else holds it
                os.remove(path)
            fcntl.flock(f, fcntl.LOCK_UN)


def _generate(
    campaign: Campaign,
    out: str,
    *,
    workers: int,
    ray_options: RayOptions | None,
    report: Callable[[str], None],
) -> tuple[list[Run], dict[str, Any]]:
    _save_campaign(out, campaign)
    sizes = plan(campaign)
    report(
        f"campaign {campaign.name}: {sizes['runs']} runs ({sizes['clean_runs']} clean), "
        f"{sizes['clean_steps']} clean-run steps, {sizes['faulty_steps']} fault-active steps, "
        f"{sizes['computed_steps']} RL steps to compute in all"
        + (f"; {campaign.spec['description']}" if campaign.spec.get("description") else "")
        + ". A line as each run ends (the first ones also warm up and compile)."
    )
    t0 = time.time()
    failed = run_campaign(campaign.runs, out, base_config(out, campaign.base), workers=workers,
                          runs_per_worker=RUNS_PER_WORKER, ray_options=ray_options,
                          report=report)  # fmt: skip
    run_seconds = time.time() - t0
    sizes = assemble(out, campaign, report)
    sizes["run_seconds"] = run_seconds
    sizes["workers"] = workers
    if ray_options is not None:
        sizes["executor"] = (
            f"as Ray tasks of {ray_options.run_cpus:g} CPUs and {ray_options.run_gpus:g} GPUs"
        )
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

Runs took {sizes["run_seconds"]:.0f} s \
{sizes.get("executor") or f"with {sizes['workers']} worker processes"} (runs finished in an
earlier invocation are not counted).

## manifest.parquet

{schema.markdown_table("manifest")}

and `harm`: the run's effect against its clean twin (`fm.faultbench.harm`, tolerance \
{harm.TOLERANCE:g}): `inert` (every recorded statistic and the final evaluation identical),
`harmless` (final held-out accuracy at most the tolerance below the twin's), `harmful`,
`unknown` (no twin), or `none` for a clean run.

## steps.parquet

{schema.markdown_table("steps")}

followed by {sizes["metric_columns"]} float columns, one per metric the trainer logged (NaN
where a step did not log it): `fm.stats` statistics (reward, length, token, advantage,
mismatch, KL, entropy, optimization and tool statistics, cross-checks), loss terms, `lr`,
held-out `eval_accuracy` / `eval_reward` (evaluation steps only), and the in-step detector's
`alarm` (1 if it alarmed), `nonfinite`, `flag/<signal>`, `score/<signal>` (robust z) and
`cusum/<signal>`. Detectors under test should read neither the labels nor the detector columns
(`fm.faultbench.schema.is_feature`).

## trajectories.parquet

{schema.markdown_table("trajectories")}
"""

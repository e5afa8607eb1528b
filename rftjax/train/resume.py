"""Where a run begins: a fresh start, a resumed checkpoint or a fork of a clean twin; and the
configuration record that decides whether a checkpoint belongs to this run."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

from absl import logging

from rftjax import config, parallel
from rftjax.checkpoint import Checkpointer, CorruptCheckpoint
from rftjax.config import TrainConfig
from rftjax.knobs import knobs_from_dict, make_knobs
from rftjax.train.logs import read_jsonl, write_jsonl
from rftjax.train.setup import Model, Run
from rftjax.train.state import TrainState, init_state
from rftjax.train.warm_start import run_warmup


def _recorded(saved: dict[str, Any], key: str) -> Any:
    """A field of a checkpoint's recorded config; one the record lacks (added to TrainConfig
    after it was written) counts as its default value."""
    fields = TrainConfig.__dataclass_fields__
    if key in saved or key not in fields:
        return saved.get(key)
    f = fields[key]
    return f.default if f.default is not dataclasses.MISSING else None


def differences(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Fields in which a checkpoint's recorded config differs from ours."""
    return sorted(k for k in ours if _recorded(saved, k) != ours[k])


def describe_differences(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Each differing field of two config records as "name: saved X, now Y" (nested groups,
    e.g. the algorithm's settings or the knobs, by their own fields: "rl.group_size: ...")."""
    out = []
    for key in differences(saved, ours):
        old, new = _recorded(saved, key), ours[key]
        if isinstance(old, dict) and isinstance(new, dict):
            inner = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            out += [f"{key}.{k}: saved {old.get(k)!r}, now {new.get(k)!r}" for k in inner]
        else:
            out.append(f"{key}: saved {old!r}, now {new!r}")
    return out


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records of its run's configuration: every setting but those whose
    role is HOW (how, not what: e.g. a run may resume on another mesh, Orbax reshards; or with
    more micro-batches after running out of memory)."""
    record = dataclasses.asdict(cfg)
    for name in config.names(TrainConfig, role=config.HOW):
        record.pop(name)
    for name in config.names(config.RLConfig, role=config.HOW):  # e.g. micro-batches, remat
        record["rl"].pop(name)
    return record


def start_or_resume(run: Run, model: Model, stop=None) -> Start:
    """A fresh start (warm-up, initial evaluation), a fork of the clean twin, or the latest
    checkpoint (`cfg.resume`)."""
    cfg, checkpointer = run.cfg, run.checkpointer
    latest = checkpointer.latest_step()
    if latest is not None and not cfg.resume:
        raise ValueError(
            f"{run.workdir} already holds checkpoints (latest step {latest}); pass "
            "--resume to continue that run, or choose a new --workdir"
        )
    if cfg.resume and latest is None and not cfg.fork_from:
        logging.warning("--resume: %s holds no checkpoint; starting a new run", run.workdir)
    if cfg.fork_from and latest is None:
        forked = fork(run, model)
        if forked is not None:
            return forked
    if cfg.resume and latest is not None:
        return resume(run, model)
    warmup_seconds = 0.0
    params = model.params
    if cfg.warmup_steps:
        params, warmup_seconds = run_warmup(cfg, model.graphdef, params, run.task, stop)
    state = init_state(params, cfg.rl, cfg.seed, model.monitor, run.fault)
    initial = run.evaluator(state.params["policy"])
    logging.info(
        "initial held-out accuracy (after warm-up, before RL): %.3f", initial["eval_accuracy"]
    )
    evals = {"initial": initial, "last": initial, "last_step": 0}
    return Start(state, make_knobs(**cfg.knobs), evals, warmup_seconds)


def resume(run: Run, model: Model) -> Start:
    """The latest checkpoint of `run.workdir`, restored straight into the mesh's shardings
    (each process reads its own shards); a corrupt step is set aside and the one before it
    restored. A checkpoint of another configuration is refused, naming each difference."""
    cfg, checkpointer = run.cfg, run.checkpointer
    record = config_record(cfg)

    def same_config(meta):
        saved = meta["config"]
        changed = differences(saved, record)
        if changed:
            hint = ""
            if "fault_onset" in changed:
                hint = "; the default fault onset follows --steps: pass --fault_onset explicitly"
            raise ValueError(
                f"--resume: {run.workdir} belongs to a run with a different "
                f"configuration: {'; '.join(describe_differences(saved, record))}{hint}"
            )

    target = init_state(model.params, cfg.rl, cfg.seed, model.monitor, run.fault)
    try:
        step, state, meta, skipped = checkpointer.restore_latest(
            parallel.place_state(target, run.mesh), check=same_config
        )
    except CorruptCheckpoint as e:
        raise ValueError(f"--resume: {e}") from e
    logging.info("resumed from step %d in %s", step, checkpointer.directory)
    notes = [
        {"step": step, "event": "corrupt_checkpoint", "checkpoint": s, "reason": why}
        for s, why in skipped
    ]
    return Start(state, knobs_from_dict(meta["knobs"]), saved_evals(meta), 0.0, meta, notes)


# Fields a fork may differ in from its source: the fault itself and bookkeeping.
_FORK_FREE = config.names(TrainConfig, role=config.FORK_FREE)


def fork(run: Run, model: Model) -> Start | None:
    """Starts a faulted run from the clean run `cfg.fork_from` at its last checkpoint before
    the onset, taking over that run's records up to there. None when there is no such
    checkpoint (the run then starts from scratch)."""
    cfg = run.cfg
    source = os.path.abspath(cfg.fork_from)
    if not os.path.isdir(os.path.join(source, "checkpoints")):
        raise ValueError(f"fork_from={source} holds no checkpoints/ folder")
    with Checkpointer(os.path.join(source, "checkpoints")) as other:
        steps = [s for s in other.all_steps() if s < cfg.fault_onset]
        if not steps:
            logging.info(
                "fork_from: %s has no checkpoint before onset step %d; starting from scratch",
                source,
                cfg.fault_onset,
            )
            return None
        saved = other.read_meta(steps[-1])["config"]
        ours = {k: v for k, v in config_record(cfg).items() if k not in _FORK_FREE}
        changed = differences(saved, ours)
        if changed or saved.get("fault") != "none":
            raise ValueError(
                f"fork_from={source} is not this run without its fault "
                f"(differs in: {', '.join(changed or ['fault'])})"
            )
        template = init_state(model.params, cfg.rl, cfg.seed, model.monitor)
        state, meta = other.restore(steps[-1], template)
    if run.fault.state_init is not None:
        state = state._replace(fault=run.fault.state_init(state.params["policy"]))
    # The source's records up to the fork step become ours (the logs cut back to it on open),
    # with the fault marked inactive, as in a run that carried it from the start.
    logs = [("metrics.jsonl", {"fault_active": 0.0, "fault_acted": 0.0}), ("events.jsonl", {})]
    if cfg.record_trajectories:
        logs.append(("trajectories.jsonl", {}))
    for name, extra in logs:
        records = read_jsonl(os.path.join(source, name))
        write_jsonl(os.path.join(run.workdir, name), [{**r, **extra} for r in records])
    logging.info("forked from step %d of %s", steps[-1], source)
    evals = saved_evals(meta)
    return Start(state, knobs_from_dict(meta["knobs"]), evals)


def saved_evals(meta: dict[str, Any]) -> dict[str, Any]:
    """The evaluations a checkpoint holds: initial, the last one and its step (None in
    checkpoints written before the step was recorded)."""
    return {
        "initial": meta["eval_initial"],
        "last": meta["eval_last"],
        "last_step": meta.get("eval_last_step"),
    }


class Start(NamedTuple):
    """Where the RL loop begins: a fresh start, a fork or a resumed checkpoint."""

    state: TrainState
    knobs: Any
    evals: dict  # {"initial": eval, "last": eval}
    warmup_seconds: float = 0.0
    meta: dict | None = None  # the resumed checkpoint's metadata
    notes: list = []  # events to log: corrupt checkpoints set aside

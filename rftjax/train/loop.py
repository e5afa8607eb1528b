"""The outer training loop: warm-up, RL steps, evaluation, checkpoints, logs, summary.

Everything compiled lives in `step.py` / `warmup.py`; this file does I/O and bookkeeping.
Metrics of step t are read after step t+1 is dispatched, so the host never waits on the device
in the hot loop except at evaluation and checkpoint steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import traceback
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import faults
from fm import detect as fm_detect
from fm import report as fm_report
from rftjax import models, parallel
from rftjax.checkpoint import Checkpointer, CorruptCheckpoint
from rftjax.config import TrainConfig
from rftjax.knobs import knobs_from_dict, knobs_to_dict, make_knobs
from rftjax.models import hf
from rftjax.tasks import Task, make_task
from rftjax.train import manage, monitor, preempt
from rftjax.train import warmup as wu
from rftjax.train.lock import LOCK_NAME, WorkdirLock
from rftjax.train.logs import JsonlLog, MetricsWriter, read_jsonl, write_jsonl
from rftjax.train.step import PromptBatch, TrainState, init_state, make_learner


def build_model_config(cfg: TrainConfig, task: Task) -> models.ModelConfig:
    if os.path.isdir(cfg.model):  # a Hugging Face checkpoint folder
        model_cfg = models.from_hf_config(cfg.model)
    else:
        model_cfg = models.get_preset(cfg.model)
    if cfg.model_overrides:
        model_cfg = model_cfg.replace(**models.parse_overrides(cfg.model_overrides))
    if model_cfg.param_dtype != "float32":
        raise ValueError(
            f"param_dtype={model_cfg.param_dtype!r}: RL training keeps float32 master weights "
            "(an update of lr=1e-6 is below bfloat16's resolution of a weight); use "
            "dtype=bfloat16 for bfloat16 compute"
        )
    if model_cfg.vocab_size < len(task.tokenizer):
        raise ValueError(
            f"model vocab_size={model_cfg.vocab_size} is smaller than the "
            f"tokenizer's {len(task.tokenizer)} tokens"
        )
    return model_cfg


def to_prompt_batch(batch) -> PromptBatch:
    """Checks the left-padding layout (every row ends in a real token) and casts to int32."""
    if not np.all(np.asarray(batch.prompt_mask)[:, -1]):
        raise ValueError(
            "prompts must be left-padded with at least one real token per row "
            "(the last prompt column is padding in some row)"
        )
    return PromptBatch(
        np.asarray(batch.prompts, np.int32),
        np.asarray(batch.prompt_mask, np.int32),
        np.asarray(batch.answers, np.int32),
    )


# Compiled functions by everything static that shapes them: runs of one process that share a
# model, task kind and step configuration (a campaign's runs across seeds, severities and
# onsets) compile once. Keys hold only hashable static configuration.
_COMPILED: dict[tuple, Any] = {}


def _compiled(key: tuple, build):
    if key not in _COMPILED:
        _COMPILED[key] = build()
    return _COMPILED[key]


class Evaluator:
    """Greedy accuracy on the task's held-out prompts."""

    def __init__(
        self, graphdef, task: Task, *, max_new_tokens: int, cache_key: tuple | None = None
    ):
        """`cache_key`: the static configuration the graph comes from (model config, task
        kind, ...); evaluators with equal keys share one compiled decoder. None: no sharing."""
        tok = task.tokenizer
        self.task = task
        self.batch = task.eval_batch()

        def build():
            return wu.make_greedy(
                graphdef,
                max_new_tokens=max_new_tokens,
                eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id,
                tools=task.tool_spec(),
            )

        if cache_key is None:
            self.greedy = build()
        else:
            self.greedy = _compiled(("greedy", *cache_key, max_new_tokens), build)
        self.reward = None
        if task.jnp_reward is not None:
            self.reward = _compiled(("reward", task.jnp_reward), lambda: jax.jit(task.jnp_reward))

    def __call__(self, policy) -> dict[str, float]:
        response = self.greedy(policy, self.batch.prompts, self.batch.prompt_mask)
        if self.reward is not None:
            scores = parallel.fetch(self.reward(response, self.batch.answers))
        else:
            texts = self.task.decode_responses(parallel.fetch(response))
            scores = self.task.text_reward(texts, self.batch.answer_text)
        out = {
            "eval_accuracy": float(np.mean(scores["correct"])),
            "eval_reward": float(np.mean(scores["reward"])),
        }
        if "tool_used" in scores:  # how often the tool is called, overall and when right
            used, correct = np.asarray(scores["tool_used"]), np.asarray(scores["correct"])
            out["eval_tool_rate"] = float(np.mean(used))
            out["eval_tool_rate_correct"] = float(np.sum(used * correct) / max(correct.sum(), 1))
        return out


def _warmup_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "model_overrides": cfg.model_overrides,
        "task": cfg.task,
        "seed": cfg.model_seed,
        "steps": cfg.warmup_steps,
        "batch": cfg.warmup_batch_size,
        "lr": cfg.warmup_lr,
    }


def run_warmup(cfg: TrainConfig, graphdef, params, task: Task, stop=None):
    """Supervised warm-up, cached by everything that shapes it.

    The cache (`cfg.warmup_cache`, default workdir/warmup) holds one folder per fingerprint,
    published by an atomic rename: runs in several processes may share it, and a warm-up cut
    short by a crash is never read."""
    fingerprint = _warmup_fingerprint(cfg)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = os.path.abspath(cfg.warmup_cache or os.path.join(cfg.workdir, "warmup"))
    directory = os.path.join(cache_dir, key)
    # With several processes each one computes the same warm-up (its arrays are local to it,
    # which Orbax's multi-host path does not save); the cache is for one process.
    cache = jax.process_count() == 1
    with ocp.StandardCheckpointer() as checkpointer:
        if cache and os.path.exists(os.path.join(directory, "fingerprint.json")):
            logging.info("warm-up: reusing cached weights from %s", directory)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
            return checkpointer.restore(os.path.join(directory, "params"), abstract), 0.0
        t0 = time.time()
        if cfg.model_seed != task.seed:  # demonstrations follow the warm-up's seed
            task = make_task(
                cfg.task,
                seed=cfg.model_seed,
                eval_size=cfg.eval_size,
                tokenizer=task.tokenizer,
                **cfg.task_options(),
            )
        optimizer = wu.sft_optimizer(cfg.warmup_lr)
        step_fn = wu.make_sft_step(graphdef, optimizer, pad_id=task.tokenizer.pad_token_id)
        state = wu.SFTState(params, optimizer.init(params))
        logging.info(
            "warm-up: %d supervised steps (batch %d, Adam %.0e) on %s",
            cfg.warmup_steps,
            cfg.warmup_batch_size,
            cfg.warmup_lr,
            cfg.task,
        )
        loss = None
        for i in range(cfg.warmup_steps):
            if stop is not None:
                stop.check("warm-up")
            # Seed offset keeps warm-up data apart from the RL data stream.
            b = task.demo_batch(10_000_000 + i, cfg.warmup_batch_size)
            state, loss = step_fn(state, b.prompts, b.prompt_mask, b.targets, b.target_mask)
            if (i + 1) % max(1, cfg.warmup_steps // 4) == 0:
                logging.info("warm-up: step %d/%d loss %.4f", i + 1, cfg.warmup_steps, float(loss))
        if not cache:
            return state.params, time.time() - t0
        tmp = f"{directory}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        checkpointer.save(os.path.join(tmp, "params"), state.params)
        checkpointer.wait_until_finished()
        with open(os.path.join(tmp, "fingerprint.json"), "w", encoding="utf-8") as f:
            json.dump(fingerprint, f)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process published the same warm-up first
            shutil.rmtree(tmp, ignore_errors=True)
        return state.params, time.time() - t0


def _recorded(saved: dict[str, Any], key: str) -> Any:
    """A field of a checkpoint's recorded config; one the record lacks (added to TrainConfig
    after it was written) counts as its default value."""
    fields = TrainConfig.__dataclass_fields__
    if key in saved or key not in fields:
        return saved.get(key)
    f = fields[key]
    return f.default if f.default is not dataclasses.MISSING else None


def _differences(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Fields in which a checkpoint's recorded config differs from ours."""
    return sorted(k for k in ours if _recorded(saved, k) != ours[k])


def describe_differences(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Each differing field of two config records as "name: saved X, now Y" (nested groups,
    e.g. the algorithm's settings or the knobs, by their own fields: "rl.group_size: ...")."""
    out = []
    for key in _differences(saved, ours):
        old, new = _recorded(saved, key), ours[key]
        if isinstance(old, dict) and isinstance(new, dict):
            inner = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            out += [f"{key}.{k}: saved {old.get(k)!r}, now {new.get(k)!r}" for k in inner]
        else:
            out.append(f"{key}: saved {old!r}, now {new!r}")
    return out


def _config_record(cfg: TrainConfig) -> dict[str, Any]:
    record = dataclasses.asdict(cfg)
    # The mesh is how, not what: a run may resume on another mesh (Orbax reshards on restore).
    how = ("workdir", "resume", "steps", "mesh", "warmup_cache", "tensorboard", "fm_strict")
    for name in how:
        record.pop(name)
    return record


class _Run(NamedTuple):
    """What the RL loop needs, built once by `_setup`."""

    cfg: TrainConfig
    workdir: str
    task: Task
    learner: dict
    evaluator: Evaluator
    checkpointer: Checkpointer
    record: dict
    fault: faults.Fault | None
    fault_params: faults.FaultParams | None
    mesh: jax.sharding.Mesh | None = None  # None: one device


def _setup(cfg: TrainConfig):
    workdir = os.path.abspath(cfg.workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpoint = cfg.model if os.path.isdir(cfg.model) else None
    tokenizer = hf.load_tokenizer(checkpoint) if checkpoint else None
    task = make_task(
        cfg.task, seed=cfg.seed, eval_size=cfg.eval_size, tokenizer=tokenizer, **cfg.task_options()
    )
    tok = task.tokenizer
    model_cfg = build_model_config(cfg, task)
    if checkpoint:  # the checkpoint's weights, read into an abstract (unallocated) template
        graphdef, params = hf.load(checkpoint, model_cfg)
    else:
        graphdef, params = models.create(model_cfg, cfg.model_seed)
    static = (model_cfg, type(task).__name__, task.jnp_reward, tok.eos_token_id, tok.pad_token_id)
    mesh = parallel.make_mesh(cfg.mesh) if cfg.mesh else None

    def build():
        tools = task.tool_spec()
        detector = None
        if cfg.fm != "off":
            detector = monitor.make_monitor(cfg.rl, tools=tools is not None)
        fault = None
        if cfg.fault != "none":
            rl = cfg.rl
            fault = faults.make(
                cfg.fault,
                faults.Setup(rl.group_size, rl.max_new_tokens, rl.normalize_adv_std, tools),
            )
        learner = make_learner(
            graphdef,
            cfg.rl,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            reward_fn=task.jnp_reward,
            monitor=detector,
            fault=fault,
            trajectories=cfg.record_trajectories,
            tools=tools,
            mesh=mesh,
        )
        return learner, detector, fault

    key = ("learner", *static, cfg.rl, cfg.fm, cfg.fault, cfg.record_trajectories, mesh)
    learner, detector, fault = _compiled(key, build)
    evaluator = Evaluator(graphdef, task, max_new_tokens=cfg.rl.max_new_tokens, cache_key=static)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints
    )
    run = _Run(
        cfg,
        workdir,
        task,
        learner,
        evaluator,
        checkpointer,
        _config_record(cfg),
        fault,
        parallel.replicate(cfg.fault_params(), mesh),
        mesh,
    )
    return run, graphdef, params, detector


def _start_or_resume(run: _Run, graphdef, params, detector, stop=None):
    """A fresh start (warm-up, initial evaluation) or the latest checkpoint.

    Returns a `_Start`.
    """
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
        forked = _fork(run, params, detector)
        if forked is not None:
            return forked
    if cfg.resume and latest is not None:

        def same_config(meta):
            saved = meta["config"]
            changed = _differences(saved, run.record)
            if changed:
                hint = ""
                if "fault_onset" in changed:
                    hint = (
                        "; the default fault onset follows --steps: pass --fault_onset explicitly"
                    )
                raise ValueError(
                    f"--resume: {run.workdir} belongs to a run with a different "
                    f"configuration: {'; '.join(describe_differences(saved, run.record))}{hint}"
                )

        target = init_state(params, cfg.rl, cfg.seed, detector, run.fault)
        # Restored straight into the mesh's shardings (each process reads its own shards); a
        # corrupt step is set aside and the one before it restored.
        try:
            step, state, meta, skipped = checkpointer.restore_latest(
                parallel.place_state(target, run.mesh), check=same_config
            )
        except CorruptCheckpoint as e:
            raise ValueError(f"--resume: {e}") from e
        logging.info("resumed from step %d in %s", step, checkpointer.directory)
        evals = _saved_evals(meta)
        notes = [
            {"step": step, "event": "corrupt_checkpoint", "checkpoint": s, "reason": why}
            for s, why in skipped
        ]
        return _Start(state, knobs_from_dict(meta["knobs"]), evals, 0.0, meta, notes)
    warmup_seconds = 0.0
    if cfg.warmup_steps:
        params, warmup_seconds = run_warmup(cfg, graphdef, params, run.task, stop)
    state = init_state(params, cfg.rl, cfg.seed, detector, run.fault)
    initial = run.evaluator(state.params["policy"])
    logging.info(
        "initial held-out accuracy (after warm-up, before RL): %.3f", initial["eval_accuracy"]
    )
    evals = {"initial": initial, "last": initial, "last_step": 0}
    return _Start(state, make_knobs(**cfg.knobs), evals, warmup_seconds)


# Fields a fork may differ in from its source: the fault itself and bookkeeping.
_FORK_FREE = (
    *(f for f in TrainConfig.__dataclass_fields__ if f.startswith("fault")),
    "fork_from",
    "keep_checkpoints",
    "log_every",
)


def _fork(run: _Run, params, detector):
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
        ours = {k: v for k, v in run.record.items() if k not in _FORK_FREE}
        changed = _differences(saved, ours)
        if changed or saved.get("fault") != "none":
            raise ValueError(
                f"fork_from={source} is not this run without its fault "
                f"(differs in: {', '.join(changed or ['fault'])})"
            )
        state, meta = other.restore(steps[-1], init_state(params, cfg.rl, cfg.seed, detector))
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
    evals = _saved_evals(meta)
    return _Start(state, knobs_from_dict(meta["knobs"]), evals)


def _saved_evals(meta: dict[str, Any]) -> dict[str, Any]:
    """The evaluations a checkpoint holds: initial, the last one and its step (None in
    checkpoints written before the step was recorded)."""
    return {
        "initial": meta["eval_initial"],
        "last": meta["eval_last"],
        "last_step": meta.get("eval_last_step"),
    }


class _Start(NamedTuple):
    """Where the RL loop begins: a fresh start, a fork or a resumed checkpoint."""

    state: TrainState
    knobs: Any
    evals: dict  # {"initial": eval, "last": eval}
    warmup_seconds: float = 0.0
    meta: dict | None = None  # the resumed checkpoint's metadata
    notes: list = []  # events to log: corrupt checkpoints set aside


class _Logs(NamedTuple):
    metrics: Any
    events: Any
    trajectories: Any = None


def _alarm_event(step: int, values: dict[str, float]) -> dict[str, Any]:
    reading = fm_detect.Reading.from_record(values)
    flagged = sorted(reading.flagged)
    scores = {name: reading.scores[name] for name in flagged if name in reading.scores}
    return {"step": step, "event": "alarm", "signals": flagged, "scores": scores}


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Trains according to `cfg`; returns (and writes) the summary.

    SIGTERM / SIGINT (from the start on) stop the run after the RL step in flight, with a
    checkpoint of it and the summary ("preempted": true); `resume=True` continues it."""
    workdir = os.path.abspath(cfg.workdir)
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        with preempt.Preemption() as stop, _lock(workdir):
            return _run(cfg, stop)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no folder behind
            _remove_if_empty(workdir)
        raise


def _lock(workdir: str):
    """One trainer per workdir (process 0 of a multi-host job holds it for the job)."""
    return WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()


def _remove_if_empty(workdir: str) -> None:
    """Removes `workdir` if it holds no file but the lock (empty folders aside)."""
    for _, _, files in os.walk(workdir):
        if any(f != LOCK_NAME for f in files):
            return
    shutil.rmtree(workdir, ignore_errors=True)


def _run(cfg: TrainConfig, stop: preempt.Preemption) -> dict[str, Any]:
    t_start = time.time()
    run_, graphdef, params, detector = _setup(cfg)
    try:
        stop.check("set-up")
        begun = _start_or_resume(run_, graphdef, params, detector, stop)
        state, knobs, evals, warmup_seconds = begun[:4]
        state = parallel.place_state(state, run_.mesh)
        knobs = parallel.replicate(knobs, run_.mesh)
        initial = evals["initial"]
        start = int(state.step)
        # With several processes, process 0 alone writes the logs (they hold global values).
        primary = jax.process_index() == 0
        metrics_log = (
            MetricsWriter(run_.workdir, resume_step=start, tensorboard=cfg.tensorboard)
            if primary
            else _Quiet()
        )
        # Constructing a log on resume rewrites the file: process 0's alone.
        events_path = os.path.join(run_.workdir, "events.jsonl")
        # Events are the run's history (alarms and actions of timelines a rollback left
        # included): a resumed run keeps those written up to its checkpoint.
        kept = (begun.meta or {}).get("events_written")
        events = JsonlLog(events_path, resume_step=start, keep=kept) if primary else _Quiet()
        for note in begun.notes:  # corrupt checkpoints set aside on resume
            events.write(note)
        if run_.mesh is not None:  # a bad restore or placement shows before the first step
            _check_replicas(run_, state, start, events)
        traj_log = None
        if cfg.record_trajectories and primary:
            path = os.path.join(run_.workdir, "trajectories.jsonl")
            traj_log = JsonlLog(path, resume_step=start)
        t_rl = time.time()
        logs = _Logs(metrics_log, events, traj_log)
        try:
            state, final, final_step = _train(run_, state, knobs, evals, logs, stop, begun.meta)
        finally:
            metrics_log.close()
            events.close()
            if traj_log is not None:
                traj_log.close()
    finally:
        run_.checkpointer.close()
    rl_seconds = time.time() - t_rl
    steps_run = int(state.step) - start
    history = read_jsonl(events.path)
    alarms = [e for e in history if e["event"] == "alarm"]
    # "final" only from an evaluation of the state the run ended with (a preempted run's last
    # evaluation may be older: it is reported as "last", with its step).
    ended_evaluated = final_step == int(state.step)
    summary = {
        "eval_accuracy_initial": initial["eval_accuracy"],
        "eval_accuracy_final": final["eval_accuracy"] if ended_evaluated else None,
        "eval_reward_initial": initial["eval_reward"],
        "eval_reward_final": final["eval_reward"] if ended_evaluated else None,
        "eval_accuracy_last": final["eval_accuracy"],
        "eval_last_step": final_step,
        "steps_completed": int(state.step),
        "wall_seconds": time.time() - t_start,
        "warmup_seconds": warmup_seconds,
        "rl_seconds": rl_seconds,
        "rl_steps_per_second": steps_run / rl_seconds if steps_run else 0.0,
        "algo": cfg.rl.algo,
        "task": cfg.task,
        "model": cfg.model,
        "fault": cfg.fault_record(),
        "fm": cfg.fm,
        "alarms": [{"step": e["step"], "signals": e["signals"]} for e in alarms],
        **_remediation_summary(history),
        # Stopped by SIGTERM / SIGINT after a checkpoint of its last step: --resume goes on.
        "preempted": stop.signal is not None and int(state.step) < cfg.steps,
        "fm_errors": [e for e in history if e["event"] == "fm_error"],
    }
    for name in ("eval_tool_rate", "eval_tool_rate_correct"):  # tool tasks
        if name in final:
            summary[f"{name}_initial"] = initial.get(name)
            summary[f"{name}_final"] = final[name]
    if jax.process_index() == 0:  # atomically: a crash leaves the old summary or the new
        path = os.path.join(run_.workdir, "summary.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".tmp", path)
    return summary


class _Quiet:
    """The logs of a process other than 0: written by process 0 only."""

    path = os.devnull
    count = 0

    def write(self, record) -> None:
        del record

    def write_step(self, step, values) -> None:
        del step, values

    def cut(self, step) -> None:
        del step

    def close(self) -> None:
        pass


def _remediation_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's record of the closed loop (`--fm=full`), from events.jsonl."""
    of = lambda kind: [e for e in records if e["event"] == kind]
    halts = of("halt")
    return {
        "diagnoses": of("diagnosis"),
        "actions": of("action"),
        "verifications": of("verification"),
        "halted": bool(halts),
        "halt_report": halts[-1] if halts else None,
    }


def _train(run: _Run, state, knobs, evals, logs: _Logs, stop, resumed_meta=None):
    """The RL loop. Returns (state, last evaluation). Stops early, after a checkpoint of the
    last step, when `stop` (a `preempt.Preemption`) is reached."""
    cfg, rl, task = run.cfg, run.cfg.rl, run.task
    metrics_log, events, traj_log = logs
    # A resumed run that has nothing left to do reports the evaluation its checkpoint holds.
    start, initial, final = int(state.step), evals["initial"], evals["last"]
    final_step = evals["last_step"]  # the step `final` evaluated
    pending: list = []  # (step, metrics on device) of the step not yet read
    manager = controller = None
    fm_failure = (resumed_meta or {}).get("fm_failure")
    if cfg.fm == "full":  # the closed loop: diagnosis, rollback, knobs, verification, halt
        manager = manage.Manager(
            run.checkpointer,
            rl,
            state,
            knobs,
            window=cfg.fm_window,
            policy=cfg.fm_policy,
            seed=cfg.seed,
            diagnoser=cfg.fm_diagnoser,
            tools=task.tool_spec() is not None,
        )
        controller = manager.controller
        if resumed_meta is not None:
            manager.resume(resumed_meta)
        if fm_failure:  # management had failed before the restart: it stays off
            manager = None
    saved_at = start if resumed_meta is not None else None

    def fm_failed(step: int, where: str, error: Exception) -> None:
        """fm's own failure: recorded, and training goes on without management (with
        --fm_strict: raised)."""
        nonlocal manager, fm_failure
        if cfg.fm_strict:
            raise error
        fm_failure = f"{where}: {type(error).__name__}: {error}"
        trace = traceback.format_exception(error, limit=-4)
        events.write(
            {
                "step": step,
                "event": "fm_error",
                "where": where,
                "error": fm_failure,
                "traceback": "".join(trace)[-2000:],
            }
        )
        logging.error("step %d: fm failed in %s; training goes on unmanaged", step, fm_failure)
        manager = None

    def flush(extra=None):
        while pending:
            step_no, metrics = pending.pop()
            metrics = parallel.fetch(metrics)
            rows = metrics.pop("trajectories", None)
            if traj_log is not None:
                traj_log.write({"step": step_no, **{k: v.tolist() for k, v in rows.items()}})
            values = {k: float(v) for k, v in metrics.items()}
            metrics_log.write_step(step_no, {**values, **(extra or {})})
            if values.get("alarm", 0.0) > 0:
                event = _alarm_event(step_no, values)
                events.write(event)
                logging.warning("%s", fm_report.describe(event))
            if manager is not None:
                with jax.transfer_guard("allow"):  # a restore reads a checkpoint
                    try:
                        observed = manager.observe(step_no, values)
                    except Exception as e:  # noqa: BLE001 - fm must not lose the run
                        fm_failed(step_no, "remediator", e)
                        observed = []
                for event in observed:  # JSON in events.jsonl, a sentence on the console
                    events.write(event)
                    logging.warning("%s", fm_report.describe(event))
            if step_no % cfg.log_every == 0 or step_no == cfg.steps:
                logging.info(
                    "step %d/%d reward %.3f kl %.4f entropy %.3f len %.2f (%s)",
                    step_no,
                    cfg.steps,
                    values["reward_mean"],
                    values["kl_ref"],
                    values["entropy"],
                    values["length_mean"],
                    pace.describe(step_no, cfg.steps),
                )

    def save() -> None:
        """Checkpoint of step `step_no` with what a resumed run needs to go on identically."""
        nonlocal saved_at
        if run.mesh is not None:
            _check_replicas(run, state, step_no, events)
        meta = {
            "config": run.record,
            "knobs": knobs_to_dict(knobs),
            "eval_initial": initial,
            "eval_last": final,
            "eval_last_step": final_step,
            "data_cursor": step_no,
        }
        if controller is not None:
            meta.update(controller.progress())
        if manager is not None:
            try:
                manager.saved(step_no)
                meta["remediator"] = manager.state_dict()
            except Exception as e:  # noqa: BLE001 - fm must not lose the run
                fm_failed(step_no, "remediator", e)
        if fm_failure:
            meta["fm_failure"] = fm_failure
        meta["events_written"] = events.count
        run.checkpointer.save(step_no, state, meta)
        saved_at = step_no

    def managed() -> bool:
        """After a flush: applies the remediator's rollback (dropping the results of steps
        after the restored one) or halt. True if the loop must go on from there."""
        nonlocal state, step_no, saved_at
        if manager is None:
            return False
        if controller.halt_report is not None:
            step_no = cfg.steps  # ends the loop
            return True
        restored = controller.take_restore(step_no)
        if restored is None:
            return False
        pending.clear()
        with jax.transfer_guard("allow"):
            state = parallel.place_state(controller.state, run.mesh)
        step_no = saved_at = restored
        for log in (metrics_log, traj_log):
            if log is not None:
                log.cut(step_no)
        return True

    step_no = start
    pace = _Pace()
    while step_no < cfg.steps:
        step_no += 1
        offset = 0 if controller is None else controller.data_offset
        raw = task.train_batch(step_no - 1 + offset, rl.prompts_per_step)
        # Inside the hot loop every transfer is explicit: an implicit one is a bug (a hidden
        # host sync) and raises.
        with jax.transfer_guard("disallow"):
            batch = parallel.place_batch(to_prompt_batch(raw), run.mesh)
            fparams = run.fault_params
            if controller is not None:
                # A remedy's new knobs are made on one device: onto the mesh with the rest.
                knobs = parallel.replicate(controller.knob_values, run.mesh)
                fparams = controller.shifted(fparams)
            if pace.first:
                logging.info("compiling the train step (the first step waits for it) ...")
            if "step" in run.learner:
                state, metrics = run.learner["step"](state, batch, knobs, fparams)
            else:
                answers = [a for a in raw.answer_text for _ in range(rl.group_size)]
                state, metrics = _text_step(
                    run.learner, task, state, batch, knobs, fparams, answers
                )
            flush()  # the previous step's metrics: read one step late
            pending.append((step_no, metrics))
            pace.stepped(step_no)
        if managed():
            continue
        last = step_no == cfg.steps
        if step_no % cfg.eval_every == 0 or last:
            final, final_step = run.evaluator(state.params["policy"]), step_no
            flush(final)
            logging.info("step %d: held-out accuracy %.3f", step_no, final["eval_accuracy"])
        if step_no % cfg.checkpoint_every == 0 or last:
            flush()
            if managed():
                continue
            save()
        if stop.reached(step_no):  # preempted: save this step and stop (--resume goes on)
            flush()
            if managed():  # a rollback now: stop at the next step boundary instead
                continue
            if saved_at != step_no:
                save()
            logging.warning("stopped after step %d (checkpoint saved)", step_no)
            break
    flush()
    if controller is not None and controller.halt_report is not None:
        final = run.evaluator(state.params["policy"])  # where the halted run stands
        final_step = int(state.step)
    return state, final, final_step


class _Pace:
    """Steady-state speed and ETA: timed from the end of the first step of this process, so
    compilation does not count (evaluations and checkpoints between do)."""

    def __init__(self) -> None:
        self.first = True
        self.since: tuple[int, float] | None = None

    def stepped(self, step: int) -> None:
        if self.first:
            self.first = False
            self.since = (step, time.time())

    def describe(self, step: int, total: int) -> str:
        if self.since is None or step <= self.since[0]:
            return "measuring speed"
        rate = (step - self.since[0]) / max(time.time() - self.since[1], 1e-9)
        left = (total - step) / rate
        return f"{rate:.1f} steps/s, ETA {int(left // 60)}m{int(left % 60):02d}s"


def _check_replicas(run: _Run, state, step_no: int, events) -> None:
    """fm's cross-replica invariant (`fm.integrity`): every copy of a replicated block of the
    weights, reference weights and optimizer moments must agree bit for bit; else an alarm.

    Checked after placement or restore and before every checkpoint save. (Inside a step XLA
    may compute a replicated update once per shard and all-gather it, which overwrites a
    diverged copy: a check between steps sees what a step would silently paper over.)"""
    check = _compiled(("integrity", run.mesh), lambda: parallel.make_integrity_check(run.mesh))
    tree = {"params": state.params, "ref_params": state.ref_params, "opt": state.opt_state}
    bad = parallel.diverged(check(tree))
    if bad:
        events.write(
            {"step": step_no, "event": "alarm", "signals": ["replica_checksum"], "leaves": bad}
        )
        logging.error("step %d: replicas disagree on %s", step_no, ", ".join(bad))


def _text_step(learner, task: Task, state: TrainState, batch: PromptBatch, knobs, fparams, answers):
    """Rollout on device, reward on the host (text verifiers), learn on device."""
    if fparams is not None:
        state = learner["prepare"](state, fparams)
    rollout = learner["rollout"](state, batch, knobs, fparams)
    texts = task.decode_responses(parallel.fetch(rollout.response))
    rewards = {k: np.asarray(v, np.float32) for k, v in task.text_reward(texts, answers).items()}
    rewards = parallel.place_batch(rewards, parallel.mesh_of(batch.prompts))
    return learner["learn"](state, rollout, rewards, knobs, fparams)

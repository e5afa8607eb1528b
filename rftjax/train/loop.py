"""The outer training loop: set-up, start or resume, RL steps, summary.

Everything compiled lives in `step.py` / `stages.py`; set-up in `setup.py`, where a run begins
in `resume.py`, the host-side bookkeeping after each step (logs, fm's closed loop, evaluation,
checkpoints) in `supervisor.py`. Inside the hot loop every transfer is explicit: an implicit
one is a bug (a hidden host sync) and raises.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from rftjax import parallel
from rftjax.config import TrainConfig
from rftjax.train import preempt
from rftjax.train import summary as summaries
from rftjax.train.lock import LOCK_NAME, WorkdirLock
from rftjax.train.logs import read_jsonl
from rftjax.train.resume import Start, start_or_resume
from rftjax.train.setup import SHARED, CompileCache, Run, setup, to_prompt_batch
from rftjax.train.state import PromptBatch, TrainState
from rftjax.train.supervisor import Supervisor, check_replicas, open_logs


def run(cfg: TrainConfig, cache: CompileCache | None = None) -> dict[str, Any]:
    """Trains according to `cfg`; returns (and writes) the summary.

    SIGTERM / SIGINT (from the start on) stop the run after the RL step in flight, with a
    checkpoint of it and the summary ("preempted": true); `resume=True` continues it.
    `cache`: where compiled functions are kept (default: one cache per process, so that runs
    of one configuration compile once)."""
    workdir = os.path.abspath(cfg.workdir)
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        with preempt.Preemption() as stop, _lock(workdir):
            return _run(cfg, stop, SHARED if cache is None else cache)
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


def _run(cfg: TrainConfig, stop: preempt.Preemption, cache: CompileCache) -> dict[str, Any]:
    t_start = time.time()
    run_, model = setup(cfg, cache)
    try:
        stop.check("set-up")
        begun = start_or_resume(run_, model, stop)
        state = parallel.place_state(begun.state, run_.mesh)
        knobs = parallel.replicate(begun.knobs, run_.mesh)
        start = int(state.step)
        logs = open_logs(run_, begun, start)
        if run_.mesh is not None:  # a bad restore or placement shows before the first step
            check_replicas(run_, state, start, logs.events)
        t_rl = time.time()
        before = (begun.meta or {}).get("seconds") or {}

        def seconds() -> dict[str, float]:
            """Wall, warm-up and RL seconds of the run so far, over its resumed segments."""
            now = time.time()
            return {
                "wall": before.get("wall", 0.0) + now - t_start,
                "warmup": before.get("warmup", 0.0) + begun.warmup_seconds,
                "rl": before.get("rl", 0.0) + now - t_rl,
                "rl_segment": now - t_rl,
            }

        try:
            state, outcome = train(run_, begun, state, knobs, logs, stop, seconds)
        finally:
            for log in logs:
                if log is not None:
                    log.close()
    finally:
        run_.checkpointer.close()
    summary = summaries.summarize(cfg, outcome, read_jsonl(logs.events.path), seconds())
    if jax.process_index() == 0:
        summaries.write(run_.workdir, summary)
    return summary


def _buckets_note(rl) -> str:
    """What the console says of the learner's length buckets (they multiply compile time)."""
    if rl.buckets == 1:
        return ""
    why = "--length_buckets" if rl.length_buckets else f"chosen for {rl.max_new_tokens} slots"
    return f"; {rl.buckets} length buckets ({why}) compile a forward and backward each"


def train(run: Run, begun: Start, state: TrainState, knobs, logs, stop, seconds=None):
    """The RL loop from `state` (placed) to `cfg.steps`. Returns (state, `summary.Outcome`).
    Stops early, after a checkpoint of the last step, when `stop` (a `preempt.Preemption`) is
    reached, and where fm halts the run. `seconds()`: the run's timings so far (checkpoints
    keep them, so that a resumed run's summary counts every segment)."""
    cfg, task = run.cfg, run.task
    sup = Supervisor(run, begun, state, knobs, logs, seconds)
    start = step_no = int(state.step)
    while step_no < cfg.steps:
        step_no += 1
        with jax.transfer_guard("disallow"):
            knobs, fparams, offset = sup.step_inputs(step_no)
            raw = task.train_batch(step_no - 1 + offset, cfg.rl.prompts_per_step)
            batch = parallel.place_batch(to_prompt_batch(raw), run.mesh)
            if sup.pace.first:
                logging.info("compiling the train step (the first step waits for it%s) ...",
                             _buckets_note(cfg.rl))  # fmt: skip
            if run.learner.step is not None:
                state, metrics = run.learner.step(state, batch, knobs, fparams)
            else:
                answers = [a for a in raw.answer_text for _ in range(cfg.rl.group_size)]
                state, metrics = _text_step(run, state, batch, knobs, fparams, answers)
            decision = sup.on_step(step_no, metrics)
        last = step_no == cfg.steps
        if decision.action == "continue" and (step_no % cfg.eval_every == 0 or last):
            sup.evaluate(state, step_no)
        if decision.action == "continue" and (step_no % cfg.checkpoint_every == 0 or last):
            decision = sup.checkpoint(state, step_no)
        if decision.action == "continue" and stop.reached(step_no):
            decision = sup.preempted(state, step_no)
        if decision.action == "rollback":
            state, step_no = decision.state, decision.step
        elif decision.action != "continue":  # halt, stop
            break
    final, final_step = sup.finish(state)
    done = int(state.step)
    preempted = stop.signal is not None and done < cfg.steps
    outcome = summaries.Outcome(done, done - start, sup.initial, final, final_step, preempted)
    return state, outcome


def _text_step(run: Run, state: TrainState, batch: PromptBatch, knobs, fparams, answers):
    """Rollout on device, reward on the host (text verifiers), learn on device."""
    learner, task = run.learner, run.task
    if fparams is not None:
        state = learner.prepare(state, fparams)
    rollout = learner.rollout(state, batch, knobs, fparams)
    texts = task.decode_responses(parallel.fetch(rollout.response))
    rewards = {k: np.asarray(v, np.float32) for k, v in task.text_reward(texts, answers).items()}
    rewards = parallel.place_batch(rewards, parallel.mesh_of(batch.prompts))
    return learner.learn(state, rollout, rewards, knobs, fparams)

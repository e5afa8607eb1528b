"""The host side of the RL loop: logs, fm's closed loop, evaluation and checkpoints.

The loop dispatches compiled steps; after each one it hands the step's metrics (still on
device) to the `Supervisor` and gets back a `Decision`: go on, roll back to a restored state,
halt, or stop (preempted). Metrics of step t are read after step t+1 is dispatched, so the host
never waits on the device in the hot loop except at evaluation and checkpoint steps.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any, NamedTuple

import jax
from absl import logging

from fm import detect as fm_detect
from fm import report as fm_report
from rftjax import parallel
from rftjax.knobs import knobs_to_dict
from rftjax.train import console, manage
from rftjax.train.logs import JsonlLog, MetricsWriter
from rftjax.train.resume import Start, config_record
from rftjax.train.setup import Run


class Decision(NamedTuple):
    """What the loop does after a step: "continue", "rollback" (to `step`, with `state`),
    "halt" (fm gave up: end the run) or "stop" (preempted after a checkpoint)."""

    action: str
    step: int = 0
    state: Any = None


GO_ON = Decision("continue")


class Logs(NamedTuple):
    metrics: Any
    events: Any
    trajectories: Any = None


def open_logs(run: Run, begun: Start, start: int) -> Logs:
    """The run's logs, cut back to `start`. With several processes, process 0 alone writes
    them (they hold global values; constructing a log on resume rewrites the file). Events are
    the run's history (alarms and actions of timelines a rollback left included): a resumed run
    keeps those written up to its checkpoint."""
    if jax.process_index() != 0:
        return Logs(_Quiet(), _Quiet())
    cfg, workdir = run.cfg, run.workdir
    console.open_run_log(workdir, append=start > 0)  # the run holds its workdir now
    metrics = MetricsWriter(workdir, resume_step=start, tensorboard=cfg.tensorboard)
    kept = (begun.meta or {}).get("events_written")
    events = JsonlLog(os.path.join(workdir, "events.jsonl"), resume_step=start, keep=kept)
    for note in begun.notes:  # corrupt checkpoints set aside on resume
        events.write(note)
    trajectories = None
    if cfg.record_trajectories:
        path = os.path.join(workdir, "trajectories.jsonl")
        trajectories = JsonlLog(path, resume_step=start)
    return Logs(metrics, events, trajectories)


def alarm_event(step: int, values: dict[str, float]) -> dict[str, Any]:
    """events.jsonl's record of an alarm in a step's metrics: the flagged signals and scores."""
    reading = fm_detect.Reading.from_record(values)
    flagged = sorted(reading.flagged)
    scores = {name: reading.scores[name] for name in flagged if name in reading.scores}
    return {"step": step, "event": "alarm", "signals": flagged, "scores": scores}


class Supervisor:
    """Reads step metrics one step late into the logs, runs fm's closed loop (`--fm=full`),
    evaluates and saves checkpoints with what a resumed run needs to go on identically."""

    def __init__(self, run: Run, begun: Start, state, knobs, logs: Logs, seconds=None) -> None:
        """`state` and `knobs`: `begun`'s, placed on the run's mesh. `seconds()`: the run's
        timings so far, kept in each checkpoint."""
        self.run, self.cfg, self.logs = run, run.cfg, logs
        self.seconds = seconds
        self.record = config_record(run.cfg)  # what every checkpoint records of the config
        self.knobs = knobs  # placed; replaced by the controller's after a remedy
        self.initial = begun.evals["initial"]
        self.final, self.final_step = begun.evals["last"], begun.evals["last_step"]
        self.pending: list = []  # (step, metrics on device) of the step not yet read
        self.pace = Pace()
        meta = begun.meta
        self.saved_at = int(state.step) if meta is not None else None
        self.fm_failure = (meta or {}).get("fm_failure")
        self.manager = self.controller = None
        if self.cfg.fm == "full":  # diagnosis, rollback, knobs, verification, halt
            self.manager = manage.Manager(
                run.checkpointer,
                self.cfg.rl,
                state,
                knobs,
                window=self.cfg.fm_window,
                policy=self.cfg.fm_policy,
                seed=self.cfg.seed,
                diagnoser=self.cfg.fm_diagnoser,
                tools=run.task.tool_spec() is not None,
            )
            self.controller = self.manager.controller
            if meta is not None:
                self.manager.resume(meta)
            if self.fm_failure:  # management had failed before the restart: it stays off
                self.manager = None

    # -- what the next step runs with -------------------------------------------------------

    def step_inputs(self, step: int):
        """(knobs, fault params, data offset) for `step`: a remedy's knobs (made on one
        device: onto the mesh with the rest) and the fault's clock after rollbacks."""
        fparams = self.run.fault_params
        if self.controller is None:
            return self.knobs, fparams, 0
        self.knobs = parallel.replicate(self.controller.knob_values, self.run.mesh)
        return self.knobs, self.controller.shifted(fparams), self.controller.data_offset

    # -- after each step --------------------------------------------------------------------

    def on_step(self, step: int, metrics) -> Decision:
        """Step `step` was dispatched: reads the one before, queues this one, decides."""
        self.flush()
        self.pending.append((step, metrics))
        self.pace.stepped(step)
        return self.decide(step)

    def evaluate(self, state, step: int) -> None:
        self.final, self.final_step = self.run.evaluator(state.params["policy"]), step
        self.flush(self.final)
        logging.info("step %d: held-out accuracy %.3f", step, self.final["eval_accuracy"])

    def checkpoint(self, state, step: int) -> Decision:
        """Reads what is pending; saves `step` unless fm rolls back or halts first."""
        self.flush()
        decision = self.decide(step)
        if decision.action == "continue":
            self.save(state, step)
        return decision

    def preempted(self, state, step: int) -> Decision:
        """Stop requested: save this step and stop (--resume goes on); a rollback now stops
        at the next step boundary instead."""
        self.flush()
        decision = self.decide(step)
        if decision.action != "continue":
            return decision
        if self.saved_at != step:
            self.save(state, step)
        logging.warning("stopped after step %d (checkpoint saved)", step)
        return Decision("stop", step)

    def finish(self, state) -> tuple[dict, int | None]:
        """Reads what is pending; returns the last evaluation and its step (a halted run is
        evaluated where it stands)."""
        self.flush()
        if self.controller is not None and self.controller.halt_report is not None:
            self.final, self.final_step = (
                self.run.evaluator(state.params["policy"]),
                int(state.step),
            )
        return self.final, self.final_step

    # -- internals ---------------------------------------------------------------------------

    def decide(self, step: int) -> Decision:
        """fm's rollback (dropping the results of steps after the restored one) or halt."""
        if self.manager is None:
            return GO_ON
        if self.controller.halt_report is not None:
            return Decision("halt", step)
        restored = self.controller.take_restore(step)
        if restored is None:
            return GO_ON
        self.pending.clear()
        with jax.transfer_guard("allow"):
            state = parallel.place_state(self.controller.state, self.run.mesh)
        self.saved_at = restored
        for log in (self.logs.metrics, self.logs.trajectories):
            if log is not None:
                log.cut(restored)
        return Decision("rollback", restored, state)

    def flush(self, extra=None) -> None:
        while self.pending:
            step, metrics = self.pending.pop()
            metrics = dict(parallel.fetch(metrics))
            rows = metrics.pop("trajectories", None)
            if self.logs.trajectories is not None:
                record = {"step": step, **{k: v.tolist() for k, v in rows.items()}}
                self.logs.trajectories.write(record)
            values = {k: float(v) for k, v in metrics.items()}
            self.logs.metrics.write_step(step, {**values, **(extra or {})})
            if values.get("alarm", 0.0) > 0:
                self.event(alarm_event(step, values))
            if self.manager is not None:
                self.observe(step, values)
            rate, eta = self.pace.rate(step, self.cfg.steps)
            console.progress(step, self.cfg.steps, rate, eta, f"reward {values['reward_mean']:.3f}")
            if step % self.cfg.log_every == 0 or step == self.cfg.steps:
                self.progress(step, values)

    def observe(self, step: int, values: dict[str, float]) -> None:
        with jax.transfer_guard("allow"):  # a restore reads a checkpoint
            try:
                observed = self.manager.observe(step, values)
            except Exception as e:  # noqa: BLE001 - fm must not lose the run
                self.fm_failed(step, "remediator", e)
                observed = []
        for event in observed:
            self.event(event)

    def event(self, event: dict[str, Any]) -> None:
        """JSON in events.jsonl, a sentence on the console."""
        self.logs.events.write(event)
        logging.warning("%s", fm_report.describe(event), extra=console.STORY)

    def progress(self, step: int, values: dict[str, float]) -> None:
        logging.info(
            "step %d/%d reward %.3f kl %.4f entropy %.3f len %.2f (%s)",
            step,
            self.cfg.steps,
            values["reward_mean"],
            values["kl_ref"],
            values["entropy"],
            values["length_mean"],
            self.pace.describe(step, self.cfg.steps),
            extra=console.PROGRESS,  # on a terminal the bar shows it
        )

    def fm_failed(self, step: int, where: str, error: Exception) -> None:
        """fm's own failure: recorded, and training goes on without management (with
        --fm_strict: raised)."""
        if self.cfg.fm_strict:
            raise error
        self.fm_failure = f"{where}: {type(error).__name__}: {error}"
        trace = "".join(traceback.format_exception(error, limit=-4))[-2000:]
        self.logs.events.write(
            {
                "step": step,
                "event": "fm_error",
                "where": where,
                "error": self.fm_failure,
                "traceback": trace,
            }
        )
        logging.error("step %d: fm failed in %s; training goes on unmanaged", step, self.fm_failure)
        self.manager = None

    def save(self, state, step: int) -> None:
        """Checkpoint of `step` with what a resumed run needs to go on identically."""
        run = self.run
        if run.mesh is not None:
            check_replicas(run, state, step, self.logs.events)
        meta = {
            "config": self.record,
            "knobs": knobs_to_dict(self.knobs),
            "eval_initial": self.initial,
            "eval_last": self.final,
            "eval_last_step": self.final_step,
            "data_cursor": step,
        }
        if self.controller is not None:
            meta.update(self.controller.progress())
        if self.manager is not None:
            try:
                self.manager.saved(step)
                meta["remediator"] = self.manager.state_dict()
            except Exception as e:  # noqa: BLE001 - fm must not lose the run
                self.fm_failed(step, "remediator", e)
        if self.fm_failure:
            meta["fm_failure"] = self.fm_failure
        meta["events_written"] = self.logs.events.count
        if self.seconds is not None:
            meta["seconds"] = self.seconds()
        run.checkpointer.save(step, state, meta)
        self.saved_at = step


class Pace:
    """Steady-state speed and ETA: steps dispatched since the first step of this process
    (whose call compiles, so compilation does not count; evaluations and checkpoints between
    do), replayed steps after a rollback included."""

    def __init__(self) -> None:
        self.first = True
        self.since = 0.0
        self.steps = 0  # dispatched after the first

    def stepped(self, step: int) -> None:
        del step
        if self.first:
            self.first, self.since = False, time.time()
        else:
            self.steps += 1

    def rate(self, step: int, total: int) -> tuple[float | None, float | None]:
        """(steps/s, seconds left to `total` from `step`), or (None, None) before a measure."""
        if not self.steps:
            return None, None
        rate = self.steps / max(time.time() - self.since, 1e-9)
        return rate, (total - step) / rate

    def describe(self, step: int, total: int) -> str:
        return console.pace_text(*self.rate(step, total))


def check_replicas(run: Run, state, step: int, events) -> None:
    """fm's cross-replica invariant (`fm.integrity`): every copy of a replicated block of the
    weights, reference weights and optimizer moments must agree bit for bit; else an alarm.

    Checked after placement or restore and before every checkpoint save. (Inside a step XLA
    may compute a replicated update once per shard and all-gather it, which overwrites a
    diverged copy: a check between steps sees what a step would silently paper over.)"""
    build = lambda: parallel.make_integrity_check(run.mesh)  # noqa: E731
    check = run.cache.get(("integrity", run.mesh), build)
    tree = {"params": state.params, "ref_params": state.ref_params, "opt": state.opt_state}
    bad = parallel.diverged(check(tree))
    if bad:
        events.write(
            {"step": step, "event": "alarm", "signals": ["replica_checksum"], "leaves": bad}
        )
        logging.error("step %d: replicas disagree on %s", step, ", ".join(bad))


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

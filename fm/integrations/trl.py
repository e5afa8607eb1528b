"""fm online in a TRL (or any `transformers.Trainer`) run: `FMCallback`.

    from fm.integrations.trl import FMCallback
    trainer = GRPOTrainer(..., callbacks=[FMCallback(action="stop")])

At each logging step the callback maps the trainer's logged metrics to fm's signals with the
TRL table of `fm.logs.mappings` (set `logging_steps=1` to watch every step), feeds them to
fm's detector (`fm.logs.monitor.Monitor`, the same detector and diagnoser as `fm.analyze`) and,
`evidence_steps` after an alarm, logs the diagnosis (logger "fm", and `events`). Then, by
`action`:

  "log"       nothing more.
  "stop"      stops training (`control.should_training_stop`) and saves a checkpoint
              (`control.should_save`) whose trainer_state.json holds the run's log history.
  "rollback"  restores the model's weights and the optimizer's state from the callback's last
              healthy snapshot (taken every `snapshot_every` optimizer steps in host memory,
              healthy once `healthy_steps` alarm-free steps followed it) and multiplies the
              learning rate by `lr_scale` (every param group and the scheduler's base rates);
              if alarms go on `verify_steps` steps later, or no healthy snapshot precedes the
              alarm, it stops as "stop" does.

What TRL does not allow, and the callback therefore does not do: the step counter, the
learning-rate schedule's position, the data order and TRL's buffered generations are not
rewound (a rollback restores weights and optimizer moments; training then goes on from the
current step with new batches); the reference model is not touched; a rollback is refused when
the model is sharded or replicated across processes (DeepSpeed, FSDP, several processes), where
a host snapshot of one process's parameters is not the model. Snapshots cost one copy of the
weights and optimizer state in host memory.

Needs the `trl` extra (transformers' `TrainerCallback`; torch for the rollback).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback

from fm import detect
from fm.logs import mappings, monitor

log = logging.getLogger("fm")
ACTIONS = ("log", "stop", "rollback")


class FMCallback(TrainerCallback):
    """fm's detector and diagnoser on a Trainer's logs, with stop or rollback on alarm."""

    def __init__(
        self,
        *,
        action: str = "log",
        lr_scale: float = 0.5,
        snapshot_every: int = 5,
        healthy_steps: int = 5,
        verify_steps: int = 5,
        config: detect.DetectConfig | None = None,
        events_file: str | None = "fm_events.jsonl",
    ) -> None:
        """`events_file`: written in the run's output_dir (None: events only in memory)."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if not 0 < lr_scale:
            raise ValueError(f"lr_scale must be > 0, got {lr_scale!r}")
        for name, value in (("snapshot_every", snapshot_every), ("healthy_steps", healthy_steps),
                            ("verify_steps", verify_steps)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.action = action
        self.lr_scale = lr_scale
        self.snapshot_every = snapshot_every
        self.healthy_steps = healthy_steps
        self.verify_steps = verify_steps
        self.config = config
        self.events_file = events_file
        self.table = mappings.TRL
        self.monitor: monitor.Monitor | None = None
        self.events: list[dict[str, Any]] = []
        self.unknown: tuple[str, ...] = ()
        self.snapshots: list[tuple[int, Any]] = []  # (step, snapshot), oldest first
        self.last_alarm = -(10**9)
        self.rolled_back_at: int | None = None  # the step of the last rollback
        self.stopped = False
        self._path: str | None = None

    # -- Trainer events ------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self.action == "rollback":
            why = _unshardable(args)
            if why:
                raise ValueError(f"FMCallback(action='rollback') cannot roll back here: {why}")
        if self.events_file:
            self._path = os.path.join(args.output_dir, self.events_file)
            os.makedirs(args.output_dir, exist_ok=True)
            open(self._path, "w").close()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if self.action == "rollback" and step % self.snapshot_every == 0 and not self.stopped:
            self.snapshots.append((step, _snapshot(model, optimizer)))
            self.snapshots = self.snapshots[-3:]

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None,
               lr_scheduler=None, **kwargs):  # fmt: skip
        if not logs or self.stopped or any(k.startswith("eval_") for k in logs):
            return
        names = set(logs)
        used = mappings.resolve(self.table, names).used
        if not used:  # the end-of-training summary, or a log without training metrics
            return
        if self.monitor is None:
            self.monitor = monitor.Monitor(tuple(used), config=self.config, trainer="trl")
            self.unknown = mappings.resolve(self.table, names).unknown
            self._emit({"step": state.global_step, "event": "start", "table": self.table.tag,
                        "monitored": list(self.monitor.watched), "unknown": list(self.unknown),
                        "cannot_see": list(self.monitor.view.invisible),
                        **self.monitor.choice.as_json()})  # fmt: skip
        step = state.global_step
        values = {s: logs.get(name) for s, name in used.items()}
        for event in self.monitor.observe(step, values):
            self._emit(event)
            if event["event"] == "alarm":
                self.last_alarm = step
            if event["event"] == "diagnosis":
                log.warning("fm: alarm at step %d: %s", event["alarm_step"], event["summary"])
                self._act(step, event, control, model, optimizer, lr_scheduler)
        if self.rolled_back_at is not None and step >= self.rolled_back_at + self.verify_steps:
            if self.last_alarm > self.rolled_back_at:
                self._stop(step, control, "the alarm returned after the rollback")
            else:
                self._emit({"step": step, "event": "verification", "outcome": "recovered"})
                self.rolled_back_at = None

    # -- actions -------------------------------------------------------------------------

    def _act(self, step, diagnosis, control, model, optimizer, lr_scheduler) -> None:
        if self.action == "log":
            return
        if self.action == "stop" or self.rolled_back_at is not None:
            self._stop(step, control, f"diagnosed {diagnosis['top']} ({diagnosis['family']})")
            return
        alarm_step = diagnosis["alarm_step"]
        healthy = [(s, snap) for s, snap in self.snapshots if s + self.healthy_steps < alarm_step]
        if not healthy:
            self._stop(step, control, "no healthy snapshot before the alarm")
            return
        target, snap = healthy[-1]
        _restore(model, optimizer, snap)
        lrs = _scale_lr(optimizer, lr_scheduler, self.lr_scale)
        self.snapshots = [(s, x) for s, x in self.snapshots if s <= target]
        self.rolled_back_at = step
        self._emit({"step": step, "event": "action", "restored_to": target,
                    "actions": [{"remedy": "rollback", "knobs": {}},
                                {"remedy": "lr_scale", "knobs": {"lr": lrs}}]})  # fmt: skip
        log.warning("fm: rolled back to step %d, learning rate now %s", target, lrs)

    def _stop(self, step: int, control, reason: str) -> None:
        control.should_training_stop = True
        control.should_save = True
        self.stopped = True
        self._emit({"step": step, "event": "halt", "reason": reason,
                    "diagnosis": self.monitor.diagnoses[-1]["top"]
                    if self.monitor and self.monitor.diagnoses else None})  # fmt: skip
        log.warning("fm: stopping training at step %d: %s", step, reason)

    def _emit(self, event: Mapping[str, Any]) -> None:
        self.events.append(dict(event))
        if self._path:
            with open(self._path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")


def _unshardable(args) -> str | None:
    """Why a host snapshot of this process's model is not the model, or None."""
    if getattr(args, "deepspeed", None):
        return "DeepSpeed shards or replicates the model"
    if getattr(args, "fsdp", None):
        return "FSDP shards the model"
    if getattr(args, "world_size", 1) > 1:
        return f"{args.world_size} processes hold the model"
    return None


def _snapshot(model, optimizer) -> dict[str, Any]:
    import copy

    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {"model": weights, "optimizer": copy.deepcopy(optimizer.state_dict())}


def _restore(model, optimizer, snap: Mapping[str, Any]) -> None:
    """Weights and optimizer moments from `snap`; the param groups keep their current
    learning rates (the schedule is not rewound)."""
    model.load_state_dict(snap["model"])
    lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(snap["optimizer"])
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def _scale_lr(optimizer, lr_scheduler, scale: float) -> list[float]:
    """Multiplies every param group's lr (and a scheduler's base rates, so that the schedule
    keeps the change) by `scale`; returns the new rates."""
    if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
        lr_scheduler.base_lrs = [lr * scale for lr in lr_scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * scale
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * scale
    return [group["lr"] for group in optimizer.param_groups]

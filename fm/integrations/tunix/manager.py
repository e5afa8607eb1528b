"""fm's closed loop around one Tunix GRPO learner: `Manager` (set-up, host statistics,
detector, remediator, events) and its `Config`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as _pp
from tunix.sft import metrics_logger as _tunix_metrics

from fm import detect, diagnose, remediate
from fm import monitor as fm_monitor
from fm.integrations.tunix import step as _step
from fm.integrations.tunix.control import Controller, _Dataset, _Hooks, _Pinned
from fm.integrations.tunix.step import PREFIX, _copy, _monitor_state, _value

log = logging.getLogger(__name__)
_WHY = {
    "sampler_logp": "Tunix's vanilla rollout returns no log-probs",
    "coefficients": "Tunix's loss takes no coefficient probe",
    "tool_calls": "Tunix's GRPO learner has no tool use",
    "audits": "Tunix owns the weights between steps; fm does not fingerprint them",
    "'grads'": "the actor optimizer is not wrapped with monitor_optimizer",
    "verifier_rewards": "no shadow_reward_fn was given to the Manager",
    "ref_logp": "GRPOConfig.beta is 0: Tunix computes no reference log-probs",
}


# -- settings ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Settings of `Manager`.

    Attributes:
      detect: the detector's window and warm-up (its thresholds are fm's defaults).
      signals: monitored statistics (default: `fm.detect.default_signals()` less the ones this
        set-up cannot compute).
      remediate: False: detect and diagnose only.
      diagnoser: "rules" (`fm.diagnose.diagnose`) or "learned" (`fm.diagnose.Learned`).
      verify_window, healthy_window, evidence_steps: as in `fm.remediate.Remediator`.
    """

    detect: detect.DetectConfig = detect.DetectConfig()
    signals: tuple[detect.Signal, ...] | None = None
    remediate: bool = True
    diagnoser: str = "rules"
    verify_window: int = 10
    healthy_window: int = 5
    evidence_steps: int = 2

    def __post_init__(self):
        if self.diagnoser not in ("rules", "learned"):
            raise ValueError(f"diagnoser must be 'rules' or 'learned', got {self.diagnoser!r}")
        for name in ("verify_window", "healthy_window", "evidence_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")


# -- the manager --------------------------------------------------------------------------------


class Manager:
    """fm's closed loop around one Tunix GRPO learner. Create it before the learner (for
    `checkpointing_options`), `attach` it to the learner, train on `dataset(...)`. After
    training: `events` (alarm, diagnosis, action, verification, halt, fm_error records, also in
    ``workdir/events.jsonl``), `records` (one dict of statistics a step, also
    ``workdir/metrics.jsonl``), `summary()`."""

    def __init__(
        self,
        config: Config = Config(),
        *,
        workdir: str | None = None,
        shadow_reward_fn: Callable[..., Sequence[float]] | None = None,
        diagnoser: Callable[..., diagnose.Diagnosis] | None = None,
    ) -> None:
        """`shadow_reward_fn`: a redundant verifier (Tunix's reward-function signature) whose
        scores fm compares with the rewards (``reward_shadow_gap``) and fails over to;
        `diagnoser`: replaces the one `config` names."""
        self.config, self.workdir = config, workdir
        self.shadow_reward_fn = shadow_reward_fn
        self.pins = _Pinned()
        self.data: _Dataset | None = None
        self.events: list[dict[str, Any]] = []
        self.records: list[dict[str, float]] = []
        self.halt_report: dict[str, Any] | None = None
        self.unmanaged = False
        self._diagnoser = diagnoser
        self._host: dict[int, dict[str, float]] = {}
        self._optimizer: dict[int, dict[str, jax.Array]] = {}
        self._lock = threading.Lock()
        self._learner = None
        self.signals: tuple[detect.Signal, ...] = ()  # set by attach
        self.unavailable: list[tuple[str, str]] = []
        if workdir:
            os.makedirs(workdir, exist_ok=True)

    # - set-up -

    def checkpointing_options(self, *, every: int, keep: int = 3) -> ocp.CheckpointManagerOptions:
        """Orbax options for Tunix's checkpoints: one every `every` steps, saved synchronously,
        the latest `keep` kept and, beside them, the healthy checkpoints fm pinned."""
        return ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            enable_async_checkpointing=False,
            preservation_policy=_pp.AnyPreservationPolicy([_pp.LatestN(n=keep), self.pins]),
        )

    def dataset(self, data: Iterable) -> Iterable:
        """`data` as an iterator whose next batches fm can skip (the ``skip_data`` remedy)."""
        self.data = _Dataset(data)
        return self.data

    def attach(self, learner: Any) -> Manager:
        """Wires fm into a constructed `GRPOLearner` (before `train`): the loss's in-step
        statistics, the ``metric_fns`` hook, the training hooks, the detector, the
        remediator. If fm fails to set itself up, that is an ``fm_error`` and Tunix is left
        as it was (it trains unmanaged)."""
        self._learner = learner
        try:
            self._build(learner)
        except Exception:  # noqa: BLE001 - before touching Tunix: it trains unmanaged
            self._error("attach")
            return self
        cluster, trainer = learner.rl_cluster, learner.rl_cluster.actor_trainer
        trainer.with_loss_fn(
            _step._wrap_loss(
                trainer.loss_fn,
                self._trace_error,
                self._step_keys,
                group_size=self.group_size,
                max_len=self.max_len,
                **self._pad_eos,
            ),
            has_aux=True,
        )
        trainer.with_rl_metrics_to_log(
            {**trainer.rl_metrics_to_log, **{PREFIX + k: np.mean for k in self._step_keys}}
        )
        learner.metric_fns = [*learner.metric_fns, self._metric_fn]
        trainer.with_training_hooks(_Hooks(self, trainer.training_hooks))
        del cluster
        return self

    def _build(self, learner: Any) -> None:
        """fm's side of `attach`: what Tunix provides, the monitor, its compiled detector
        update, the controller and the remediator."""
        cluster, trainer = learner.rl_cluster, learner.rl_cluster.actor_trainer
        rollout = cluster.cluster_config.rollout_config
        rollout = rollout[next(iter(rollout))] if isinstance(rollout, dict) else rollout
        self.group_size = int(learner.algo_config.num_generations)
        self.max_len = int(rollout.max_tokens_to_generate)
        self._pad_eos = dict(pad_id=cluster.rollout.pad_id(), eos_id=cluster.rollout.eos_id())
        self._step_keys = self._in_step_keys(learner)
        monitored = _monitor_state(trainer.optimizer)
        self._optimizer_keys = sorted(monitored.stats) if monitored is not None else []
        inputs = {"rewards", "advantages", "lengths", "truncated", "response", "response_mask"}
        inputs |= {"loss_mask", "logp", "entropy"}
        inputs |= {"ref_logp"} if learner.algo_config.beta != 0.0 else set()
        inputs |= {"verifier_rewards"} if self.shadow_reward_fn is not None else set()
        inputs |= {"grads", "updates", "params", "lr"} if self._optimizer_keys else set()
        # The public in-step API decides what can be watched from what Tunix provides; its
        # detector runs on the host over the statistics gathered from the three stages.
        self.monitor = fm_monitor.monitor(
            group_size=self.group_size,
            max_len=self.max_len,
            inputs=inputs,
            signals=self.config.signals,
            audits=False,
            config=self.config.detect,
        )
        self.signals = self.monitor.detector.signals
        self.unavailable = [
            (name, "; ".join([why, *[w for k, w in _WHY.items() if k in why]]))
            for name, why in self.monitor.unavailable
        ]
        # Placed like the jitted update's outputs, so that it compiles once.
        self.fm_state = jax.device_put(self.monitor.init(), jax.devices()[0])

        def update(stats, state):
            _, out, state = self.monitor.update(fm_monitor.StepInputs(), state, stats=stats)
            return detect.flags_to_dict(self.monitor.detector, out), state

        # Compiled once, ahead of time: Tunix calls the last step's hook outside the mesh
        # context of the others, which would make a jitted function compile again.
        zeros = {sig.name: np.zeros((), np.float32) for sig in self.signals}
        self._update = jax.jit(update).lower(zeros, self.fm_state).compile()
        self.controller = Controller(self, learner)
        self.remediator = None
        if self.config.remediate:
            chosen = self._diagnoser or (
                diagnose.Learned() if self.config.diagnoser == "learned" else diagnose.diagnose
            )
            self.remediator = remediate.Remediator(
                self.controller,
                diagnoser=chosen,
                verify_window=self.config.verify_window,
                healthy_window=self.config.healthy_window,
                evidence_steps=self.config.evidence_steps,
            )

    def _in_step_keys(self, learner: Any) -> list[str]:
        """The keys `step_stats` returns for this learner's examples."""
        b, t = self.group_size, 2
        ref = jax.ShapeDtypeStruct((b, t), jnp.float32) if learner.algo_config.beta else None
        example = _step._Example(
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32), ref
        )
        logits = jax.ShapeDtypeStruct((b, t, 3), jnp.float32)
        shapes = jax.eval_shape(
            lambda e, x: _step.step_stats(
                e, x, group_size=self.group_size, max_len=self.max_len, **self._pad_eos
            ),
            example,
            logits,
        )
        return sorted(shapes)

    def _host_stats(self, rewards, advantages, shadow):
        """Reward, group and advantage statistics (rewards, advantages f32[B]; shadow: the
        redundant verifier's f32[B] or None), through `fm.monitor`'s stage functions."""
        inputs = fm_monitor.StepInputs(
            rewards=rewards,
            verifier_rewards=shadow,
            advantages=advantages[:, None],
            loss_mask=jnp.ones((rewards.shape[0], 1), jnp.float32),
        )
        return {
            **fm_monitor.rollout_statistics(inputs, group_size=self.group_size, max_len=1),
            **fm_monitor.token_statistics(inputs, group_size=self.group_size),
        }

    # - what Tunix calls -

    def _metric_fn(self, prompts, completions, rewards, advances, **kwargs):
        """Tunix's ``metric_fns`` hook, once a step before the update: the host statistics
        (also returned to Tunix's metrics logger under `PREFIX`)."""
        if self.unmanaged:
            return {}
        try:
            step = self._learner.rl_cluster.actor_trainer.train_steps + 1
            r = jnp.asarray(rewards, jnp.float32)
            shadow = None
            if self.shadow_reward_fn is not None:
                scores = self.shadow_reward_fn(prompts=prompts, completions=completions, **kwargs)
                shadow = jnp.asarray(scores, jnp.float32)
            if not hasattr(self, "_host_jit"):
                self._host_jit = jax.jit(self._host_stats)
            values = self._host_jit(r, jnp.asarray(advances, jnp.float32), shadow)
            stats = {k: float(v) for k, v in values.items()}
            with self._lock:  # an evaluation pass later in the step must not replace it
                self._host.setdefault(step, stats)
            return {PREFIX + k: (v, np.mean) for k, v in stats.items()}
        except Exception:  # noqa: BLE001
            self._error("host statistics")
            return {}

    def _stash_optimizer_stats(self) -> None:
        """Before an update: a copy of the previous update's optimizer statistics (the state
        itself is donated to the next step)."""
        if self.unmanaged or not self._optimizer_keys:
            return
        try:
            trainer = self._learner.rl_cluster.actor_trainer
            state = _monitor_state(trainer.optimizer)
            if trainer.train_steps > 0:
                stats = {k: _value(v) for k, v in state.stats.items()}
                self._optimizer[trainer.train_steps] = _copy(stats)  # one dispatch
        except Exception:  # noqa: BLE001
            self._error("optimizer statistics")

    def _observe(self, step: int, loss: Any) -> None:
        """After Tunix wrote the metrics of `step` (one step late): detect, then remediate."""
        if self.unmanaged:
            return
        try:
            if step <= getattr(self, "_discard_through", 0):
                self.event(step, "discarded", reason="computed before the rollback")
                return
            record = self._record(step, loss)
            x = {s.name: np.asarray(record[s.name], np.float32) for s in self.signals}
            out, self.fm_state = self._update(x, self.fm_state)
            reading = detect.Reading.from_record(jax.device_get(out))
            flagged = reading.flagged
            record["alarm"] = reading.alarm
            self.records.append(record)
            self._write("metrics.jsonl", record)
            if record["alarm"]:
                self.event(step, "alarm", signals=flagged)
            if self.remediator is None:
                return
            trainer = self._learner.rl_cluster.actor_trainer
            latest = trainer.checkpoint_manager.latest_step()
            if latest is not None and latest <= step:
                self.remediator.saved(int(latest))
            # The diagnoser reads what the detector monitors: each of those has a scale floor,
            # while a statistic of few discrete values (the largest advantage of 4-sample
            # groups) would show a move of 1e7 robust σ against its zero spread.
            stats = {s.name: record[s.name] for s in self.signals}
            for e in self.remediator.observe(step, stats, record["alarm"], flagged):
                self.event(**e)
                if e["event"] == "action":  # the step in flight ran on the old weights
                    self._discard_through = trainer.train_steps
        except Exception:  # noqa: BLE001
            self._error("host side")

    def _record(self, step: int, loss: Any) -> dict[str, float]:
        trainer = self._learner.rl_cluster.actor_trainer
        record: dict[str, Any] = {"step": step, "loss": float(np.asarray(loss))}
        with self._lock:
            host = self._host.pop(step, None)
            for s in [s for s in self._host if s < step]:
                del self._host[s]
        if host is None:
            raise KeyError(f"no reward statistics for step {step} (Tunix's metric_fns hook)")
        record.update(host)
        mode = _tunix_metrics.Mode.TRAIN
        for k in self._step_keys:
            history = trainer.metrics_logger.get_metric_history(
                trainer.metrics_prefix, PREFIX + k, mode
            )
            record[k] = float(history[-1])
        if self._optimizer_keys:
            opt = self._optimizer.pop(step, None)
            if opt is None and trainer.train_steps == step:  # the last step: nothing in flight
                opt = {k: _value(v) for k, v in _monitor_state(trainer.optimizer).stats.items()}
            if opt is None:
                raise KeyError(f"no optimizer statistics for step {step}")
            record.update({k: float(v) for k, v in opt.items()})
            for s in [s for s in self._optimizer if s < step]:
                del self._optimizer[s]
        return record

    # - events -

    def event(self, step: int, event: str, **fields: Any) -> None:
        """Records an event (and appends it to ``workdir/events.jsonl``)."""
        record = {"step": int(step), "event": event, **fields}
        self.events.append(record)
        self._write("events.jsonl", record)
        if event in ("alarm", "diagnosis", "action", "verification", "halt", "fm_error"):
            log.warning("fm: %s", json.dumps(record, default=str)[:500])

    def _write(self, name: str, record: Mapping[str, Any]) -> None:
        if self.workdir:
            with open(os.path.join(self.workdir, name), "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def _error(self, where: str) -> None:
        """An exception inside fm: logged; training goes on without management."""
        self.unmanaged = True
        step = self._learner.rl_cluster.actor_trainer.train_steps if self._learner else 0
        try:
            self.event(step, "fm_error", where=where, traceback=traceback.format_exc())
        except Exception:  # noqa: BLE001 - even the log failing must not stop training
            log.exception("fm: could not record an fm_error")

    def _trace_error(self, where: str) -> None:
        """A failure while Tunix traces fm's in-step statistics (Tunix may trace twice)."""
        if not self.unmanaged:
            self._error(where)

    def summary(self) -> dict[str, Any]:
        """What fm saw and did: monitored and unavailable signals, alarm steps, diagnoses,
        actions, verifications, halt and its report, fm errors."""

        def of(kind):
            return [e for e in self.events if e["event"] == kind]

        return {
            "signals": [s.name for s in self.signals],
            "unavailable": [{"signal": n, "reason": r} for n, r in self.unavailable],
            "alarms": [e["step"] for e in of("alarm")],
            "diagnoses": of("diagnosis"),
            "actions": of("action"),
            "verifications": of("verification"),
            "halted": bool(of("halt")),
            "halt_report": self.halt_report,
            "fm_errors": of("fm_error"),
            "unmanaged": self.unmanaged,
        }

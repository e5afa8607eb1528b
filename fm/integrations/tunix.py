"""fm inside a Tunix GRPO learner: statistics, online detection, diagnosis and remediation.

Install with ``pip install -e ".[tunix]"`` (the ``google-tunix`` package, 0.1.5). Wiring,
around an ordinary Tunix set-up::

    manager = fm_tunix.Manager(workdir="run")
    optimizer = fm_tunix.monitor_optimizer(optax.adam(schedule), learning_rate=schedule)
    config = RLTrainingConfig(actor_optimizer=optimizer, checkpoint_root_directory="run/ckpt",
                              checkpointing_options=manager.checkpointing_options(every=5), ...)
    learner = GRPOLearner(RLCluster(...), GRPOConfig(...), reward_fns=...)
    manager.attach(learner)
    learner.train(manager.dataset(train_ds))

Where each statistic is computed (`fm.monitor`'s stage functions throughout):

- inside Tunix's compiled train step, through the two things Tunix lets a user put there:
  the policy loss (`attach` wraps the learner's loss: KL to the reference, entropy, lengths
  and truncation, repetition, the loss-mask audit; they travel in the loss's aux and come back
  one step late through Tunix's metrics logger) and the optimizer (`monitor_optimizer`:
  gradient, update and parameter norms, per-layer gradient norms, non-finite counts, the
  learning rate, kept in the optimizer state);
- on the host, from Tunix's ``metric_fns`` hook, which receives each step's rewards and
  advantages: reward and group statistics, the advantage cross-checks against fm's shadow
  estimator, and the gap to a redundant verifier when one is given (``shadow_reward_fn``).

`fm.monitor.Monitor` (built from the inputs this set-up provides; `Manager.unavailable` lists
the signals it cannot watch and why) runs its detector on the host each step, one step late,
from a Tunix training hook; alarms go to `fm.diagnose` and `fm.remediate`. What fm can do
through Tunix (`Controller.capabilities`):

- roll back through Tunix's own Orbax checkpoints (`CheckpointManager.maybe_restore`; they
  hold the weights only, so Adam's moments go on unless the plan resets them; Tunix's step
  counter does not rewind, so the steps after a rollback keep counting up);
- Tunix's own settings: β (``kl_coef``, `GRPOConfig.beta`) and ε (``eps_low``,
  `GRPOConfig.epsilon`; a change retraces the train step once), the sampler's temperature,
  top-p and top-k (`RolloutConfig`), the reward functions (``verifier_failover`` swaps them
  for the redundant verifier);
- with `monitor_optimizer`: ``lr_scale`` and ``lr_cap`` (arrays in the optimizer state:
  changing them never recompiles) and resetting Adam's moments; with `Manager.dataset`:
  skipping data (without it, a skip is recorded as ``unavailable``);
- halt with a report (Tunix's ``max_steps`` set to the current step: training ends cleanly).

What it cannot see: the sampler's own log-probs (Tunix's vanilla rollout returns none), tool
use, fingerprints of the weights and the reference, the loss's effective coefficients. An
exception inside fm (host statistics, detector, diagnoser, remediator, or tracing fm's in-step
statistics) is logged as an ``fm_error`` event and training goes on unmanaged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import orbax.checkpoint as ocp
    from flax import nnx
    from orbax.checkpoint._src.checkpoint_managers import preservation_policy as _pp
    from tunix.rl import common as _tunix_common
    from tunix.sft import hooks as _tunix_hooks
    from tunix.sft import metrics_logger as _tunix_metrics
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "fm.integrations.tunix needs Tunix (the google-tunix package), which is not installed: "
        'pip install -e ".[tunix]" (or pip install "rftjax[tunix]")'
    ) from e

from fm import detect, diagnose, remediate
from fm import monitor as fm_monitor

log = logging.getLogger(__name__)
PREFIX = "fm/"  # fm's keys in Tunix's loss aux and metrics
# Why Tunix cannot provide what some signals need (added to `fm.monitor`'s reasons).
_WHY = {
    "sampler_logp": "Tunix's vanilla rollout returns no log-probs",
    "coefficients": "Tunix's loss takes no coefficient probe",
    "tool_calls": "Tunix's GRPO learner has no tool use",
    "audits": "Tunix owns the weights between steps; fm does not fingerprint them",
    "'grads'": "the actor optimizer is not wrapped with monitor_optimizer",
    "verifier_rewards": "no shadow_reward_fn was given to the Manager",
    "ref_logp": "GRPOConfig.beta is 0: Tunix computes no reference log-probs",
}


# -- in the compiled step: the optimizer --------------------------------------------------------


class OptimizerState(NamedTuple):
    """State of `monitor_optimizer`: the wrapped optimizer's, the last update's statistics,
    the knobs."""

    inner: Any
    count: jax.Array  # i32[] updates so far
    stats: dict[str, jax.Array]  # fm.monitor.optimization_statistics of the last update
    lr: jax.Array  # f32[] the scheduled learning rate of the next update
    lr_scale: jax.Array  # f32[] multiplies every update
    lr_cap: jax.Array  # f32[] the effective learning rate never exceeds it (inf: no cap)


def monitor_optimizer(
    optimizer: optax.GradientTransformation, *, learning_rate: float | Callable[[Any], Any]
) -> optax.GradientTransformation:
    """Wraps Tunix's actor optimizer: `fm.monitor.optimization_statistics` of every update in the
    compiled step, and the knobs ``lr_scale`` and ``lr_cap`` (arrays: changing them never
    recompiles).

    Args:
      optimizer: the optax optimizer Tunix would get, learning rate included.
      learning_rate: the same learning rate (float or schedule of the step count) that
        `optimizer` applies: fm reports it and caps it (the update is scaled by
        ``lr_scale * min(1, lr_cap / lr)``).

    Returns:
      An optax `GradientTransformation` to pass as ``RLTrainingConfig.actor_optimizer``.
    """
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def stats_of(grads, updates, params, lr):
        inputs = fm_monitor.StepInputs(grads=grads, updates=updates, params=params, lr=lr)
        return fm_monitor.optimization_statistics(inputs)

    def init(params):
        inner = optimizer.init(params)
        try:
            shapes = jax.eval_shape(stats_of, params, params, params, 1.0)
            stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        except Exception:  # noqa: BLE001 - fm must not stop training: no statistics then
            log.exception("fm: optimizer statistics unavailable")
            stats = {}
        one = jnp.ones((), jnp.float32)
        lr = jnp.asarray(schedule(0), jnp.float32)
        return OptimizerState(inner, jnp.zeros((), jnp.int32), stats, lr, one, jnp.inf * one)

    def update(grads, state, params=None):
        updates, inner = optimizer.update(grads, state.inner, params)
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        cap = jnp.where(lr > state.lr_cap, state.lr_cap / jnp.where(lr > 0, lr, 1.0), 1.0)
        scale = state.lr_scale * cap
        updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        stats = state.stats
        if stats:  # the same keys as at init: the state's structure never changes
            stats = stats_of(grads, updates, params, lr * scale)
        count = state.count + 1
        next_lr = jnp.asarray(schedule(count), jnp.float32)
        return updates, OptimizerState(inner, count, stats, next_lr, state.lr_scale, state.lr_cap)

    return optax.GradientTransformation(init, update)


def _monitor_state(optimizer: Any) -> OptimizerState | None:
    """The `OptimizerState` inside an `nnx.Optimizer`'s state, or None."""
    mine = lambda x: isinstance(x, OptimizerState)  # noqa: E731
    found = [s for s in jax.tree.leaves(optimizer.opt_state, is_leaf=mine) if mine(s)]
    return found[0] if found else None


def _has_moments(x: Any) -> bool:
    return hasattr(x, "mu") and hasattr(x, "nu")


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _value(x: Any) -> Any:
    return x.get_value() if isinstance(x, nnx.Variable) else x


# -- in the compiled step: the policy loss ------------------------------------------------------


def _entropy(logits: jax.Array) -> jax.Array:
    """Next-token entropy in nats, f32[B, T] from logits f32[B, T, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def step_stats(
    example: Any, logits: jax.Array, *, group_size: int, pad_id: int, eos_id: int, max_len: int
) -> dict[str, jax.Array]:
    """fm statistics of one Tunix `TrainExample` (completion_ids [B, T], completion_mask
    [B, T], ref_per_token_logps [B, T] or None) and the policy's logits f32[B, T, V] at the
    completion's positions, through `fm.monitor`'s stage functions: KL to the reference,
    entropy, lengths (a response's non-pad tokens; truncated = no EOS among the T tokens),
    repetition, and the loss-mask audit (Tunix's mask against those lengths)."""
    logits = jax.lax.stop_gradient(logits)
    ids, mask = example.completion_ids, example.completion_mask
    logp = _tunix_common.selective_log_softmax(logits, ids)
    inputs = fm_monitor.StepInputs(
        lengths=jnp.sum(ids != pad_id, axis=1),
        truncated=~jnp.any(ids == eos_id, axis=1),
        response=ids,
        response_mask=mask,
        loss_mask=mask,
        logp=logp,
        ref_logp=example.ref_per_token_logps,
        entropy=_entropy(logits),
    )
    return {
        **fm_monitor.token_statistics(inputs, group_size=group_size),
        **fm_monitor.rollout_statistics(inputs, group_size=group_size, max_len=max_len),
    }


class _Example(NamedTuple):  # the fields of a Tunix TrainExample that `step_stats` reads
    completion_ids: Any
    completion_mask: Any
    ref_per_token_logps: Any


def _wrap_loss(
    inner: Callable,
    errors: Callable[[str], None],
    keys: Sequence[str],
    **kwargs: Any,
) -> Callable:
    """Tunix's loss with `step_stats` added to its aux under `PREFIX` (traced once). The
    logits come from a second, stop-gradient forward pass on the loss's inputs: Tunix's loss
    returns none, and its model call is a jitted function that cannot hand them out. Every
    one of `keys` is in the aux (NaN if fm failed to compute it): Tunix reads each key it was
    told to log and would stop on a missing one."""

    def loss_fn(model, train_example, algo_config):
        loss, aux = inner(model, train_example, algo_config)
        try:
            _, logits = _tunix_common.compute_per_token_logps(
                model,
                prompt_tokens=train_example.prompt_ids,
                completion_tokens=train_example.completion_ids,
                pad_id=kwargs["pad_id"],
                eos_id=kwargs["eos_id"],
                return_logits=True,
            )
            extra = step_stats(train_example, logits, **kwargs)
        except Exception:  # noqa: BLE001 - at trace time: Tunix's loss goes on alone
            errors("in-step statistics")
            extra = {}
        nan = jnp.full((), jnp.nan, jnp.float32)
        return loss, {**aux, **{PREFIX + k: extra.get(k, nan) for k in keys}}

    return loss_fn


# -- on the host: rewards and advantages --------------------------------------------------------


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


class _Pinned:
    """An Orbax preservation policy: keeps the checkpoints fm pinned (healthy rollback
    targets) beside whatever the other policies keep."""

    def __init__(self) -> None:
        self.steps: set[int] = set()

    def __deepcopy__(self, memo):  # Tunix deep-copies its training config: stay shared
        return self

    def should_preserve(self, checkpoints, *, context):
        del context
        return [c.step in self.steps for c in checkpoints]


class _Dataset:
    """A training dataset whose next batches can be skipped (`Controller.skip`)."""

    def __init__(self, data: Iterable) -> None:
        self._it: Iterator = iter(data)
        self.to_skip = 0
        self.skipped = 0

    def __iter__(self):
        return self

    def __next__(self):
        while self.to_skip > 0:
            next(self._it)
            self.to_skip -= 1
            self.skipped += 1
        return next(self._it)


# -- remediation through Tunix ------------------------------------------------------------------


class Controller:
    """`fm.remediate.Controller` over a Tunix learner: Tunix's checkpoints and settings, the
    `monitor` knobs when the optimizer has them, data skipping when the dataset went through
    `Manager.dataset`."""

    def __init__(self, manager: Manager, learner: Any) -> None:
        self.manager, self.learner = manager, learner
        self.cluster = learner.rl_cluster
        self.trainer = self.cluster.actor_trainer
        self.shadow = manager.shadow_reward_fn
        self.reward_fns = list(learner.reward_fns)

    def _rollout_configs(self) -> list[Any]:
        cfg = self.cluster.cluster_config.rollout_config
        return list(cfg.values()) if isinstance(cfg, dict) else [cfg]

    def restore(self, step: int) -> None:
        try:
            self.trainer.checkpoint_manager.maybe_restore(
                self.trainer.model, step=step, restore_only_lora_params=self.trainer._lora_enabled
            )
        except Exception as e:  # noqa: BLE001 - any failure: that checkpoint is unusable
            raise remediate.RestoreError(f"Tunix checkpoint {step}: {e}") from e
        if self.learner.should_sync_weights:  # the sampler holds its own copy of the weights
            params = nnx.state(self.trainer.model, nnx.Param)
            self.cluster.rollout.update_params(params, (nnx.Param,))

    def capabilities(self) -> remediate.Capabilities:
        """Tunix's settings fm can turn, the `monitor_optimizer` knobs when present, the
        verifier failover with a redundant verifier, moment resets with an Adam-like state."""
        knobs = set(self.knobs())
        switches = knobs & {"verifier_failover"}
        moments = any(
            hasattr(s, "mu") and hasattr(s, "nu")
            for s in jax.tree.leaves(self.trainer.optimizer.opt_state, is_leaf=_has_moments)
        )
        return remediate.Capabilities(
            knobs=frozenset(knobs - switches), switches=frozenset(switches), reset_moments=moments
        )

    def knobs(self) -> dict[str, float]:
        algo = self.learner.algo_config
        out = {"kl_coef": float(algo.beta), "eps_low": float(algo.epsilon)}
        rollout = self._rollout_configs()[0]
        out["temperature"] = float(rollout.temperature)
        if rollout.top_p is not None:
            out["top_p"] = float(rollout.top_p)
        if rollout.top_k is not None:
            out["top_k"] = float(rollout.top_k)
        state = _monitor_state(self.trainer.optimizer)
        if state is not None:
            out["lr"] = float(_value(state.lr))
            out["lr_scale"] = float(_value(state.lr_scale))
            out["lr_cap"] = float(_value(state.lr_cap))
        if self.shadow is not None:
            out["verifier_failover"] = float(self.learner.reward_fns != self.reward_fns)
        return out

    def set_knobs(self, **changes: float) -> None:
        algo, retrace = self.learner.algo_config, False
        for name, value in changes.items():
            if name == "kl_coef":
                algo.beta, retrace = float(value), True
            elif name == "eps_low":
                algo.epsilon, retrace = float(value), True
            elif name in ("temperature", "top_p", "top_k"):
                for cfg in self._rollout_configs():
                    setattr(cfg, name, int(value) if name == "top_k" else float(value))
            elif name in ("lr_scale", "lr_cap"):
                state = _monitor_state(self.trainer.optimizer)
                getattr(state, name).set_value(jnp.asarray(value, jnp.float32))
            elif name == "lr":
                raise ValueError("lr follows the schedule; fm changes lr_scale and lr_cap")
            elif name == "verifier_failover" and self.shadow is not None:
                self.learner.reward_fns = [self.shadow] if value else list(self.reward_fns)
            else:
                raise ValueError(f"Tunix has no knob {name!r}; it has {sorted(self.knobs())}")
        if retrace:  # β and ε are Python floats in Tunix's traced loss
            self.trainer.clear_jit_cache()

    def skip(self, n: int) -> None:
        if self.manager.data is None:
            self.manager.event(
                self.trainer.train_steps,
                "unavailable",
                remedy="skip_data",
                reason="the dataset did not go through Manager.dataset",
            )
            return
        self.manager.data.to_skip += int(n)

    def reset_moments(self) -> None:
        """Zeroes every `mu` / `nu` of the optimizer state (Adam's moments), keeping counts."""

        def zero(state):
            if hasattr(state, "mu") and hasattr(state, "nu"):
                for tree in (state.mu, state.nu):
                    for var in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
                        var.set_value(jnp.zeros_like(var.get_value()))
            return state

        jax.tree.map(zero, self.trainer.optimizer.opt_state, is_leaf=_has_moments)

    def pin(self, step: int) -> None:
        self.manager.pins.steps.add(int(step))

    def unpin(self, step: int) -> None:
        self.manager.pins.steps.discard(int(step))

    def halt(self, report: Mapping[str, Any]) -> None:
        """Tunix's ``max_steps`` set to the current step: its loops end after this step."""
        step = self.trainer.train_steps
        self.trainer.config.max_steps = step
        self.cluster.cluster_config.training_config.max_steps = step
        self.manager.halt_report = dict(report)


class _Hooks(_tunix_hooks.TrainingHooks):
    """Tunix training hooks: fm's host side, after each step's metrics are written."""

    def __init__(self, manager: Manager, chained: Any = None) -> None:
        self.manager, self.chained = manager, chained

    def _chain(self, name: str, *args: Any) -> None:
        if self.chained is not None:
            getattr(self.chained, name)(*args)

    def on_train_start(self, ctx):
        self._chain("on_train_start", ctx)

    def on_train_end(self, ctx):
        self._chain("on_train_end", ctx)

    def on_train_step_start(self, ctx):
        self.manager._stash_optimizer_stats()
        self._chain("on_train_step_start", ctx)

    def on_train_step_end(self, ctx, train_step, train_loss, step_time):
        self.manager._observe(int(train_step), train_loss)
        self._chain("on_train_step_end", ctx, train_step, train_loss, step_time)

    def on_eval_step_start(self, ctx):
        self._chain("on_eval_step_start", ctx)

    def on_eval_step_end(self, ctx, eval_loss):
        self._chain("on_eval_step_end", ctx, eval_loss)


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
            _wrap_loss(
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
        example = _Example(
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32), ref
        )
        logits = jax.ShapeDtypeStruct((b, t, 3), jnp.float32)
        shapes = jax.eval_shape(
            lambda e, x: step_stats(
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

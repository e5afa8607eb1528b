"""fm inside a Tunix GRPO learner: statistics, online detection, diagnosis and remediation.

Install with ``pip install -e ".[tunix]"`` (the ``google-tunix`` package). Wiring, around an
ordinary Tunix set-up::

    manager = fm_tunix.Manager(workdir="run")
    optimizer = fm_tunix.monitor(optax.adam(schedule), learning_rate=schedule)
    config = RLTrainingConfig(actor_optimizer=optimizer, checkpoint_root_directory="run/ckpt",
                              checkpointing_options=manager.checkpointing_options(every=5), ...)
    learner = GRPOLearner(RLCluster(...), GRPOConfig(...), reward_fns=...)
    manager.attach(learner)
    learner.train(manager.dataset(train_ds))

Where each statistic is computed (`fm.stats` functions throughout):

- inside Tunix's compiled train step, through the two things Tunix lets a user put there:
  the policy loss (`attach` wraps the learner's loss: KL to the reference, entropy, response
  lengths and truncation, repetition, and the sampler/trainer mismatch when Tunix computed old
  log-probs; returned in the loss's aux, read one step late through Tunix's metrics logger)
  and the optimizer (`monitor`: gradient / update / parameter norms, non-finite counts, the
  learning rate, kept in the optimizer state);
- on the host, from Tunix's ``metric_fns`` hook, which receives each step's rewards and
  advantages: reward and group statistics, the advantage cross-checks against fm's shadow
  estimator, and the gap to a redundant verifier when one is given (``shadow_reward_fn``).

The detector (`fm.detect`, jitted once) runs on the host each step, one step late, from a
Tunix training hook; alarms go to `fm.diagnose` and `fm.remediate`. What fm can do here:

- roll back through Tunix's own Orbax checkpoints (`CheckpointManager.maybe_restore`; they
  hold the weights only, so Adam's moments go on unless the plan resets them; Tunix's step
  counter does not rewind, so a rollback's steps keep counting up);
- Tunix's own settings: β (``kl_coef``, `GRPOConfig.beta`) and ε (``eps_low``,
  `GRPOConfig.epsilon`; a change retraces the train step once), the sampler's temperature,
  top-p and top-k (`RolloutConfig`), the reward functions (``verifier_failover`` swaps them for
  the redundant verifier);
- with `monitor`: ``lr_scale`` and ``lr_cap`` (runtime arrays in the optimizer state, never a
  recompile) and resetting Adam's moments; with `Manager.dataset`: skipping data;
- halt with a report (Tunix's ``max_steps`` set to the current step: training ends cleanly).

What it cannot see: the sampler's own log-probs (Tunix's vanilla rollout returns none; with
one policy iteration the learner's old log-probs are its current ones), tool use, weight or
reference fingerprints. An exception inside fm (host statistics, detector, diagnoser,
remediator, or tracing fm's in-step statistics) is logged as an ``fm_error`` event and
training goes on unmanaged.
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
from fm import stats as fs

log = logging.getLogger(__name__)
PREFIX = "fm/"  # fm's keys in Tunix's loss aux and metrics


# -- in the compiled step: the optimizer --------------------------------------------------------


class MonitorState(NamedTuple):
    """State of `monitor`: the wrapped optimizer's, the last step's statistics, the knobs."""

    inner: Any
    count: jax.Array  # i32[] updates so far
    stats: dict[str, jax.Array]  # fm.stats.optimization_stats of the last update
    lr: jax.Array  # f32[] the scheduled learning rate of the next update
    lr_scale: jax.Array  # f32[] multiplies every update
    lr_cap: jax.Array  # f32[] the effective learning rate never exceeds it (inf: no cap)


def monitor(
    optimizer: optax.GradientTransformation, *, learning_rate: float | Callable[[Any], Any]
) -> optax.GradientTransformation:
    """Wraps Tunix's actor optimizer: `fm.stats.optimization_stats` of every update inside the
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
        return fs.optimization_stats(grads, updates, params, lr=lr)

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
        return MonitorState(inner, jnp.zeros((), jnp.int32), stats, lr, one, jnp.inf * one)

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
        return updates, MonitorState(inner, count, stats, next_lr, state.lr_scale, state.lr_cap)

    return optax.GradientTransformation(init, update)


def _monitor_state(optimizer: Any) -> MonitorState | None:
    """The `MonitorState` inside an `nnx.Optimizer`'s state, or None."""
    found = [
        s
        for s in jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, MonitorState))
        if isinstance(s, MonitorState)
    ]
    return found[0] if found else None


def _value(x: Any) -> Any:
    return x.value if isinstance(x, nnx.Variable) else x


# -- in the compiled step: the policy loss ------------------------------------------------------


def _entropy(logits: jax.Array) -> jax.Array:
    """Next-token entropy in nats, f32[B, T] from logits f32[B, T, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def step_stats(
    model: Any, example: Any, *, pad_id: int, eos_id: int, max_len: int
) -> dict[str, jax.Array]:
    """fm statistics of one Tunix `TrainExample` (prompt_ids [B, P], completion_ids [B, T],
    completion_mask [B, T], ref_per_token_logps [B, T] or None, old_per_token_logps [B, T] or
    None) under the policy `model`: KL to the reference, entropy, lengths (truncated = no EOS
    among the T tokens), repetition, and the old/current mismatch when old log-probs exist."""
    logp, logits = _tunix_common.compute_per_token_logps(
        model,
        prompt_tokens=example.prompt_ids,
        completion_tokens=example.completion_ids,
        pad_id=pad_id,
        eos_id=eos_id,
        stop_gradient=True,
        return_logits=True,
    )
    mask = example.completion_mask
    ids = example.completion_ids
    out = {
        **fs.entropy_stats(_entropy(logits), mask),
        **fs.length_stats(jnp.sum(mask, axis=1), ~jnp.any(ids == eos_id, axis=1), max_len=max_len),
        **fs.token_stats(ids, mask),
    }
    if example.ref_per_token_logps is not None:
        out.update(fs.kl_stats(logp, example.ref_per_token_logps, mask))
    if example.old_per_token_logps is not None:
        out.update(fs.mismatch_stats(example.old_per_token_logps, logp, mask))
    return out


def _wrap_loss(inner: Callable, errors: Callable[[str], None], **kwargs: Any) -> Callable:
    """Tunix's loss with `step_stats` added to its aux under `PREFIX` (traced once)."""

    def loss_fn(model, train_example, algo_config):
        loss, aux = inner(model, train_example, algo_config)
        try:
            extra = step_stats(model, train_example, **kwargs)
        except Exception:  # noqa: BLE001 - at trace time: Tunix's loss goes on alone
            errors("in-step statistics")
            extra = {}
        return loss, {**aux, **{PREFIX + k: v for k, v in extra.items()}}

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
                getattr(state, name).value = jnp.asarray(value, jnp.float32)
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
                        var.value = jnp.zeros_like(var.value)
            return state

        jax.tree.map(
            zero,
            self.trainer.optimizer.opt_state,
            is_leaf=lambda x: hasattr(x, "mu") and hasattr(x, "nu"),
        )

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


class _Remediator(remediate.Remediator):
    """`fm.remediate.Remediator` that counts a remedy whose knob this trainer lacks as
    unsupported (instead of failing on the missing knob)."""

    def supported(self, remedy: str) -> bool:
        try:
            return super().supported(remedy)
        except KeyError:
            return False


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
        remediator."""
        self._learner = learner
        cluster, trainer = learner.rl_cluster, learner.rl_cluster.actor_trainer
        rollout = cluster.cluster_config.rollout_config
        rollout = rollout[next(iter(rollout))] if isinstance(rollout, dict) else rollout
        self.group_size = int(learner.algo_config.num_generations)
        self.max_len = int(rollout.max_tokens_to_generate)
        trainer.with_loss_fn(
            _wrap_loss(
                trainer.loss_fn,
                self._trace_error,
                pad_id=cluster.rollout.pad_id(),
                eos_id=cluster.rollout.eos_id(),
                max_len=self.max_len,
            ),
            has_aux=True,
        )
        self._step_keys = self._in_step_keys(learner)
        trainer.with_rl_metrics_to_log(
            {**trainer.rl_metrics_to_log, **{PREFIX + k: np.mean for k in self._step_keys}}
        )
        learner.metric_fns = [*learner.metric_fns, self._metric_fn]
        trainer.with_training_hooks(_Hooks(self, trainer.training_hooks))
        monitored = _monitor_state(trainer.optimizer)
        self._optimizer_keys = sorted(monitored.stats) if monitored is not None else []
        available = set(self._step_keys) | set(self._optimizer_keys) | set(self._host_keys())
        signals = self.config.signals or detect.default_signals(tools=False)
        self.signals = tuple(s for s in signals if s.name in available)
        self.missing = sorted({s.name for s in signals} - available)
        self.detector = detect.detector(self.signals, self.config.detect)
        self.det_state = self.detector.init()
        self._thresholds = self.detector.thresholds()
        self._update = jax.jit(self.detector.update)
        self.controller = Controller(self, learner)
        self.remediator = None
        if self.config.remediate:
            chosen = self._diagnoser or (
                diagnose.Learned() if self.config.diagnoser == "learned" else diagnose.diagnose
            )
            self.remediator = _Remediator(
                self.controller,
                diagnoser=chosen,
                verify_window=self.config.verify_window,
                healthy_window=self.config.healthy_window,
                evidence_steps=self.config.evidence_steps,
            )
        return self

    def _in_step_keys(self, learner: Any) -> list[str]:
        """The keys `step_stats` returns for this learner's examples."""
        keys = ["entropy_mean", "entropy_min_seq", "repetition_ratio", "ngram_repeat_ratio"]
        keys += ["unique_token_ratio", "length_mean", "length_std", "length_max", "length_min"]
        keys += ["clip_ratio", "length_at_cap"]
        if learner.algo_config.beta != 0.0:
            keys += ["kl_ref_k1", "kl_ref_k3", "kl_ref_max"]
        if learner.algo_config.num_iterations > 1:
            keys += ["mismatch_k3", "mismatch_max_abs", "is_ratio_mean", "is_ratio_max", "is_ess"]
        return keys

    def _host_keys(self) -> list[str]:
        zeros = jnp.zeros((self.group_size,), jnp.float32)
        keys = list(jax.eval_shape(self._host_stats, zeros, zeros, zeros))
        return keys if self.shadow_reward_fn else [k for k in keys if k != "reward_shadow_gap"]

    def _host_stats(self, rewards, advantages, shadow):
        mask = jnp.ones((rewards.shape[0], 1), jnp.float32)
        g = self.group_size
        return {
            **fs.reward_stats(rewards, group_size=g),
            **fs.advantage_stats(advantages[:, None], mask, rewards, group_size=g),
            **fs.reward_shadow_stats(rewards, shadow),
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
            shadow = r
            if self.shadow_reward_fn is not None:
                scores = self.shadow_reward_fn(prompts=prompts, completions=completions, **kwargs)
                shadow = jnp.asarray(scores, jnp.float32)
            if not hasattr(self, "_host_jit"):
                self._host_jit = jax.jit(self._host_stats)
            values = self._host_jit(r, jnp.asarray(advances, jnp.float32), shadow)
            stats = {k: float(v) for k, v in values.items()}
            if self.shadow_reward_fn is None:
                del stats["reward_shadow_gap"]
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
                stats = {k: jnp.copy(_value(v)) for k, v in state.stats.items()}
                self._optimizer[trainer.train_steps] = stats
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
            x = {s.name: jnp.asarray(record[s.name], jnp.float32) for s in self.signals}
            out, self.det_state = self._update(x, self.det_state, self._thresholds)
            flags = np.asarray(out.flags)
            flagged = [s.name for s, f in zip(self.signals, flags, strict=True) if f]
            record["alarm"] = bool(out.alarm)
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
        self._error(where)

    def summary(self) -> dict[str, Any]:
        """What fm saw and did: monitored and unavailable signals, alarm steps, diagnoses,
        actions, verifications, halt and its report, fm errors."""

        def of(kind):
            return [e for e in self.events if e["event"] == kind]

        return {
            "signals": [s.name for s in self.signals],
            "unavailable_signals": self.missing,
            "alarms": [e["step"] for e in of("alarm")],
            "diagnoses": of("diagnosis"),
            "actions": of("action"),
            "verifications": of("verification"),
            "halted": bool(of("halt")),
            "halt_report": self.halt_report,
            "fm_errors": of("fm_error"),
            "unmanaged": self.unmanaged,
        }

"""fm's hands in Tunix: the remediation `Controller` (checkpoints, settings, knobs), the
Orbax preservation policy for pinned checkpoints, the skippable dataset, the training hooks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from tunix.sft import hooks as _tunix_hooks

from fm import remediate
from fm.integrations.tunix.step import _has_moments, _monitor_state, _value

if TYPE_CHECKING:
    from fm.integrations.tunix.manager import Manager


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

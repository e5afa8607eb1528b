"""The RL step as pure functions of (state, batch, knobs): rollout, learn, and both fused.

`make_learner` does the Python-side setup (model graph, static config, reward function) and
returns a `Learner` of compiled functions. The stages themselves live in `stages.py`; `learn`
below composes them: regularizer hook -> reward pipeline -> reference log-probs -> advantages
-> minibatch updates -> statistics (fault, tools, fm).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

import faults
from faults import Fault
from fm import detect, scalars
from fm import monitor as fmm
from rftjax import parallel
from rftjax.config import RLConfig
from rftjax.knobs import Knobs
from rftjax.sampling import Rollout, repeat_rows
from rftjax.train import stages as st
from rftjax.train import update as up
from rftjax.train.stages import ADVANTAGE_ESTIMATORS, StepSpec, gae_advantages, grpo_advantages
from rftjax.train.state import (
    PromptBatch,
    TrainState,
    apply_update,
    init_state,
    learning_rate,
    make_optimizer,
    seal_weights,
)
from rftjax.train.trajectories import row_stats, trajectory_record

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "Learner",
    "PromptBatch",
    "TrainState",
    "apply_update",
    "gae_advantages",
    "grpo_advantages",
    "init_state",
    "learning_rate",
    "make_learner",
    "make_optimizer",
    "seal_weights",
]

RewardFn = Callable[[jax.Array, jax.Array], dict[str, jax.Array]]


class Learner(NamedTuple):
    """The compiled functions of one step configuration (see `make_learner`)."""

    prepare: Callable  # (state, fparams) -> state
    rollout: Callable  # (state, batch, knobs, fparams) -> Rollout
    learn: Callable  # (state, rollout, rewards, knobs, fparams) -> (state, metrics)
    step: Callable | None  # (state, batch, knobs, fparams) -> (state, metrics); jnp rewards


def make_learner(
    graphdef,
    cfg: RLConfig,
    *,
    eos_id: int,
    pad_id: int,
    reward_fn: RewardFn | None = None,
    monitor: fmm.Monitor | None = None,
    fault: Fault | None = None,
    trajectories: bool = False,
    tools=None,
    mesh=None,
) -> Learner:
    """Returns the compiled `Learner`: `prepare`, `rollout`, `learn` and (jnp reward) `step`.

    prepare(state, fparams) -> state: between-step hooks of a fault (weights, optimizer state);
      the identity without a fault. Call it before `rollout` when not using `step`.
    rollout(state, batch, knobs, fparams) -> Rollout with B = prompts × group_size rows.
    learn(state, rollout, rewards, knobs, fparams) -> (state, metrics); rewards: dict of f32[B]
      with at least "reward" (other keys are reported as reward components).
    step(state, batch, knobs, fparams) -> (state, metrics): prepare, rollout, reward_fn, learn
      in one program (None without `reward_fn`).
    metrics: an `fm.scalars.Scalars`, a mapping from name to value that leaves the program
      as one buffer per dtype (about 130 names with fm, whose separate buffers cost the host
      0.55 ms a step).

    With a `fault` (from `faults.make`), its hooks act at the trainer's hook points under the
    runtime `fparams` (`faults.FaultParams`; None without a fault), and the metrics gain
    "fault_active". The state must then come from `init_state(..., fault=fault)`.

    With a `monitor` (`fm.monitor.Monitor`), the step reports every statistic fm computes
    (token statistics per update, optimization statistics per update, trajectory aggregates and
    audits per step), runs fm's detector on them with the state in `state.fm`, and adds "alarm"
    and per-signal flags and scores to the metrics. The state must then come from
    `init_state(..., monitor=monitor)`. Without one, it reports `stages.PLAIN_STATS`.

    With `tools` (a `rftjax.tools.ToolSpec`), rollouts call tools (observation tokens are
    context, outside the loss mask) and the metrics gain tool statistics.

    With `trajectories`, the metrics also hold "trajectories": a dict of per-completion arrays
    [B] (see `trajectory_record`) for FaultBench's trajectory-level records.

    With a `mesh` (`rftjax.parallel.make_mesh`), the state must be placed by
    `parallel.place_state` and batches by `parallel.place_batch`: rollout and learning run
    SPMD on that mesh, the KV cache is sharded like the batch, and every returned state is
    constrained to the shardings it came in with (so the next call does not recompile).
    """
    _check_monitor(monitor, cfg)
    s = StepSpec(
        graphdef=graphdef,
        cfg=cfg,
        optimizer=make_optimizer(cfg),
        eos_id=eos_id,
        pad_id=pad_id,
        hooks=fault.hooks if fault is not None else faults.NO_HOOKS,
        fault=fault,
        monitor=monitor,
        tools=tools,
        mesh=mesh,
        trajectories=trajectories,
    )

    def rollout(state: TrainState, batch: PromptBatch, knobs: Knobs, fparams=None) -> Rollout:
        ctx = st.fault_context(s, state, fparams)
        return st.sample(s, state, s.hooks.data(batch, ctx), knobs, ctx)

    def step(state, batch, knobs, fparams=None):
        state = st.prepare(s, state, fparams)
        ctx = st.fault_context(s, state, fparams)
        batch = s.hooks.data(batch, ctx)
        ro = st.sample(s, state, batch, knobs, ctx)
        answers = repeat_rows(batch.answers, cfg.group_size)
        return learn(s, state, ro, reward_fn(ro.response, answers), knobs, fparams)

    return Learner(
        prepare=jax.jit(
            lambda state, fparams=None: st.prepare(s, state, fparams), donate_argnums=0
        ),
        rollout=jax.jit(rollout),
        learn=jax.jit(lambda *a: learn(s, *a), donate_argnums=0),
        step=None if reward_fn is None else jax.jit(step, donate_argnums=0),
    )


def _check_monitor(monitor: fmm.Monitor | None, cfg: RLConfig) -> None:
    if monitor is None:
        return
    if (monitor.group_size, monitor.max_len) != (cfg.group_size, cfg.max_new_tokens):
        raise ValueError(
            f"the monitor was built for group_size {monitor.group_size}, max_len "
            f"{monitor.max_len}; this learner has {cfg.group_size}, {cfg.max_new_tokens}"
        )


def learn(s: StepSpec, state: TrainState, ro: Rollout, rewards: dict, knobs: Knobs, fparams=None):
    """One learning step on a rollout: the stages in order, then the step's statistics."""
    ctx = st.fault_context(s, state, fparams)
    configured = knobs
    # restore_coefficients (remedy switch): β, entropy coef and ε as configured.
    knobs, _ = st.staged(knobs.restore_coefficients, knobs, s.hooks.regularizers, ctx)
    scored = st.score(s, ro, rewards, knobs, ctx)
    data = {
        "tokens": ro.tokens,
        "valid": ro.valid,
        "mask": ro.response_mask,
        "loss_mask": scored.train_mask,
        "sampler_logp": ro.logp,
        "scores": scored.train_scores,
    }
    ref_params = s.hooks.ref_params(state.ref_params, ctx)
    # Forwards without gradient run in micro-batches too (cfg.num_microbatches; row-wise).
    data["ref_logp"] = up.micro_map(
        s, lambda d: st.policy_forward(s, ref_params, d, knobs)[0], data
    )
    read = None
    if s.monitor is not None and s.monitor.audits:  # the weights as this step reads them
        read = s.monitor.read(state.params, state.opt_state, ref_params)
    if s.cfg.updates_per_step > 1:  # advantages from the behaviour policy, before any update
        old_logp, _, old_values = up.micro_map(
            s, lambda d: st.forward(s, state.params, d, knobs), data
        )
        data.update(st.targets(s, old_logp, old_values, data, knobs, ctx))
    lr_hook = lambda x: s.hooks.learning_rate(x, ctx)  # noqa: E731
    lr = learning_rate(knobs, state.step, s.cfg.lr_warmup_steps, lr_hook)
    (params, opt_state), metrics, rows = _updates(s, state, data, knobs, lr, ctx)
    metrics.update(_rollout_stats(s, ro, rewards, scored.scores), lr=lr)
    new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
    if s.fault is not None:
        metrics["fault_active"] = ctx.active.astype(jnp.float32)
        metrics["fault_acted"] = faults.acted(s.fault.type_id, ctx).astype(jnp.float32)
        if s.fault.state_update is not None:
            carried = s.fault.state_update(state.fault, params["policy"], ctx)
            new_state = new_state._replace(fault=carried)
    metrics.update(_tool_stats(ro))
    if s.monitor is not None:
        new_state = _watch(s, state, new_state, ro, scored, configured, metrics, read)
    if s.trajectories:
        if rows is None:  # several updates: the trainer's view before the first one
            rows = row_stats(
                data["old_logp"], ro.logp, data["adv"], data["loss_mask"], data["mask"]
            )
        metrics["trajectories"] = trajectory_record(
            ro, scored.raw, scored.train_scores, data["ref_logp"], rows, s.cfg.group_size
        )
    return parallel.constrain_state(new_state, s.mesh), scalars.pack(metrics)


def _updates(s: StepSpec, state: TrainState, data, knobs: Knobs, lr, ctx):
    """epochs × minibatches optimizer updates (a scan). Returns ((params, opt_state), metrics
    (maxima stay maxima, everything else averaged over updates), rows of the one update or
    None)."""
    cfg = s.cfg
    mbs = up.minibatches(
        data,
        st.shuffle_key(state),
        cfg.num_epochs,
        cfg.num_minibatches,
        cfg.prompts_per_step,
        cfg.group_size,
    )
    carry, per_update = jax.lax.scan(
        lambda c, mb: up.update(s, c, mb, knobs, lr, ctx), (state.params, state.opt_state), mbs
    )
    rows = per_update.pop("trajectories", None)
    if rows is not None:
        rows = jax.tree.map(lambda x: x[0], rows)
    metrics = {
        k: (jnp.max if k.endswith(("_max", "max_abs")) else jnp.mean)(v)
        for k, v in per_update.items()
    }
    return carry, metrics, rows


def _rollout_stats(s: StepSpec, ro: Rollout, rewards, scores) -> dict[str, jax.Array]:
    """Reward components; without a monitor also the plain reward and length statistics (with
    one, fm's update reports them)."""
    stats = {}
    if s.monitor is None:
        inputs = fmm.StepInputs(rewards=scores, lengths=ro.lengths, truncated=ro.truncated)
        c = s.cfg
        stats = s.stats(
            fmm.rollout_statistics(inputs, group_size=c.group_size, max_len=c.max_new_tokens)
        )
    for name, value in rewards.items():
        if name != "reward":
            stats[f"reward_{name}"] = value.astype(jnp.float32).mean()
    return stats


def _tool_stats(ro: Rollout) -> dict[str, jax.Array]:
    if ro.tool_calls is None:
        return {}
    tool_use = fmm.StepInputs(
        tool_calls=ro.tool_calls,
        tool_errors=ro.tool_errors,
        tool_turns=ro.turns,
        tool_aborted=ro.aborted,
    )
    return fmm.tool_statistics(tool_use)


def _watch(s: StepSpec, state, new_state, ro, scored: st.Scored, configured, metrics, read):
    """fm's update: the rollout as the pipeline made it (`scores` and `loss_mask` before the
    learner's own masking: the reward statistics and the mask audit watch the pipeline), the
    task verifier's rewards as the shadow, and the step's statistics. Adds fm's statistics,
    the alarm and per-signal flags to `metrics`; returns the state with fm's new state."""
    expected = {
        "kl_coef": jnp.zeros(()) if s.cfg.kl_in_reward else configured.kl_coef,
        "ent_coef": configured.ent_coef,
    }  # with the KL in the reward, the loss applies no β
    effective = {"kl_coef": metrics["loss_kl_coef"], "ent_coef": metrics["loss_ent_coef"]}
    inputs = fmm.StepInputs(
        rewards=scored.scores,
        verifier_rewards=scored.raw,
        lengths=ro.lengths,
        truncated=ro.truncated,
        response=ro.response,
        response_mask=ro.response_mask,
        loss_mask=scored.loss_mask,
        coefficients=(effective, expected),
    )
    sealed = (new_state.params, new_state.opt_state)
    own, out, fm_state = s.monitor.update(inputs, state.fm, stats=metrics, read=read, sealed=sealed)
    metrics.update(own)
    flags = detect.flags_to_dict(s.monitor.detector, out)
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in flags.items()})
    return new_state._replace(fm=fm_state)

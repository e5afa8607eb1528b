"""The RL step as pure functions of (state, batch, knobs): rollout, learn, and both fused.

`make_learner` does the Python-side setup (model graph, static config, reward function) and
returns compiled functions. The state carries everything a step needs; per-step randomness is
`fold_in(state.key, state.step)`, so a restored state replays the same draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import faults
from faults import Fault, FaultParams
from fm import detect
from fm import monitor as fmm
from rftjax import algorithms as alg
from rftjax import parallel
from rftjax.config import RLConfig
from rftjax.knobs import Knobs
from rftjax.sampling import Rollout, SamplingParams, generate, repeat_rows, response_logprobs

RewardFn = Callable[[jax.Array, jax.Array], dict[str, jax.Array]]
_SAMPLE, _SHUFFLE = 0, 1  # salts for per-step keys


class TrainState(NamedTuple):
    step: jax.Array  # int32: RL steps completed
    params: dict  # {"policy": nnx.State} (+ "value_head": {"weight", "bias"} for PPO)
    ref_params: nnx.State  # frozen reference policy π_ref
    opt_state: optax.OptState
    key: jax.Array  # uint32[2] base key
    fm: fmm.MonitorState | None = None  # fm's detector history, thresholds and seals (fm on)
    fault: Any = None  # state an injected fault carries (PG2: the sampler's stale weights)


class PromptBatch(NamedTuple):
    """Unique prompts of one step; each is sampled group_size times."""

    prompts: jax.Array  # int32 [Bp, P], left-padded
    prompt_mask: jax.Array  # int32 [Bp, P]
    answers: jax.Array  # int32 [Bp, A]


def make_optimizer(cfg: RLConfig) -> optax.GradientTransformation:
    """Adam direction only; the learning rate is a knob applied in `apply_update`."""
    return optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=1e-8)


def init_state(
    policy: nnx.State,
    cfg: RLConfig,
    seed: int,
    monitor: fmm.Monitor | None = None,
    fault: Fault | None = None,
) -> TrainState:
    # Own copies: the train state is donated to the compiled step, the caller's arrays are not.
    params = {"policy": jax.tree.map(jnp.copy, policy)}
    if cfg.algo == "ppo":
        hidden = policy["model"]["norm"]["weight"].shape[0]
        params["value_head"] = {"weight": jnp.zeros((hidden,)), "bias": jnp.zeros(())}
    ref_params = jax.tree.map(jnp.copy, policy)
    opt_state = make_optimizer(cfg).init(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ref_params=ref_params,
        opt_state=opt_state,
        key=jax.random.PRNGKey(seed),
        fm=None if monitor is None else monitor.init(params, opt_state, ref_params),
        fault=fault.state_init(policy) if fault is not None and fault.state_init else None,
    )


@jax.jit
def seal_weights(state: TrainState) -> TrainState:
    """The state with fm's seal of its weights (and optimizer state) renewed, after a deliberate
    change between steps (resetting the optimizer moments), so that the next step does not read
    it as corruption. The identity without failure management."""
    if state.fm is None:
        return state
    return state._replace(fm=fmm.seal(state.fm, state.params, state.opt_state))


def learning_rate(
    knobs: Knobs, step: jax.Array, warmup_steps: int, schedule_hook=lambda lr: lr
) -> jax.Array:
    """lr × scale × linear warm-up, through `schedule_hook` (fault injection), then capped."""
    warm = jnp.minimum(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return jnp.minimum(schedule_hook(knobs.lr * knobs.lr_scale * warm), knobs.lr_cap)


def apply_update(params, opt_state, grads, knobs: Knobs, lr, optimizer, *, norms: bool = True):
    """Clip (knob), Adam direction, scale by -lr. Returns params, opt_state, updates, stats:
    the gradient norm and, with `norms`, the update and parameter norms (fm's optimization
    statistics hold them too: a monitored step leaves them to fm, saving two passes)."""
    grad_norm = optax.tree.norm(grads)
    scale = jnp.where(
        knobs.grad_clip > 0, jnp.minimum(1.0, knobs.grad_clip / (grad_norm + 1e-6)), 1.0
    )
    grads = jax.tree.map(lambda g: g * scale, grads)
    direction, new_opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda d: -lr * d, direction)
    stats = {"grad_norm": grad_norm}
    if norms:
        stats.update(update_norm=optax.tree.norm(updates), param_norm=optax.tree.norm(params))
    # skip_nonfinite (remedy switch): a step whose gradients are not finite changes nothing,
    # as the skip-step guards of large-scale trainers do.
    skip = (knobs.skip_nonfinite > 0) & ~jnp.isfinite(grad_norm)
    new_params = _switch(skip, params, optax.apply_updates(params, updates))
    return new_params, _switch(skip, opt_state, new_opt_state), updates, stats


def _guard(x, bound):
    return jnp.where(bound > 0, jnp.clip(x, -bound, bound), x)


def _value(params, hidden):
    head = params["value_head"]
    return hidden.astype(jnp.float32) @ head["weight"] + head["bias"]


def grpo_advantages(old_logp, old_values, data, knobs, cfg: RLConfig):
    """Group-relative advantages (GRPO; Dr. GRPO without the std), broadcast over tokens.

    `data` holds whole groups (minibatches never split one), so the group statistics are exact.
    """
    del old_logp, old_values, knobs
    adv = alg.group_advantages(
        data["scores"], group_size=cfg.group_size, normalize_std=cfg.normalize_adv_std
    )
    return adv[:, None] * data["loss_mask"], jnp.zeros_like(data["loss_mask"])


def gae_advantages(old_logp, old_values, data, knobs, cfg: RLConfig):
    """PPO: sequence score on the last token (minus β·k1 per token with KL-in-reward), GAE(γ, λ)
    with the value head's estimates, optionally whitened over the batch."""
    mask = data["loss_mask"]
    kl = old_logp - data["ref_logp"] if cfg.kl_in_reward else None
    token_r = alg.token_rewards(data["scores"], mask, kl=kl, kl_coef=knobs.kl_coef)
    adv, ret = alg.gae(token_r, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_adv:
        adv = alg.whiten(adv, mask) * mask
    return adv, ret


# Algorithms by name: how advantages and returns are estimated. Whether a value head is trained
# follows from the name (PPO); the loss is shared.
ADVANTAGE_ESTIMATORS = {"grpo": grpo_advantages, "ppo": gae_advantages}


def make_learner(
    graphdef: nnx.GraphDef,
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
):
    """Returns compiled `prepare`, `rollout`, `learn`, and (jnp reward) the fused `step`.

    prepare(state, fparams) -> state: between-step hooks of a fault (weights, optimizer state);
      the identity without a fault. Call it before `rollout` when not using `step`.
    rollout(state, batch, knobs, fparams) -> Rollout with B = prompts × group_size rows.
    learn(state, rollout, rewards, knobs, fparams) -> (state, metrics); rewards: dict of f32[B]
      with at least "reward" (other keys are reported as reward components).
    step(state, batch, knobs, fparams) -> (state, metrics): prepare, rollout, reward_fn, learn
      in one program.

    With a `fault` (from `faults.make`), its hooks act at the trainer's hook points under the
    runtime `fparams` (`faults.FaultParams`; None without a fault), and the metrics gain
    "fault_active". The state must then come from `init_state(..., fault=fault)`.

    With a `monitor` (`fm.monitor.Monitor`), the step also computes fm's statistics (token
    statistics per update, optimization statistics per update, trajectory aggregates and audits
    per step), runs fm's detector on them with the state in `state.fm`, and adds "alarm" and
    per-signal flags and scores to the metrics. The state must then come from
    `init_state(..., monitor=monitor)`.

    With `tools` (a `rftjax.tools.ToolSpec`), rollouts call tools (observation tokens are
    context, outside the loss mask) and the metrics gain tool statistics.

    With `trajectories`, the metrics also hold "trajectories": a dict of per-completion arrays
    [B] (see `trajectory_record`) for FaultBench's trajectory-level records.

    With a `mesh` (`rftjax.parallel.make_mesh`), the state must be placed by
    `parallel.place_state` and batches by `parallel.place_batch`: rollout and learning run
    SPMD on that mesh, the KV cache is sharded like the batch, and every returned state is
    constrained to the shardings it came in with (so the next call does not recompile).
    """
    if monitor is not None and (monitor.group_size, monitor.max_len) != (
        cfg.group_size,
        cfg.max_new_tokens,
    ):
        raise ValueError(
            f"the monitor was built for group_size {monitor.group_size}, max_len "
            f"{monitor.max_len}; this learner has {cfg.group_size}, {cfg.max_new_tokens}"
        )
    optimizer = make_optimizer(cfg)
    hooks = fault.hooks if fault is not None else faults.NO_HOOKS
    ppo = cfg.algo == "ppo"
    n = cfg.max_new_tokens
    agg = dict(mode=cfg.loss_agg, max_len=n)
    precompute = cfg.updates_per_step > 1

    def fault_ctx(state: TrainState, fparams: FaultParams | None):
        return None if fault is None else faults.context(fparams, state.step)

    def prepare(state: TrainState, fparams: FaultParams | None = None) -> TrainState:
        ctx = fault_ctx(state, fparams)
        state = state._replace(
            params=hooks.params(state.params, ctx), opt_state=hooks.opt_state(state.opt_state, ctx)
        )
        return parallel.constrain_state(state, mesh)

    def rollout(state: TrainState, batch: PromptBatch, knobs: Knobs, fparams=None) -> Rollout:
        ctx = fault_ctx(state, fparams)
        return sample(state, hooks.data(batch, ctx), knobs, ctx)

    def sample(state: TrainState, batch: PromptBatch, knobs: Knobs, ctx) -> Rollout:
        """The rollout of a batch the data hook has already seen."""
        key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), _SAMPLE)
        configured = SamplingParams(knobs.temperature, knobs.top_p, knobs.top_k, jnp.int32(0))
        # restore_sampler (remedy switch): the settings as configured, past the sampler stage.
        sampling = _switch(knobs.restore_sampler, configured, hooks.sampler(configured, ctx))
        # resync_sampler (remedy switch): the sampler runs the trainer's current weights with
        # the trainer's numerics and reports what it computed, past the weight-sync and
        # inference-engine stages.
        resync = knobs.resync_sampler
        policy = state.params["policy"]
        weights = hooks.rollout_params(policy, state.fault, ctx)
        if fault is not None:  # a branch, not `_switch`: no select over every weight
            weights = jax.lax.cond(resync > 0, lambda: policy, lambda: weights)
        ro = generate(
            graphdef,
            weights,
            batch.prompts,
            batch.prompt_mask,
            key,
            sampling,
            group_size=cfg.group_size,
            max_new_tokens=n,
            eos_id=eos_id,
            pad_id=pad_id,
            logits_hook=None
            if fault is None
            else (lambda x, i: _switch(resync, x, hooks.logits(x, i, ctx))),
            tools=tools,
            tool_hook=None if fault is None else (lambda r, rows, i: tool_hook(r, rows, i, ctx)),
            mesh=mesh,
        )
        reported = hooks.rollout_logprobs(ro.logp, ro.response_mask, ctx)
        return ro._replace(logp=_switch(resync, ro.logp, reported))

    def tool_hook(result, rows, i, ctx):
        result = hooks.tool_results(result, rows, i, ctx)
        return hooks.observations(result, rows, i, ctx)

    def policy_forward(policy, data, knobs):
        """Log-probs, entropies, hidden states of rows whose groups are contiguous."""
        prompt_len = data["tokens"].shape[1] - n
        g = cfg.group_size
        return response_logprobs(
            graphdef,
            policy,
            data["tokens"][::g, :prompt_len],
            data["valid"][::g, :prompt_len],
            data["tokens"][:, prompt_len:],
            data["valid"][:, prompt_len:],  # sampled and observation tokens
            knobs.temperature,
        )

    def forward(params, data, knobs):
        logp, entropy, hidden = policy_forward(params["policy"], data, knobs)
        values = _value(params, hidden) if ppo else jnp.zeros_like(logp)
        return logp, entropy, values

    def targets(old_logp, old_values, data, knobs, ctx):
        """Advantages and returns from constants (behaviour log-probs and values)."""
        adv, ret = ADVANTAGE_ESTIMATORS[cfg.algo](old_logp, old_values, data, knobs, cfg)
        # advantage_audit: the estimator's own output, past the advantage post-processing.
        audited = hooks.advantages(adv, data["scores"], data["loss_mask"], ctx)
        adv = jnp.where(knobs.advantage_audit > 0, adv, audited)
        return {
            "old_logp": old_logp,
            "old_values": old_values,
            "adv": _guard(adv, knobs.adv_clip),
            "returns": ret,
        }

    def loss_fn(params, probe, data, knobs, ctx):
        """`probe`: zeros added to the aggregated KL and entropy terms; the loss's gradient
        with respect to them is the coefficient it applies to each (the regularizer audit)."""
        # Attention sees every real token (data["mask"]); the loss, KL, entropy and advantages
        # count the loss mask (the policy's actions); sampler/trainer ratios are measured over
        # the tokens the sampler produced.
        mask = data["loss_mask"]
        logp, entropy, values = forward(params, data, knobs)
        if not precompute:  # one update: the behaviour policy is the current one
            sg = jax.lax.stop_gradient
            data = {**data, **targets(sg(logp), sg(values), data, knobs, ctx)}
        sampled = data["mask"]  # tokens the sampler produced (and reported log-probs for)
        is_ratio = jnp.exp(jnp.clip(data["old_logp"] - data["sampler_logp"], -20.0, 20.0))
        is_w = jnp.where(knobs.is_cap > 0, jnp.minimum(is_ratio, knobs.is_cap), 1.0)
        pg_loss, pg_m = alg.policy_loss(
            logp,
            data["old_logp"],
            data["adv"],
            mask,
            eps_low=knobs.eps_low,
            eps_high=knobs.eps_high,
            agg_mode=agg["mode"],
            is_weights=is_w,
            max_len=n,
        )
        kl = alg.aggregate(alg.kl_penalty(logp, data["ref_logp"], kind=cfg.kl_kind), mask, **agg)
        ent = alg.aggregate(entropy, mask, **agg)
        loss = pg_loss - knobs.ent_coef * (ent + probe["ent_coef"])
        if not cfg.kl_in_reward:
            loss = loss + knobs.kl_coef * (kl + probe["kl_coef"])
        metrics = {
            **pg_m,
            "pg_loss": pg_loss,
            "kl_ref": kl,
            "entropy": ent,
            "is_ratio_mean": alg.masked_mean(is_ratio, sampled),
            "is_ratio_max": jnp.max(jnp.where(sampled > 0, is_ratio, 0.0)),
            **_adv_stats(data["adv"], mask),
        }
        if ppo:
            v_loss, v_m = alg.value_loss(
                values,
                data["old_values"],
                data["returns"],
                mask,
                clip_eps=cfg.vf_clip,
                agg_mode=agg["mode"],
                max_len=n,
            )
            loss = loss + knobs.vf_coef * v_loss
            metrics.update(v_m, vf_loss=v_loss)
        metrics["loss"] = loss
        if trajectories and not precompute:  # rows of the one update; else taken in `learn`
            metrics["trajectories"] = _row_stats(
                jax.lax.stop_gradient(logp), data["sampler_logp"], data["adv"], mask, sampled
            )
        if monitor is not None:
            inputs = fmm.StepInputs(
                rewards=data["scores"],
                response_mask=sampled,
                loss_mask=mask,
                advantages=data["adv"],
                sampler_logp=data["sampler_logp"],
                old_logp=data["old_logp"],
                logp=logp,
                ref_logp=data["ref_logp"],
                entropy=entropy,
            )
            metrics.update(fmm.token_statistics(inputs, group_size=cfg.group_size))
        return loss, metrics

    grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
    no_probe = fmm.coefficient_probe()

    def update(carry, mb, knobs, lr, ctx):
        params, opt_state = carry
        (grads, probed), metrics = grad_fn(params, no_probe, mb, knobs, ctx)
        if monitor is not None:  # the coefficients the loss applied, as measured
            metrics.update(loss_kl_coef=probed["kl_coef"], loss_ent_coef=-probed["ent_coef"])
        grads = hooks.gradients(grads, ctx)
        new_params, opt_state, updates, stats = apply_update(
            params, opt_state, grads, knobs, lr, optimizer, norms=monitor is None
        )
        metrics.update(stats)
        if monitor is not None:
            inputs = fmm.StepInputs(grads=grads, updates=updates, params=params, lr=lr)
            metrics.update(fmm.optimization_statistics(inputs))
        return (new_params, opt_state), metrics

    def learn(state: TrainState, ro: Rollout, rewards: dict, knobs: Knobs, fparams=None):
        ctx = fault_ctx(state, fparams)
        configured = knobs
        # restore_coefficients (remedy switch): β, entropy coef and ε as configured.
        knobs = _switch(knobs.restore_coefficients, knobs, hooks.regularizers(knobs, ctx))
        raw = rewards["reward"].astype(jnp.float32)
        # Remedy switches (runtime knobs: no recompile). verifier_failover scores with the
        # task's own verifier instead of the reward pipeline; restore_mask rebuilds the loss
        # mask from the sampler's response mask instead of the pipeline's.
        piped = hooks.rewards(raw, rewards, ro, ctx)
        scores = _guard(jnp.where(knobs.verifier_failover > 0, raw, piped), knobs.reward_clip)
        piped_mask = hooks.loss_mask(ro.response_mask, ro, ctx)
        loss_mask = jnp.where(knobs.restore_mask > 0, ro.response_mask, piped_mask)
        # What the learner trains on; `scores` and `loss_mask` stay what the pipeline made
        # (the reward statistics and the mask audit watch the pipeline).
        train_scores, train_mask = scores, loss_mask
        if ro.tool_failures is not None:
            # mask_unscorable (remedy switch): a completion whose tool calls the environment
            # failed to serve leaves the loss, and its score becomes its group's mean over the
            # other completions, so that their baseline is theirs alone.
            unscorable = (knobs.mask_unscorable > 0) & (ro.tool_failures > 0)
            train_scores = alg.impute_group_mean(scores, ~unscorable, group_size=cfg.group_size)
            train_mask = jnp.where(unscorable[:, None], 0.0, loss_mask)
        data = {
            "tokens": ro.tokens,
            "valid": ro.valid,
            "mask": ro.response_mask,
            "loss_mask": train_mask,
            "sampler_logp": ro.logp,
            "scores": train_scores,
        }
        ref_params = hooks.ref_params(state.ref_params, ctx)
        data["ref_logp"] = policy_forward(ref_params, data, knobs)[0]
        read = None
        if monitor is not None and monitor.audits:  # the weights as this step reads them
            read = monitor.read(state.params, state.opt_state, ref_params)
        if precompute:
            old_logp, _, old_values = forward(state.params, data, knobs)
            data.update(targets(old_logp, old_values, data, knobs, ctx))
        lr = learning_rate(
            knobs, state.step, cfg.lr_warmup_steps, lambda x: hooks.learning_rate(x, ctx)
        )
        key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), _SHUFFLE)
        minibatches = _minibatches(
            data, key, cfg.num_epochs, cfg.num_minibatches, cfg.prompts_per_step, cfg.group_size
        )
        (params, opt_state), per_update = jax.lax.scan(
            lambda c, mb: update(c, mb, knobs, lr, ctx),
            (state.params, state.opt_state),
            minibatches,
        )
        rows = per_update.pop("trajectories", None)
        # Over several updates: maxima stay maxima, everything else is averaged.
        metrics = {
            k: (jnp.max if k.endswith(("_max", "max_abs")) else jnp.mean)(v)
            for k, v in per_update.items()
        }
        if trajectories:
            if rows is None:  # several updates: the trainer's view before the first one
                rows = _row_stats(
                    data["old_logp"], ro.logp, data["adv"], train_mask, ro.response_mask
                )
            else:
                rows = jax.tree.map(lambda x: x[0], rows)
            rows = trajectory_record(ro, raw, train_scores, data["ref_logp"], rows, cfg.group_size)
        metrics.update(_rollout_stats(ro, rewards, scores, cfg.group_size), lr=lr)
        new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
        if fault is not None:
            metrics["fault_active"] = ctx.active.astype(jnp.float32)
            metrics["fault_acted"] = faults.acted(fault.type_id, ctx).astype(jnp.float32)
            if fault.state_update is not None:
                new_state = new_state._replace(
                    fault=fault.state_update(state.fault, params["policy"], ctx)
                )
        if ro.tool_calls is not None:
            tool_use = fmm.StepInputs(
                tool_calls=ro.tool_calls,
                tool_errors=ro.tool_errors,
                tool_turns=ro.turns,
                tool_aborted=ro.aborted,
            )
            metrics.update(fmm.tool_statistics(tool_use))
        if monitor is not None:
            # The rollout as the pipeline made it: `scores` and `loss_mask` before the learner's
            # own masking (the reward statistics and the mask audit watch the pipeline), the
            # task verifier's rewards as the shadow.
            inputs = fmm.StepInputs(
                rewards=scores,
                verifier_rewards=raw,
                lengths=ro.lengths,
                truncated=ro.truncated,
                response=ro.response,
                response_mask=ro.response_mask,
                loss_mask=loss_mask,
                coefficients=_coefficients(metrics, configured, kl_in_reward=cfg.kl_in_reward),
            )
            own, out, fm_state = monitor.update(
                inputs, state.fm, stats=metrics, read=read, sealed=(params, opt_state)
            )
            metrics.update(own)
            flags = detect.flags_to_dict(monitor.detector, out)
            metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in flags.items()})
            new_state = new_state._replace(fm=fm_state)
        if trajectories:
            metrics["trajectories"] = rows
        return parallel.constrain_state(new_state, mesh), metrics

    fns: dict[str, Any] = {
        "prepare": jax.jit(prepare, donate_argnums=0),
        "rollout": jax.jit(rollout),
        "learn": jax.jit(learn, donate_argnums=0),
    }
    if reward_fn is not None:

        def step(state, batch, knobs, fparams=None):
            state = prepare(state, fparams)
            ctx = fault_ctx(state, fparams)
            batch = hooks.data(batch, ctx)
            ro = sample(state, batch, knobs, ctx)
            answers = repeat_rows(batch.answers, cfg.group_size)
            return learn(state, ro, reward_fn(ro.response, answers), knobs, fparams)

        fns["step"] = jax.jit(step, donate_argnums=0)
    return fns


def _coefficients(metrics, configured: Knobs, *, kl_in_reward: bool):
    """(effective, configured) coefficients for fm's regularizer audit: the loss's, measured by
    the probe, against the knobs as configured (before any stage between knob and loss). With
    the KL in the reward, the loss applies no β."""
    effective = {"kl_coef": metrics["loss_kl_coef"], "ent_coef": metrics["loss_ent_coef"]}
    expected = {
        "kl_coef": jnp.zeros(()) if kl_in_reward else configured.kl_coef,
        "ent_coef": configured.ent_coef,
    }
    return effective, expected


def _minibatches(data, key, epochs: int, num_mb: int, num_groups: int, group_size: int):
    """Stacks epochs × minibatches along a new leading axis, shuffling whole groups (a group's
    completions stay together and contiguous, as the shared-prompt forward needs)."""
    if epochs * num_mb == 1:
        return jax.tree.map(lambda x: x[None], data)
    perms = jnp.stack(
        [jax.random.permutation(jax.random.fold_in(key, e), num_groups) for e in range(epochs)]
    ).reshape(epochs * num_mb, num_groups // num_mb)
    rows = (perms[..., None] * group_size + jnp.arange(group_size)).reshape(epochs * num_mb, -1)
    return jax.tree.map(lambda x: x[rows], data)


def _row_stats(trainer_logp, sampler_logp, adv, loss_mask, sampled):
    """Per-completion sums and means of token arrays [B, T]."""
    count = jnp.maximum(loss_mask.sum(-1), 1.0)
    log_ratio = jnp.clip(trainer_logp - sampler_logp, -20.0, 20.0)
    return {
        "trainer_logp_sum": (trainer_logp * sampled).sum(-1),
        "advantage": (adv * loss_mask).sum(-1) / count,
        "is_ratio": (jnp.exp(log_ratio) * sampled).sum(-1) / jnp.maximum(sampled.sum(-1), 1.0),
    }


def _row_repetition(tokens, mask):
    """Per row: fraction of sampled tokens after the first that equal the previous one."""
    valid = mask[:, 1:] * mask[:, :-1]
    same = (tokens[:, 1:] == tokens[:, :-1]) * valid
    return same.sum(-1) / jnp.maximum(valid.sum(-1), 1.0)


def _switch(on: jax.Array, configured, piped):
    """A remedy switch: `configured` where `on` (> 0), else what the pipeline made of it."""
    return jax.tree.map(lambda a, b: jnp.where(on > 0, a, b), configured, piped)


def trajectory_record(ro: Rollout, raw, scores, ref_logp, rows, group_size: int) -> dict:
    """Per-completion arrays [B]: group (prompt row in the step) and index in the group, raw
    reward and the score the learner saw (after reward hooks and guards), length, truncated,
    sampler / trainer / reference log-prob sums over sampled tokens, the sequence advantage
    (mean over the loss mask), the mean sampler→trainer importance ratio, repetition, and
    tool calls and errors (0 without tools)."""
    b = ro.lengths.shape[0]
    mask = ro.response_mask
    zeros = jnp.zeros((b,), jnp.int32)
    return {
        "group": jnp.arange(b, dtype=jnp.int32) // group_size,
        "index": jnp.arange(b, dtype=jnp.int32) % group_size,
        "reward": raw,
        "score": scores,
        "length": ro.lengths,
        "truncated": ro.truncated.astype(jnp.int32),
        "sampler_logp_sum": (ro.logp * mask).sum(-1),
        "ref_logp_sum": (ref_logp * mask).sum(-1),
        "repetition": _row_repetition(ro.response, mask),
        "tool_calls": zeros if ro.tool_calls is None else ro.tool_calls,
        "tool_errors": zeros if ro.tool_errors is None else ro.tool_errors,
        **rows,
    }


def _adv_stats(adv, mask):
    mean = alg.masked_mean(adv, mask)
    return {
        "adv_mean": mean,
        "adv_std": jnp.sqrt(alg.masked_mean((adv - mean) ** 2, mask)),
        "adv_max_abs": jnp.max(jnp.abs(adv) * mask),
    }


def _rollout_stats(ro: Rollout, rewards, scores, group_size: int) -> dict[str, jax.Array]:
    lengths = ro.lengths.astype(jnp.float32)
    stats = {
        "reward_mean": scores.mean(),
        "reward_std": scores.std(),
        "frac_zero_std_groups": alg.group_stats(scores, group_size=group_size)["frac_zero_std"],
        "length_mean": lengths.mean(),
        "length_max": lengths.max(),
        "clip_ratio": ro.truncated.astype(jnp.float32).mean(),
    }
    for name, value in rewards.items():
        if name != "reward":
            stats[f"reward_{name}"] = value.astype(jnp.float32).mean()
    return stats

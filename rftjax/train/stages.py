"""The stages of one RL step, top to bottom: rollout, reward pipeline, advantages, loss (the
optimizer update and its micro-batches: `update.py`).

Each stage is a pure function of a `StepSpec` (the static set-up: model graph, config, the
injected fault's hooks, fm's monitor) and arrays. Where a stage can be corrupted by a fault, the
pattern is always the same and written once, in `staged`: the fault's hook acts on the
configured value, a remedy switch (a runtime knob) may take the configured value back, and fm's
statistics watch what the step then uses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import faults
from faults import Fault, FaultParams
from fm import monitor as fmm
from rftjax import algorithms as alg
from rftjax import parallel
from rftjax.config import RLConfig
from rftjax.knobs import Knobs
from rftjax.models.transformer import learner_graph
from rftjax.sampling import (
    PromptPass,
    Rollout,
    SamplingParams,
    after_prompt,
    generate,
    prompt_pass,
    response_logprobs,
)
from rftjax.train.state import PromptBatch, TrainState, remedied
from rftjax.train.trajectories import row_stats

_SAMPLE, _SHUFFLE = 0, 1  # salts for per-step keys

# The statistics a step reports without fm (all from fm's stage functions: one computation per
# name); with a monitor, every statistic fm computes is reported.
PLAIN_STATS = (
    "is_ratio_mean",
    "is_ratio_max",
    "adv_mean",
    "adv_std",
    "adv_max_abs",
    "grad_norm",
    "update_norm",
    "param_norm",
    "reward_mean",
    "reward_std",
    "frac_zero_std_groups",
    "length_mean",
    "length_max",
    "clip_ratio",
)


class StepSpec(NamedTuple):
    """Everything static that shapes the step (built once by `make_learner`)."""

    graphdef: nnx.GraphDef
    cfg: RLConfig
    optimizer: optax.GradientTransformation
    eos_id: int
    pad_id: int
    hooks: Any  # faults.Hooks (faults.NO_HOOKS without a fault)
    fault: Fault | None = None
    monitor: fmm.Monitor | None = None
    tools: Any = None
    mesh: Any = None
    trajectories: bool = False

    def stats(self, values: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """fm's statistics as this step reports them: all with a monitor, else `PLAIN_STATS`."""
        if self.monitor is not None:
            return values
        return {k: v for k, v in values.items() if k in PLAIN_STATS}


def staged(switch: jax.Array, configured, hook, *args):
    """Fault hook -> remedy switch: (what the step uses, what the hook made of `configured`).

    `hook(configured, *args)` is the (possibly faulted) pipeline stage; where the runtime
    `switch` knob is on (> 0), the configured value is used instead, past the stage."""
    piped = hook(configured, *args)
    return remedied(switch, configured, piped), piped


def fault_context(s: StepSpec, state: TrainState, fparams: FaultParams | None):
    return None if s.fault is None else faults.context(fparams, state.step)


def prepare(s: StepSpec, state: TrainState, fparams: FaultParams | None = None) -> TrainState:
    """Between-step hooks of a fault (weights, optimizer state); the identity without one."""
    ctx = fault_context(s, state, fparams)
    state = state._replace(
        params=s.hooks.params(state.params, ctx),
        opt_state=s.hooks.opt_state(state.opt_state, ctx),
    )
    return parallel.constrain_state(state, s.mesh)


# -- 1. rollout -------------------------------------------------------------------------------


def sample(s: StepSpec, state: TrainState, batch: PromptBatch, knobs: Knobs, ctx) -> Rollout:
    """The rollout of a batch the data hook has already seen: B = prompts × group_size rows.

    Remedy switches: restore_sampler (the sampling settings as configured, past the sampler
    stage); resync_sampler (the trainer's current weights with the trainer's numerics, and the
    log-probs the sampler computed, past the weight-sync and inference-engine stages)."""
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), _SAMPLE)
    configured = SamplingParams(knobs.temperature, knobs.top_p, knobs.top_k, jnp.int32(0))
    sampling, _ = staged(knobs.restore_sampler, configured, s.hooks.sampler, ctx)
    resync = knobs.resync_sampler
    policy = state.params["policy"]
    weights = s.hooks.rollout_params(policy, state.fault, ctx)
    logits_hook = tool_hook = None
    if s.fault is not None:  # a branch, not a select over every weight
        weights = jax.lax.cond(resync > 0, lambda: policy, lambda: weights)
        logits_hook = lambda x, i: staged(resync, x, s.hooks.logits, i, ctx)[0]  # noqa: E731
        tool_hook = lambda r, rows, i: _tool_hook(s, r, rows, i, ctx)  # noqa: E731
    ro = generate(
        s.graphdef,
        weights,
        batch.prompts,
        batch.prompt_mask,
        key,
        sampling,
        group_size=s.cfg.group_size,
        max_new_tokens=s.cfg.max_new_tokens,
        eos_id=s.eos_id,
        pad_id=s.pad_id,
        logits_hook=logits_hook,
        tools=s.tools,
        tool_hook=tool_hook,
        mesh=s.mesh,
    )
    reported, _ = staged(resync, ro.logp, s.hooks.rollout_logprobs, ro.response_mask, ctx)
    return ro._replace(logp=reported)


def _tool_hook(s: StepSpec, result, rows, i, ctx):
    result = s.hooks.tool_results(result, rows, i, ctx)
    return s.hooks.observations(result, rows, i, ctx)


# -- 2. reward pipeline -----------------------------------------------------------------------


class Scored(NamedTuple):
    """A rollout's rewards and masks as the pipeline made them and as the learner uses them."""

    raw: jax.Array  # f32[B] the task verifier's rewards
    scores: jax.Array  # f32[B] after the reward pipeline and guard (fm's reward statistics)
    loss_mask: jax.Array  # f32[B, T] the pipeline's loss mask (fm's mask audit)
    train_scores: jax.Array  # f32[B] what the advantages are computed from
    train_mask: jax.Array  # f32[B, T] what the loss counts


def score(s: StepSpec, ro: Rollout, rewards: dict, knobs: Knobs, ctx) -> Scored:
    """The reward pipeline. Remedy switches: verifier_failover (the task's own verifier's
    rewards), restore_mask (the sampler's response mask as loss mask), mask_unscorable (a
    completion whose tool calls the environment failed to serve leaves the loss, and its score
    becomes its group's mean over the others, so that their baseline is theirs alone)."""
    raw = rewards["reward"].astype(jnp.float32)
    failover, _ = staged(knobs.verifier_failover, raw, s.hooks.rewards, rewards, ro, ctx)
    scores = _guard(failover, knobs.reward_clip)
    loss_mask, _ = staged(knobs.restore_mask, ro.response_mask, s.hooks.loss_mask, ro, ctx)
    train_scores, train_mask = scores, loss_mask
    if ro.tool_failures is not None:
        unscorable = (knobs.mask_unscorable > 0) & (ro.tool_failures > 0)
        g = s.cfg.group_size
        train_scores = alg.impute_group_mean(scores, ~unscorable, group_size=g)
        train_mask = jnp.where(unscorable[:, None], 0.0, loss_mask)
    return Scored(raw, scores, loss_mask, train_scores, train_mask)


def _guard(x, bound):
    return jnp.where(bound > 0, jnp.clip(x, -bound, bound), x)


# -- 3. advantages ----------------------------------------------------------------------------


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


def targets(s: StepSpec, old_logp, old_values, data, knobs: Knobs, ctx) -> dict:
    """Advantages and returns from constants (behaviour log-probs and values). Remedy switch:
    advantage_audit (the estimator's own output, past the advantage post-processing)."""
    adv, ret = ADVANTAGE_ESTIMATORS[s.cfg.algo](old_logp, old_values, data, knobs, s.cfg)
    hook = lambda a: s.hooks.advantages(a, data["scores"], data["loss_mask"], ctx)  # noqa: E731
    adv, _ = staged(knobs.advantage_audit, adv, hook)
    return {
        "old_logp": old_logp,
        "old_values": old_values,
        "adv": _guard(adv, knobs.adv_clip),
        "returns": ret,
    }


# -- 4. loss ----------------------------------------------------------------------------------


def policy_forward(s: StepSpec, policy, data, knobs: Knobs, *, prompt: PromptPass | None = None):
    """Log-probs, entropies, hidden states [B, T] of rows whose groups are contiguous (through
    the learner's graph: with `cfg.remat`, each decoder layer is recomputed in the backward).

    Without gradient, `cfg.buckets` > 1 sorts the rows by length and skips the padding
    after EOS (`response_logprobs`' buckets); `cfg.logits_chunk` bounds the logits held at
    once, `cfg.attention_chunk` the attention scores. `prompt`: the rows' prompts already ran
    (`prompt_pass`, one row each): rows in any order, T = data's response slots (the
    length-sorted micro-batches of `update.gradients`).
    """
    p = data["tokens"].shape[1] - data["mask"].shape[1]
    graph, chunk = _graph(s, policy), s.cfg.logits_chunk
    response, response_mask = data["tokens"][:, p:], data["valid"][:, p:]  # sampled, observed
    if prompt is not None:
        return after_prompt(graph, policy, prompt, data["valid"][:, :p], response, response_mask,
                            knobs.temperature, logits_chunk=chunk)  # fmt: skip
    g = s.cfg.group_size
    return response_logprobs(graph, policy, data["tokens"][::g, :p], data["valid"][::g, :p],
                             response, response_mask, knobs.temperature, buckets=s.cfg.buckets,
                             logits_chunk=chunk)  # fmt: skip


def _graph(s: StepSpec, policy):
    cfg = s.cfg
    return learner_graph(s.graphdef, policy, remat=cfg.remat, attention_chunk=cfg.attention_chunk)


def first_pass(s: StepSpec, policy, data) -> PromptPass:
    """The `PromptPass` of data's prompts, one per group (rows of a group contiguous), through
    the learner's graph."""
    p, g = data["tokens"].shape[1] - data["mask"].shape[1], s.cfg.group_size
    return prompt_pass(_graph(s, policy), policy, data["tokens"][::g, :p], data["valid"][::g, :p])


def forward(s: StepSpec, params, data, knobs: Knobs, *, prompt: PromptPass | None = None):
    """(logp, entropy, values) [B, T]; values are zeros without a value head (GRPO)."""
    logp, entropy, hidden = policy_forward(s, params["policy"], data, knobs, prompt=prompt)
    if s.cfg.algo != "ppo":
        return logp, entropy, jnp.zeros_like(logp)
    head = params["value_head"]
    return logp, entropy, hidden.astype(jnp.float32) @ head["weight"] + head["bias"]


def loss_fn(s: StepSpec, params, probe, data, knobs: Knobs, ctx):
    """The clipped policy loss (+ value loss for PPO) of one minibatch, and its metrics.

    `probe`: zeros added to the aggregated KL and entropy terms; the loss's gradient with
    respect to them is the coefficient it applies to each (fm's regularizer audit). Attention
    sees every real token (data["mask"]); the loss, KL, entropy and advantages count the loss
    mask (the policy's actions)."""
    logp, entropy, values = forward(s, params, data, knobs)
    if s.cfg.updates_per_step == 1:  # one update: the behaviour policy is the current one
        sg = jax.lax.stop_gradient
        data = {**data, **targets(s, sg(logp), sg(values), data, knobs, ctx)}
    return loss_terms(s, logp, entropy, values, probe, data, knobs)


def loss_terms(s: StepSpec, logp, entropy, values, probe, data, knobs: Knobs, stats: bool = True):
    """`loss_fn` from the forward's outputs (logp, entropy, values [B, T]) and `data` with its
    targets (old_logp, old_values, adv, returns): (loss, metrics). `stats=False` leaves fm's
    token statistics out (a micro-batch's loss, whose metrics are not reported)."""
    cfg, mask = s.cfg, data["loss_mask"]
    agg = dict(agg_mode=cfg.loss_agg, max_len=cfg.max_new_tokens)
    is_ratio = jnp.exp(jnp.clip(data["old_logp"] - data["sampler_logp"], -20.0, 20.0))
    is_w = jnp.where(knobs.is_cap > 0, jnp.minimum(is_ratio, knobs.is_cap), 1.0)
    pg_loss, pg_m = alg.policy_loss(
        logp,
        data["old_logp"],
        data["adv"],
        mask,
        eps_low=knobs.eps_low,
        eps_high=knobs.eps_high,
        is_weights=is_w,
        **agg,
    )
    kl = alg.kl_penalty(logp, data["ref_logp"], kind=cfg.kl_kind)
    kl = alg.aggregate(kl, mask, mode=cfg.loss_agg, max_len=cfg.max_new_tokens)
    ent = alg.aggregate(entropy, mask, mode=cfg.loss_agg, max_len=cfg.max_new_tokens)
    loss = pg_loss - knobs.ent_coef * (ent + probe["ent_coef"])
    if not cfg.kl_in_reward:
        loss = loss + knobs.kl_coef * (kl + probe["kl_coef"])
    metrics = {**pg_m, "pg_loss": pg_loss, "kl_ref": kl, "entropy": ent}
    if cfg.algo == "ppo":
        v_loss, v_m = alg.value_loss(
            values, data["old_values"], data["returns"], mask, clip_eps=cfg.vf_clip, **agg
        )
        loss = loss + knobs.vf_coef * v_loss
        metrics.update(v_m, vf_loss=v_loss)
    metrics["loss"] = loss
    if not stats:
        return loss, metrics
    metrics.update(s.stats(_token_stats(s, logp, entropy, data)))
    if s.trajectories and cfg.updates_per_step == 1:  # else taken before the updates
        sampled = data["mask"]
        logp = jax.lax.stop_gradient(logp)
        metrics["trajectories"] = row_stats(logp, data["sampler_logp"], data["adv"], mask, sampled)
    return loss, metrics


def _token_stats(s: StepSpec, logp, entropy, data) -> dict[str, jax.Array]:
    inputs = fmm.StepInputs(
        rewards=data["scores"],
        response_mask=data["mask"],  # tokens the sampler produced (and reported log-probs for)
        loss_mask=data["loss_mask"],
        advantages=data["adv"],
        sampler_logp=data["sampler_logp"],
        old_logp=data["old_logp"],
        logp=logp,
        ref_logp=data["ref_logp"],
        entropy=entropy,
    )
    return fmm.token_statistics(inputs, group_size=s.cfg.group_size)


def shuffle_key(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(state.key, state.step), _SHUFFLE)

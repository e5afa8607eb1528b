"""Reward faults (RF1-RF3): the verifier is noisy, hackable, or missing.

Rewards of the built-in tasks lie in [0, 1]; a flipped reward is 1 - r.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from faults.base import Ctx, Fault, Hooks, Setup, gate, is_variant, row_draw


def rf1(setup: Setup) -> Fault:
    """Noisy or flipped reward labels. Each completion's reward is corrupted with probability
    `magnitude`: variant "flip" gives 1 - r, variant "noise" a uniform draw in [0, 1]."""
    del setup

    def rewards(scores, reward_dict, rollout, ctx: Ctx):
        del reward_dict, rollout
        k_hit, k_noise = jax.random.split(ctx.key)
        hit = row_draw(k_hit, scores.shape[0], ctx.magnitude)
        noise = jax.random.uniform(k_noise, scores.shape)
        corrupted = jnp.where(is_variant(ctx, 0), 1.0 - scores, noise)
        return gate(ctx.active & hit, corrupted, scores)

    return Fault("RF1", Hooks(rewards=rewards))


def rf2(setup: Setup) -> Fault:
    """Exploitable proxy reward: a bonus of `magnitude` for a shortcut the task does not reward.
    Variant "length": bonus × length / N (longer is better, so answers run past their EOS);
    "empty": bonus for an answer that is only EOS; "format": bonus for any well-formed answer."""

    def rewards(scores, reward_dict, rollout, ctx: Ctx):
        length = rollout.lengths.astype(jnp.float32)
        shortcut = jnp.select(
            [is_variant(ctx, 0), is_variant(ctx, 1)],
            [length / setup.max_new_tokens, (length <= 1) & ~rollout.truncated],
            reward_dict.get("format", jnp.zeros_like(scores)),
        )
        return gate(ctx.active, scores + ctx.magnitude * shortcut.astype(jnp.float32), scores)

    return Fault("RF2", Hooks(rewards=rewards))


def _rf3_outage(ctx: Ctx) -> jax.Array:
    """Variant "outage": whether this step's rewards are all lost."""
    return jax.random.uniform(ctx.key) < ctx.magnitude


def rf3_drawn(ctx: Ctx) -> jax.Array:
    """Whether RF3 acts on an active step: "samples" on every one, "outage" on its draws."""
    return is_variant(ctx, 0) | _rf3_outage(ctx)


def rf3(setup: Setup) -> Fault:
    """Missing rewards read as zero. Variant "samples": each completion's reward is lost with
    probability `magnitude`; "outage": the whole step's rewards are lost with that probability."""
    del setup

    def rewards(scores, reward_dict, rollout, ctx: Ctx):
        del reward_dict, rollout
        per_sample = row_draw(ctx.key, scores.shape[0], ctx.magnitude)
        whole = jnp.broadcast_to(_rf3_outage(ctx), scores.shape)
        lost = jnp.where(is_variant(ctx, 0), per_sample, whole)
        return gate(ctx.active & lost, jnp.zeros_like(scores), scores)

    return Fault("RF3", Hooks(rewards=rewards))

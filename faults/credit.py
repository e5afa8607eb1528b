"""Credit-assignment faults (CA1-CA4): advantages, grouping, loss masks, zero-signal groups.

Completions of one prompt are contiguous rows (group g holds rows g·G ... g·G + G - 1).
"""

from __future__ import annotations

import jax.numpy as jnp

from faults.base import Ctx, Fault, Hooks, Setup, gate, is_variant, row_draw


def ca1(setup: Setup) -> Fault:
    """Advantage sign flip: each group's advantages are negated with probability `magnitude`
    (1: every group, the policy is pushed away from what is rewarded)."""
    g = setup.group_size

    def advantages(adv, scores, mask, ctx: Ctx):
        del scores, mask
        flip = row_draw(ctx.key, adv.shape[0], ctx.magnitude, g)[:, None]
        return gate(ctx.active & flip, -adv, adv)

    return Fault("CA1", Hooks(advantages=advantages))


def _baseline_error(scores, group_size: int):
    """f32[B]: mean reward of a row's own group minus that of the next group (cyclically)."""
    means = scores.astype(jnp.float32).reshape(-1, group_size).mean(axis=1)
    return jnp.repeat(means - jnp.roll(means, -1), group_size)


def ca2(setup: Setup) -> Fault:
    """Grouping or normalization bug. Variant "scale": advantages are multiplied by `magnitude`
    (a silent shrink when < 1: the KL term then dominates the update); "misgroup": a fraction
    `magnitude` of groups subtracts the next group's mean reward as its baseline (group ids off
    by one), so their advantages are shifted by the difference of the two means and no longer
    average to zero."""
    g = setup.group_size

    def advantages(adv, scores, mask, ctx: Ctx):
        picked = row_draw(ctx.key, adv.shape[0], ctx.magnitude, g)
        shift = jnp.where(picked, _baseline_error(scores, g), 0.0)
        misgrouped = adv + shift[:, None] * mask
        changed = jnp.where(is_variant(ctx, 0), adv * ctx.magnitude, misgrouped)
        return gate(ctx.active, changed, adv)

    return Fault("CA2", Hooks(advantages=advantages))


def ca3(setup: Setup) -> Fault:
    """Mask, padding or EOS bug in the loss mask (attention is untouched), in a fraction
    `magnitude` of rows. Variant "shift": the mask is off by one slot (the first response token
    never counts, the slot after the last one does); "drop_eos": the EOS token is left out, so
    ending the answer is never reinforced; "count_padding": every slot counts, padding after
    EOS included."""
    del setup

    def loss_mask(mask, rollout, ctx: Ctx):
        rows = row_draw(ctx.key, mask.shape[0], ctx.magnitude)[:, None]
        slots = jnp.arange(mask.shape[1])[None, :]
        shifted = jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1]
        eos = (slots == rollout.lengths[:, None] - 1) & ~rollout.truncated[:, None]
        dropped = jnp.where(eos, 0.0, mask)
        changed = jnp.select(
            [is_variant(ctx, 0), is_variant(ctx, 1)], [shifted, dropped], jnp.ones_like(mask)
        )
        return gate(ctx.active & rows, changed, mask)

    return Fault("CA3", Hooks(loss_mask=loss_mask))


def ca4(setup: Setup) -> Fault:
    """Zero-signal groups: the verifier caches its score by prompt, so in a fraction
    `magnitude` of groups every completion gets the first completion's reward; those groups
    have zero reward variance and give GRPO no gradient."""
    g = setup.group_size

    def rewards(scores, reward_dict, rollout, ctx: Ctx):
        del reward_dict, rollout
        cached = jnp.repeat(scores.reshape(-1, g)[:, 0], g)
        hit = row_draw(ctx.key, scores.shape[0], ctx.magnitude, g)
        return gate(ctx.active & hit, cached, scores)

    return Fault("CA4", Hooks(rewards=rewards))

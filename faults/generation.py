"""Policy-generation faults (PG1-PG3): the sampler and the trainer disagree.

The trainer's log-probs are always computed from the current weights at the configured
temperature; these faults change what the sampler does or reports, so the samples the trainer
learns from are no longer the on-policy samples it assumes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from faults.base import Ctx, Fault, Hooks, Setup, gate, is_variant


def pg1(setup: Setup) -> Fault:
    """Train-inference mismatch. Variant "logits": the inference engine's logits carry
    N(0, magnitude²) errors per entry (as from low-precision kernels), so tokens are drawn from,
    and log-probs reported for, a slightly different policy; variant "reported": tokens are
    drawn correctly but the reported log-probs carry N(0, magnitude²) errors."""
    del setup

    def logits(x, i, ctx: Ctx):
        noise = jax.random.normal(jax.random.fold_in(ctx.key, i), x.shape, jnp.float32)
        return gate(ctx.active & is_variant(ctx, 0), x + ctx.magnitude * noise, x)

    def rollout_logprobs(logp, mask, ctx: Ctx):
        noise = jax.random.normal(ctx.key, logp.shape, jnp.float32) * mask
        return gate(ctx.active & is_variant(ctx, 1), logp + ctx.magnitude * noise, logp)

    return Fault("PG1", Hooks(logits=logits, rollout_logprobs=rollout_logprobs))


def _lag(ctx: Ctx) -> jax.Array:
    return jnp.maximum(jnp.round(ctx.magnitude), 1.0).astype(jnp.int32)


def pg2(setup: Setup) -> Fault:
    """Stale policy: while active the sampler's weights are refreshed only after steps
    divisible by k = `magnitude` (a weight sync that runs every k steps), so rollouts come from
    weights up to k - 1 updates old (k = 1: always fresh). Carries the sampler's copy of the
    weights in the train state."""
    del setup

    def rollout_params(policy, stale, ctx: Ctx):
        return jax.lax.cond(ctx.active, lambda: stale, lambda: policy)

    def state_init(policy):
        return jax.tree.map(jnp.copy, policy)

    def state_update(stale, policy, ctx: Ctx):
        sync = ~ctx.active | (ctx.step % _lag(ctx) == 0)
        return jax.lax.cond(sync, lambda: jax.tree.map(jnp.copy, policy), lambda: stale)

    return Fault("PG2", Hooks(rollout_params=rollout_params), state_init, state_update)


def pg3(setup: Setup) -> Fault:
    """Degenerate sampler settings. Variants "hot" and "cold": the sampler's temperature is
    multiplied by `magnitude` (> 1 hot, < 1 cold) while the trainer keeps the configured one;
    "truncate": the sampler stops after round(N × (1 - magnitude)) tokens (at least 1)."""
    n = setup.max_new_tokens

    def sampler(sampling, ctx: Ctx):
        tempered = sampling._replace(temperature=sampling.temperature * ctx.magnitude)
        keep = jnp.maximum(jnp.round(n * (1.0 - ctx.magnitude)), 1.0).astype(jnp.int32)
        cut = sampling._replace(max_tokens=jnp.asarray(keep, jnp.int32))
        changed = jax.tree.map(lambda a, b: jnp.where(is_variant(ctx, 2), b, a), tempered, cut)
        return gate(ctx.active, changed, sampling)

    return Fault("PG3", Hooks(sampler=sampler))

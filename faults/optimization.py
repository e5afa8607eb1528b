"""Optimization-dynamics faults (OD1-OD4): learning rate, gradients, weights, regularizers.

Non-finite values are injected after `value_and_grad` (into the gradients), never inside a
differentiated `where`, whose unselected branch would turn NaN into NaN gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from faults.base import Ctx, Fault, Hooks, Setup, gate, is_variant, when


def od1(setup: Setup) -> Fault:
    """Learning-rate spike or stall: the scheduled learning rate is multiplied by `magnitude`
    (variant "spike": > 1, "stall": < 1) before the user's lr cap, as a schedule bug would."""
    del setup

    def learning_rate(lr, ctx: Ctx):
        return gate(ctx.active, lr * ctx.magnitude, lr)

    return Fault("OD1", Hooks(learning_rate=learning_rate))


def _noise_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noise = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, noise)


def od2(setup: Setup) -> Fault:
    """Non-finite or exploding gradients. Variant "nonfinite": with probability `magnitude` per
    step the first entry of every gradient tensor is NaN (an overflow in the backward pass);
    "explode": random noise of global norm magnitude × ‖g‖ is added (a corrupted backward
    pass; the global-norm clip bounds the step but not its direction)."""
    del setup

    def poison(g):
        first = (jnp.arange(g.size) == 0).reshape(g.shape)
        return jnp.where(first, jnp.asarray(jnp.nan, g.dtype), g)

    def explode(grads, ctx: Ctx):
        noise = _noise_like(grads, ctx.key)
        scale = ctx.magnitude * optax.tree.norm(grads) / (optax.tree.norm(noise) + 1e-12)
        return jax.tree.map(lambda g, z: g + (scale * z).astype(g.dtype), grads, noise)

    def gradients(grads, ctx: Ctx):
        nonfinite = lambda g: when(_od2_hit(ctx), lambda t: jax.tree.map(poison, t), g)
        # lax.cond: inactive steps draw no noise over the whole gradient tree.
        changed = lambda g: jax.lax.cond(
            is_variant(ctx, 0), nonfinite, lambda t: explode(t, ctx), g
        )
        return when(ctx.active, changed, grads)

    return Fault("OD2", Hooks(gradients=gradients))


def _od2_hit(ctx: Ctx) -> jax.Array:
    """Variant "nonfinite": whether this step's gradients get their NaN."""
    return jax.random.uniform(ctx.key) < ctx.magnitude


def od2_drawn(ctx: Ctx) -> jax.Array:
    """Whether OD2 acts on an active step: "explode" on every one, "nonfinite" on its draws."""
    return ~is_variant(ctx, 0) | _od2_hit(ctx)


def _perturb(tree, key, scale):
    """Each tensor plus Gaussian noise of `scale` × its own root-mean-square value."""
    noise = _noise_like(tree, key)
    return jax.tree.map(
        lambda x, z: x + (scale * jnp.sqrt(jnp.mean(jnp.square(x)) + 1e-12) * z).astype(x.dtype),
        tree,
        noise,
    )


def od3(setup: Setup) -> Fault:
    """Corrupted weights. Variant "policy": at the onset step every policy tensor gets noise of
    `magnitude` × its RMS (a bad restore; the damage then persists through training);
    "reference": while active the reference weights read by the step carry such noise (a bad
    reference load); "optimizer": at the onset the Adam second moments are multiplied by
    `magnitude` (< 1 inflates the next updates by 1/sqrt(magnitude))."""
    del setup

    def params(p, ctx: Ctx):
        corrupt = lambda policy: _perturb(policy, ctx.key, ctx.magnitude)
        return {**p, "policy": when(ctx.first & is_variant(ctx, 0), corrupt, p["policy"])}

    def ref_params(ref, ctx: Ctx):
        # A fixed corruption (keyed by the fault, not the step): the same bad weights each step.
        corrupt = lambda r: _perturb(r, ctx.run_key, ctx.magnitude)
        return when(ctx.active & is_variant(ctx, 1), corrupt, ref)

    def opt_state(state, ctx: Ctx):
        if not isinstance(state, optax.ScaleByAdamState):
            raise TypeError(f"OD3 'optimizer' expects an Adam state, got {type(state).__name__}")
        shrink = lambda nu: jax.tree.map(lambda v: v * ctx.magnitude, nu)
        return state._replace(nu=when(ctx.first & is_variant(ctx, 2), shrink, state.nu))

    return Fault("OD3", Hooks(params=params, ref_params=ref_params, opt_state=opt_state))


REGULARIZER_KNOBS = ("kl_coef", "ent_coef", "eps_low", "eps_high")


def od4(setup: Setup) -> Fault:
    """Regularizer misconfiguration. Variant "kl_sign": β → -magnitude × β (the KL penalty
    becomes a bonus for leaving the reference); "entropy": the entropy bonus coefficient is
    raised by `magnitude`; "clip": ε_low = ε_high = magnitude (the trust region opens)."""
    del setup

    def regularizers(knobs, ctx: Ctx):
        kl = jnp.where(is_variant(ctx, 0), -ctx.magnitude * knobs.kl_coef, knobs.kl_coef)
        ent = jnp.where(is_variant(ctx, 1), knobs.ent_coef + ctx.magnitude, knobs.ent_coef)
        clip = is_variant(ctx, 2)
        eps_low = jnp.where(clip, ctx.magnitude, knobs.eps_low)
        eps_high = jnp.where(clip, ctx.magnitude, knobs.eps_high)
        changed = knobs._replace(kl_coef=kl, ent_coef=ent, eps_low=eps_low, eps_high=eps_high)
        return gate(ctx.active, changed, knobs)

    return Fault("OD4", Hooks(regularizers=regularizers))

"""Policy-gradient, value and KL losses for GRPO / PPO.

All functions are pure ``jnp`` code and jit-compatible. Runtime knobs (``eps_low``,
``eps_high``, ``clip_eps``) may be traced scalars; aggregation modes and KL kinds are
static Python strings (mark them ``static_argnames`` when jitting a caller directly).

Shapes: ``[B, T]`` over response positions; ``mask`` is f32 or bool ``[B, T]`` with 1 on
the policy's action tokens that count in the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")

# Log-ratio clamp: exp(±20) ≈ 4.9e8 / 2.1e-9 is far outside any trust region, and the clamp
# keeps exp() finite (no inf * 0 = NaN) when log-probs at a position are garbage.
LOG_RATIO_CLAMP = 20.0


def _float_mask(mask: Array) -> Array:
    return mask.astype(jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den`` where ``den > 0``, else 0 (gradient-safe, never NaN)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of ``x`` over entries with mask 1; 0 for an empty mask. Returns f32[]."""
    m = _float_mask(mask)
    return _safe_div(jnp.sum(x * m), jnp.sum(m))


def aggregate(x: Array, mask: Array, *, mode: str, max_len: int | None = None) -> Array:
    """Reduces a per-token loss f32[B, T] to a scalar.

    Modes (static):
      * ``"token_mean"``: ``sum(x * mask) / sum(mask)`` — every token weighs the same
        (DAPO, Yu et al. 2025).
      * ``"seq_mean_token_mean"``: mean over each row's valid tokens, then mean over rows
        with at least one valid token (original GRPO, Shao et al. 2024).
      * ``"seq_mean_token_sum_norm"``: each row's sum divided by the constant ``T_max``
        (``max_len`` if given, else ``T``), then mean over all ``B`` rows, so the
        normalizer does not depend on response lengths (Dr. GRPO, Liu et al. 2025).

    An empty mask gives 0, never NaN.

    Args:
      x: f32[B, T] per-token values.
      mask: f32 or bool [B, T].
      mode: one of ``AGG_MODES``.
      max_len: the constant ``T_max`` for ``"seq_mean_token_sum_norm"``; ignored otherwise.

    Returns:
      f32[] scalar.
    """
    m = _float_mask(mask)
    x = x.astype(jnp.float32)
    if mode == "token_mean":
        return _safe_div(jnp.sum(x * m), jnp.sum(m))
    if mode == "seq_mean_token_mean":
        row_count = jnp.sum(m, axis=1)
        row_mean = _safe_div(jnp.sum(x * m, axis=1), row_count)
        row_valid = (row_count > 0).astype(jnp.float32)
        return _safe_div(jnp.sum(row_mean * row_valid), jnp.sum(row_valid))
    if mode == "seq_mean_token_sum_norm":
        t_max = x.shape[1] if max_len is None else max_len
        return jnp.mean(jnp.sum(x * m, axis=1) / t_max)
    raise ValueError(f"Unknown aggregation mode {mode!r}; expected one of {AGG_MODES}.")


def policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    eps_low: float | Array,
    eps_high: float | Array,
    agg_mode: str,
    is_weights: Array | None = None,
    max_len: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate objective with decoupled clip range (PPO; DAPO "clip-higher").

    With ``ρ_t = exp(logp_t - old_logp_t)`` and advantage ``A_t``, the per-token loss is::

        ℓ_t = -min(ρ_t A_t, clip(ρ_t, 1 - ε_low, 1 + ε_high) A_t) * w_t

    where ``w_t`` are optional truncated importance-sampling weights (already truncated by
    the caller; treated as constants via ``stop_gradient``). ``ℓ`` is then reduced with
    ``aggregate(..., mode=agg_mode)``. The log-ratio is zeroed at masked positions and
    clamped to ±``LOG_RATIO_CLAMP`` before ``exp`` so padding can never produce inf/NaN.

    Args:
      logp: f32[B, T] log π_θ(a_t | s_t) of the chosen tokens (differentiated).
      old_logp: f32[B, T] log π_θ_old(a_t | s_t) from the behaviour policy.
      advantages: f32[B, T] advantage A_t per token (e.g. a GRPO advantage broadcast
        over the row).
      mask: f32 or bool [B, T].
      eps_low: lower clip ε_low (ratio floor 1 - ε_low); may be traced.
      eps_high: upper clip ε_high (ratio ceiling 1 + ε_high); may be traced.
      agg_mode: one of ``AGG_MODES`` (static).
      is_weights: optional f32[B, T] importance-sampling correction weights w_t.
      max_len: ``T_max`` for ``"seq_mean_token_sum_norm"``.

    Returns:
      ``(loss, metrics)``: loss f32[]; metrics f32[] scalars (masked token means):
      ``clipfrac_low`` (A<0 and ρ < 1-ε_low), ``clipfrac_high`` (A>0 and ρ > 1+ε_high),
      ``ppo_kl`` (mean of old_logp - logp, the k1 estimate of KL(π_old || π_θ)),
      ``ratio_mean`` and ``ratio_max`` (0 for an empty mask).
    """
    m = _float_mask(mask)
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    log_ratio = jnp.where(m > 0, logp.astype(jnp.float32) - old_logp.astype(jnp.float32), 0.0)
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * jax.lax.stop_gradient(is_weights.astype(jnp.float32))
    loss = aggregate(per_token, m, mode=agg_mode, max_len=max_len)

    ratio_sg = jax.lax.stop_gradient(ratio)
    low = ((adv < 0) & (ratio_sg < 1.0 - eps_low)).astype(jnp.float32)
    high = ((adv > 0) & (ratio_sg > 1.0 + eps_high)).astype(jnp.float32)
    metrics = {
        "clipfrac_low": masked_mean(low, m),
        "clipfrac_high": masked_mean(high, m),
        "ppo_kl": masked_mean(-jax.lax.stop_gradient(log_ratio), m),
        "ratio_mean": masked_mean(ratio_sg, m),
        "ratio_max": jnp.max(jnp.where(m > 0, ratio_sg, 0.0)),
    }
    return loss, metrics


def kl_penalty(logp: Array, ref_logp: Array, *, kind: str) -> Array:
    """Per-token estimate of KL(π_θ || π_ref) from sampled-token log-probs (Schulman 2020).

    With ``log r = ref_logp - logp``:
      * ``"k1"``: ``logp - ref_logp`` (unbiased, high variance, can be negative).
      * ``"k2"``: ``0.5 * (logp - ref_logp)^2`` (biased, low variance, ≥ 0).
      * ``"k3"``: ``r - log r - 1`` (unbiased, low variance, always ≥ 0). ``log r`` is
        clamped to [-20, 20] before ``exp`` so the estimate stays finite (and its gradient
        defined) when the two log-probs are wildly apart; ``expm1`` keeps it accurate near
        0 and a final ``max(·, 0)`` removes float rounding below 0.

    Args:
      logp: f32[B, T] log-probs of the sampled tokens under the policy.
      ref_logp: f32[B, T] log-probs of the same tokens under the reference model.
      kind: one of ``KL_KINDS`` (static).

    Returns:
      f32[B, T] per-token penalty (unmasked; mask it when aggregating).
    """
    diff = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * jnp.square(diff)
    if kind == "k3":
        log_r = jnp.clip(-diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return jnp.maximum(jnp.expm1(log_r) - log_r, 0.0)
    raise ValueError(f"Unknown KL kind {kind!r}; expected one of {KL_KINDS}.")


def entropy_from_logits(logits: Array) -> Array:
    """Entropy ``H_t = -Σ_v p_v log p_v`` of the next-token distribution.

    Computed in float32 via ``log_softmax``; vocabulary entries with probability 0 (e.g.
    logits of ``-inf``) contribute 0, not NaN.

    Args:
      logits: [B, T, V] unnormalized logits.

    Returns:
      f32[B, T] entropy in nats.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)


def value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip_eps: float | Array,
    agg_mode: str,
    max_len: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss (PPO)::

        V_clip = V_old + clip(V - V_old, -ε_v, ε_v)
        ℓ_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)

    reduced with ``aggregate(..., mode=agg_mode)``.

    Args:
      values: f32[B, T] current value predictions V (differentiated).
      old_values: f32[B, T] values V_old at rollout time.
      returns: f32[B, T] targets R (e.g. from ``gae``).
      mask: f32 or bool [B, T].
      clip_eps: value clip range ε_v; may be traced.
      agg_mode: one of ``AGG_MODES`` (static).
      max_len: ``T_max`` for ``"seq_mean_token_sum_norm"``.

    Returns:
      ``(loss, metrics)``: loss f32[]; metrics ``vf_clipfrac`` (fraction of valid tokens
      where the clipped term is the larger one) and ``value_mean`` (masked mean of V).
    """
    m = _float_mask(mask)
    v = values.astype(jnp.float32)
    old_v = jax.lax.stop_gradient(old_values.astype(jnp.float32))
    ret = jax.lax.stop_gradient(returns.astype(jnp.float32))
    v_clipped = old_v + jnp.clip(v - old_v, -clip_eps, clip_eps)
    unclipped_sq = jnp.square(v - ret)
    clipped_sq = jnp.square(v_clipped - ret)
    per_token = 0.5 * jnp.maximum(unclipped_sq, clipped_sq)
    loss = aggregate(per_token, m, mode=agg_mode, max_len=max_len)
    metrics = {
        "vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).astype(jnp.float32), m),
        "value_mean": masked_mean(jax.lax.stop_gradient(v), m),
    }
    return loss, metrics

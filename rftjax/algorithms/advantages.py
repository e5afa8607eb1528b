"""Advantage estimators for reinforcement fine-tuning.

All functions are pure ``jnp`` code and jit-compatible. Hyperparameters that are runtime
knobs (``eps``, ``gamma``, ``lam``, ``kl_coef``) may be traced scalars; only structural
choices (``group_size``, ``normalize_std``, ``shift_mean``) must be static Python values.

Shapes: ``B`` is the number of completions in the batch and ``T`` the number of response
positions. Completions of one prompt are contiguous, so sample ``i`` belongs to group
``i // group_size``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# A group whose reward std is below this counts as "all rewards equal" (no learning signal).
ZERO_STD_THRESHOLD = 1e-6


def _grouped(rewards: Array, group_size: int) -> Array:
    """Reshapes ``rewards`` f32[B] into f32[B // group_size, group_size]."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be rank 1 [B], got shape {rewards.shape}.")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"batch size {rewards.shape[0]} is not a positive multiple of group_size={group_size}."
        )
    return rewards.astype(jnp.float32).reshape(-1, group_size)


def group_advantages(
    rewards: Array,
    *,
    group_size: int,
    normalize_std: bool = True,
    eps: float | Array = 1e-6,
) -> Array:
    """Group-relative advantages (GRPO, Shao et al. 2024; Dr. GRPO, Liu et al. 2025).

    For completion ``i`` of group ``g`` with reward ``r_i``::

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)   if normalize_std   (GRPO)
        A_i =  r_i - mean_g(r)                       otherwise          (Dr. GRPO)

    ``std_g`` is the *population* standard deviation (ddof=0): the group is the whole
    population of samples being compared, and ddof=0 keeps the estimate defined for
    ``group_size == 1`` (where every advantage is then 0).

    Args:
      rewards: f32[B] scalar reward per completion, ``B`` a multiple of ``group_size``.
      group_size: number of completions per prompt G (static).
      normalize_std: divide by the group std (static).
      eps: added to the std before dividing; may be a traced scalar.

    Returns:
      f32[B] advantage per completion (0 for every member of a constant-reward group).
    """
    r = _grouped(rewards, group_size)
    centered = r - jnp.mean(r, axis=1, keepdims=True)
    if normalize_std:
        centered = centered / (jnp.std(r, axis=1, keepdims=True) + eps)
    return centered.reshape(-1)


def impute_group_mean(rewards: Array, keep: Array, *, group_size: int) -> Array:
    """Rewards with each row not in `keep` replaced by the mean of its group's kept rows, so
    that a group-relative baseline is that of the kept rows alone (and a replaced row's own
    advantage is 0 without std normalization). A group with no kept row is left as it is.

    Args: rewards f32[B]; keep bool[B]; group_size G (static).
    """
    r = _grouped(rewards, group_size)
    k = jnp.asarray(keep, bool).reshape(r.shape)
    n = jnp.sum(k, axis=1, keepdims=True)
    mean = jnp.sum(jnp.where(k, r, 0.0), axis=1, keepdims=True) / jnp.maximum(n, 1)
    return jnp.where(k | (n == 0), r, mean).reshape(-1)


def group_stats(rewards: Array, *, group_size: int) -> dict[str, Array]:
    """Per-group reward statistics.

    Args:
      rewards: f32[B] reward per completion.
      group_size: completions per prompt G (static).

    Returns:
      dict with ``mean`` f32[B // G], ``std`` f32[B // G] (population std, ddof=0) and
      ``frac_zero_std`` f32[] — the fraction of groups whose rewards are all equal
      (std < 1e-6), i.e. groups that give GRPO no gradient signal.
    """
    r = _grouped(rewards, group_size)
    std = jnp.std(r, axis=1)
    return {
        "mean": jnp.mean(r, axis=1),
        "std": std,
        "frac_zero_std": jnp.mean((std < ZERO_STD_THRESHOLD).astype(jnp.float32)),
    }


def gae(
    rewards: Array,
    values: Array,
    mask: Array,
    *,
    gamma: float | Array,
    lam: float | Array,
) -> tuple[Array, Array]:
    """Generalized advantage estimation (Schulman et al. 2016) over response positions.

    With ``V_t = values[:, t]`` the value of the state before emitting token ``t``::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    computed by a reverse ``jax.lax.scan`` over time.

    The mask is assumed to be a contiguous prefix per row (left-aligned responses followed
    by padding). A position with mask 0 is terminal: the value and advantage *after* the
    last valid token are 0 (the episode ends at EOS), so rewards and values at padded
    positions never leak into valid ones. A hole in the middle of a row would likewise be
    treated as an episode boundary. Advantages and returns are 0 at masked positions.

    Args:
      rewards: f32[B, T] per-token reward r_t.
      values: f32[B, T] value estimates V(s_t).
      mask: f32 or bool [B, T], 1 on valid response tokens.
      gamma: discount factor γ; may be a traced scalar.
      lam: GAE parameter λ; may be a traced scalar.

    Returns:
      ``(advantages, returns)``, both f32[B, T].
    """
    m = mask.astype(jnp.float32)
    r = rewards.astype(jnp.float32) * m
    v = values.astype(jnp.float32) * m

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_value - v_t
        adv = (delta + gamma * lam * next_adv) * m_t
        # A masked position resets the carry: whatever precedes it sees a terminal state.
        return (v_t, adv), adv

    zeros = jnp.zeros(r.shape[:1], jnp.float32)
    _, adv_t = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    advantages = adv_t.T
    returns = (advantages + v) * m
    return advantages, returns


def whiten(
    x: Array,
    mask: Array,
    *,
    shift_mean: bool = True,
    eps: float | Array = 1e-8,
) -> Array:
    """Masked whitening: ``(x - mean) / sqrt(var + eps)`` over the valid entries.

    Mean and (population, ddof=0) variance are taken over all entries where ``mask`` is 1.
    With ``shift_mean=False`` the mean is added back, so only the scale changes (the
    convention for whitening rewards, which should keep their sign). Masked entries are 0
    in the output. An all-zero mask yields all zeros.

    Args:
      x: f32[...] values, e.g. advantages [B, T].
      mask: f32 or bool, same shape as ``x``.
      shift_mean: subtract the mean (static).
      eps: variance floor; may be a traced scalar.

    Returns:
      f32 array with the shape of ``x``.
    """
    m = mask.astype(jnp.float32)
    x = x.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(x * m) / count
    var = jnp.sum(jnp.square(x - mean) * m) / count
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def token_rewards(
    scores: Array,
    mask: Array,
    *,
    kl: Array | None = None,
    kl_coef: float | Array = 0.0,
) -> Array:
    """PPO per-token reward (Ziegler et al. 2019; Ouyang et al. 2022).

    ``r_t = score * [t == last valid token] - kl_coef * kl_t`` on valid tokens and 0
    elsewhere (the "KL in reward" formulation). The last valid token is the rightmost
    position with mask 1; rows with no valid token receive nothing.

    Args:
      scores: f32[B] sequence-level score of each completion.
      mask: f32 or bool [B, T], 1 on valid response tokens.
      kl: optional f32[B, T] per-token KL estimate (e.g. ``kl_penalty(..., kind="k1")``).
      kl_coef: KL coefficient β; may be a traced scalar.

    Returns:
      f32[B, T] per-token rewards.
    """
    m = mask.astype(jnp.float32)
    t_len = m.shape[1]
    valid = m > 0
    last = t_len - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    has_valid = jnp.any(valid, axis=1)
    placed = jax.nn.one_hot(last, t_len, dtype=jnp.float32)
    out = placed * jnp.where(has_valid, scores.astype(jnp.float32), 0.0)[:, None]
    if kl is not None:
        out = out - kl_coef * kl.astype(jnp.float32)
    return out * m

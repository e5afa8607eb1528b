"""Per-completion records of a step (FaultBench's trajectory-level records)."""

from __future__ import annotations

import jax.numpy as jnp

from rftjax.sampling import Rollout


def row_stats(trainer_logp, sampler_logp, adv, loss_mask, sampled):
    """Per-completion sums and means of token arrays [B, T]."""
    count = jnp.maximum(loss_mask.sum(-1), 1.0)
    log_ratio = jnp.clip(trainer_logp - sampler_logp, -20.0, 20.0)
    return {
        "trainer_logp_sum": (trainer_logp * sampled).sum(-1),
        "advantage": (adv * loss_mask).sum(-1) / count,
        "is_ratio": (jnp.exp(log_ratio) * sampled).sum(-1) / jnp.maximum(sampled.sum(-1), 1.0),
    }


def row_repetition(tokens, mask):
    """Per row: fraction of sampled tokens after the first that equal the previous one."""
    valid = mask[:, 1:] * mask[:, :-1]
    same = (tokens[:, 1:] == tokens[:, :-1]) * valid
    return same.sum(-1) / jnp.maximum(valid.sum(-1), 1.0)


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
        "repetition": row_repetition(ro.response, mask),
        "tool_calls": zeros if ro.tool_calls is None else ro.tool_calls,
        "tool_errors": zeros if ro.tool_errors is None else ro.tool_errors,
        **rows,
    }

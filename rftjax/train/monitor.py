"""How the RL step feeds fm: which statistics it computes from its arrays, which signals the
detector watches, and the fm part of the train state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fm import detect
from fm import stats as fs


class FMState(NamedTuple):
    """Carried in the train state: the detector's history and its runtime thresholds."""

    detect: detect.DetectState
    thresholds: detect.Thresholds


def signals_for(algo: str, *, tools: bool = False) -> tuple[detect.Signal, ...]:
    return detect.default_signals(group_normalized=algo == "grpo", tools=tools)


def make_detector(
    algo: str, config: detect.DetectConfig | None = None, *, tools: bool = False
) -> detect.Detector:
    return detect.detector(signals_for(algo, tools=tools), config or detect.DetectConfig())


def init_fm_state(detector: detect.Detector) -> FMState:
    # Distinct buffers per leaf: the train state is donated, and a buffer may be donated once.
    return jax.tree.map(jnp.copy, FMState(detector.init(), detector.thresholds()))


def loss_stats(
    *,
    logp,
    old_logp,
    sampler_logp,
    ref_logp,
    entropy,
    adv,
    mask,
    sampled_mask,
    scores,
    group_size: int,
) -> dict[str, jax.Array]:
    """Token-level statistics of one update (all inputs [B, T] except scores [B]). `mask` is
    the loss mask; sampler/trainer mismatch is measured over `sampled_mask`, the tokens the
    sampler produced, whatever the loss counts."""
    sg = jax.lax.stop_gradient
    return fs.merge(
        fs.mismatch_stats(sampler_logp, sg(old_logp), sampled_mask),
        fs.kl_stats(sg(logp), ref_logp, mask),
        fs.entropy_stats(sg(entropy), mask),
        fs.advantage_stats(adv, mask, scores, group_size=group_size),
    )


def rollout_stats(
    *,
    response,
    mask,
    loss_mask,
    lengths,
    truncated,
    scores,
    verifier,
    group_size: int,
    max_len: int,
) -> dict[str, jax.Array]:
    """Trajectory-level aggregates of a rollout; the mask check compares the loss mask with
    the response lengths, and the learner's `scores` are checked against the task verifier's
    own rewards (`verifier`, the shadow)."""
    return fs.merge(
        fs.reward_stats(scores, group_size=group_size),
        fs.reward_shadow_stats(scores, verifier),
        fs.length_stats(lengths, truncated, max_len=max_len),
        fs.token_stats(response, mask),
        fs.consistency_stats(loss_mask, lengths),
    )


def update_stats(grads, updates, params, lr) -> dict[str, jax.Array]:
    return fs.optimization_stats(grads, updates, params, lr=lr, groups=fs.default_groups)


def observe(detector: detect.Detector, stats: dict[str, jax.Array], state: FMState):
    """Runs the detector on a step's statistics: (flags dict for the metrics, new FMState)."""
    out, det_state = detector.update(stats, state.detect, state.thresholds)
    flags = {k: jnp.asarray(v, jnp.float32) for k, v in detect.flags_to_dict(detector, out).items()}
    return flags, state._replace(detect=det_state)

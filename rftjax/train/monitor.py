"""How the RL step feeds fm: which statistics it computes from its arrays, which signals the
detector watches, and the fm part of the train state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fm import detect, integrity
from fm import stats as fs


class FMState(NamedTuple):
    """Carried in the train state: the detector's history and its runtime thresholds, and the
    fingerprints of the weights as the last step left them and of the reference as loaded."""

    detect: detect.DetectState
    thresholds: detect.Thresholds
    sealed_weights: jax.Array  # uint32: `weights_of` the state the last step returned
    loaded_reference: jax.Array  # uint32: the reference weights' fingerprint at load


def signals_for(algo: str, *, tools: bool = False) -> tuple[detect.Signal, ...]:
    return detect.default_signals(group_normalized=algo == "grpo", tools=tools)


def make_detector(
    algo: str, config: detect.DetectConfig | None = None, *, tools: bool = False
) -> detect.Detector:
    return detect.detector(signals_for(algo, tools=tools), config or detect.DetectConfig())


def weights_of(params, opt_state) -> jax.Array:
    """The fingerprint of what the optimizer owns: parameters and optimizer state."""
    return integrity.tree_checksum((params, opt_state))


def init_fm_state(detector: detect.Detector, params, opt_state, ref_params) -> FMState:
    state = FMState(
        detector.init(),
        detector.thresholds(),
        weights_of(params, opt_state),
        integrity.tree_checksum(ref_params),
    )
    # Distinct buffers per leaf: the train state is donated, and a buffer may be donated once.
    return jax.tree.map(jnp.copy, state)


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


def integrity_stats(read: tuple[jax.Array, jax.Array], state: FMState) -> dict[str, jax.Array]:
    """`read`: fingerprints of (weights, reference) as the step read them."""
    return fs.integrity_stats(read[0], state.sealed_weights, read[1], state.loaded_reference)


def coefficient_stats(metrics, configured, *, kl_in_reward: bool) -> dict[str, jax.Array]:
    """The regularizer audit of one step: the loss's measured coefficients (`loss_kl_coef`,
    `loss_ent_coef` in `metrics`) against the knobs as configured (`configured`, before any
    stage between knob and loss). With the KL in the reward, the loss applies no β."""
    effective = {"kl_coef": metrics["loss_kl_coef"], "ent_coef": metrics["loss_ent_coef"]}
    expected = {
        "kl_coef": jnp.zeros(()) if kl_in_reward else configured.kl_coef,
        "ent_coef": configured.ent_coef,
    }
    return fs.coefficient_stats(effective, expected)


def update_stats(grads, updates, params, lr) -> dict[str, jax.Array]:
    return fs.optimization_stats(grads, updates, params, lr=lr, groups=fs.default_groups)


def observe(detector: detect.Detector, stats: dict[str, jax.Array], state: FMState):
    """Runs the detector on a step's statistics: (flags dict for the metrics, new FMState)."""
    out, det_state = detector.update(stats, state.detect, state.thresholds)
    flags = {k: jnp.asarray(v, jnp.float32) for k, v in detect.flags_to_dict(detector, out).items()}
    return flags, state._replace(detect=det_state)

"""The taxonomy of RFT failures: 16 fault types in 5 families, what reveals each, what fixes it.

Diagnosing into this taxonomy is fm's job, so it lives here; a fault-injection catalog (or any
trainer) implements one injection per entry. `signals` name `fm.stats` keys, with the direction
in which the fault moves them ("+" up, "-" down, "~" either way or flat).
"""

from __future__ import annotations

from typing import NamedTuple

FAMILIES = (
    "reward",
    "policy-generation",
    "optimization-dynamics",
    "credit-assignment",
    "tool-environment",
)
HOOKS = (
    "rewards",
    "rollout_logprobs",
    "rollout_params",
    "sampler",
    "learning_rate",
    "gradients",
    "params",
    "regularizers",
    "advantages",
    "loss_mask",
    "tool_results",
    "observations",
)
REMEDIES = (
    "rollback",
    "lr_scale",
    "lr_cap",
    "grad_clip",
    "reset_moments",
    "skip_data",
    "skip_nonfinite",
    "raise_kl",
    "truncated_is",
    "resync_sampler",
    "restore_sampler",
    "mask_unscorable",
    "advantage_audit",
    "verifier_failover",
    "restore_coefficients",
    "restore_mask",
    "dynamic_sampling",
    "retry_tools",
    "mask_tool_tokens",
    "halt",
)


class FaultType(NamedTuple):
    id: str
    family: str
    name: str
    hook: str
    description: str
    signals: tuple[tuple[str, str], ...]  # (fm.stats key, "+" | "-" | "~")
    remedies: tuple[str, ...]


def _t(id_, family, name, hook, description, signals, remedies) -> FaultType:
    return FaultType(id_, family, name, hook, description, tuple(signals), tuple(remedies))


CATALOG: tuple[FaultType, ...] = (
    _t(
        "RF1",
        "reward",
        "noisy or flipped reward labels",
        "rewards",
        "A fraction of rewards is replaced by noise or flipped: the verifier is unreliable.",
        [
            ("reward_mean", "-"),
            ("adv_shadow_corr", "-"),
            ("reward_std", "~"),
            ("reward_shadow_gap", "+"),
        ],  # fmt: skip
        ["rollback", "verifier_failover"],
    ),
    _t(
        "RF2",
        "reward",
        "exploitable proxy reward (hacking)",
        "rewards",
        "A shortcut (length, empty or format-only answers) earns a bonus the task does not.",
        [
            ("reward_mean", "+"),
            ("length_mean", "~"),
            ("repetition_ratio", "+"),
            ("kl_ref_k1", "+"),
            ("reward_shadow_gap", "+"),
        ],  # fmt: skip
        # The gold verifier first: it removes the exploit; a higher β only slows it.
        ["rollback", "verifier_failover", "raise_kl"],
    ),
    _t(
        "RF3",
        "reward",
        "missing or zeroed reward (verifier outage)",
        "rewards",
        "Rewards of some or all samples are missing and read as zero.",
        [
            ("reward_mean", "-"),
            ("frac_zero_std_groups", "+"),
            ("grad_norm", "-"),
            ("reward_shadow_gap", "+"),
        ],  # fmt: skip
        # Re-scoring with the redundant verifier stands in for "retry" on an outage; masking
        # needs the pipeline to know which samples went unscored.
        ["verifier_failover", "mask_unscorable", "skip_data", "rollback"],
    ),
    _t(
        "PG1",
        "policy-generation",
        "train-inference log-prob mismatch",
        "rollout_logprobs",
        "The rollout engine's log-probs differ from the trainer's on the same tokens.",
        [
            ("mismatch_k3", "+"),
            ("mismatch_max_abs", "+"),
            ("is_ratio_max", "+"),
            ("is_ess", "-"),
            ("grad_norm", "+"),
        ],
        # Re-syncing removes the mismatch; truncated IS only bounds what it does to the update.
        ["resync_sampler", "truncated_is", "rollback"],
    ),
    _t(
        "PG2",
        "policy-generation",
        "stale policy (off-policy lag)",
        "rollout_params",
        "Rollouts come from parameters several steps old.",
        [("mismatch_k3", "+"), ("is_ratio_max", "+"), ("is_ess", "-")],
        ["resync_sampler", "truncated_is", "rollback"],
    ),
    _t(
        "PG3",
        "policy-generation",
        "degenerate sampling settings",
        "sampler",
        "Temperature too high or low, or top-p / length truncation, distorts the samples.",
        [
            ("entropy_mean", "~"),
            ("clip_ratio", "+"),
            ("frac_zero_std_groups", "+"),
            ("length_mean", "~"),
        ],
        ["restore_sampler", "rollback"],
    ),
    _t(
        "OD1",
        "optimization-dynamics",
        "learning-rate spike or stall",
        "learning_rate",
        "The effective learning rate jumps far above, or collapses far below, its schedule.",
        [("update_param_ratio", "~"), ("grad_norm", "~"), ("kl_ref_k1", "+")],
        ["rollback", "lr_cap", "lr_scale"],
    ),
    _t(
        "OD2",
        "optimization-dynamics",
        "non-finite or exploding gradients",
        "gradients",
        "Gradients become huge or non-finite after the backward pass.",
        [("grad_norm", "+"), ("nonfinite_grads", "+")],
        ["rollback", "skip_nonfinite", "grad_clip", "skip_data", "reset_moments"],
    ),
    _t(
        "OD3",
        "optimization-dynamics",
        "corrupted parameters or reference model",
        "params",
        "Policy or reference weights are corrupted (bit flips, a bad load, a reset).",
        [
            ("kl_ref_k1", "~"),
            ("reward_mean", "-"),
            ("nonfinite_params", "+"),
            ("check_weights", "+"),
            ("check_reference", "+"),
        ],
        ["rollback", "halt"],
    ),
    _t(
        "OD4",
        "optimization-dynamics",
        "regularizer misconfiguration",
        "regularizers",
        "KL sign, entropy coefficient or clip range set wrong.",
        [("entropy_mean", "~"), ("kl_ref_k1", "+"), ("check_coefficients", "+")],
        ["restore_coefficients", "rollback"],
    ),
    _t(
        "CA1",
        "credit-assignment",
        "advantage sign flip",
        "advantages",
        "Advantages have the wrong sign: the policy is pushed away from rewarded samples.",
        [
            ("reward_mean", "-"),
            ("adv_shadow_corr", "-"),
            ("check_adv_sign", "+"),
            ("check_adv_flip", "+"),
        ],  # fmt: skip
        ["rollback", "advantage_audit"],
    ),
    _t(
        "CA2",
        "credit-assignment",
        "grouping or normalization bug",
        "advantages",
        "Wrong group ids or normalizer: group means not zero, or advantages silently shrunk.",
        [("adv_group_mean_max_abs", "+"), ("adv_scale_ratio", "~"), ("adv_max_abs", "~")],
        ["advantage_audit", "rollback"],
    ),
    _t(
        "CA3",
        "credit-assignment",
        "mask, padding or EOS bug",
        "loss_mask",
        "The loss mask misses response tokens or counts padding.",
        [("check_mask_length", "+"), ("length_mean", "+"), ("clip_ratio", "+")],
        ["restore_mask", "rollback"],
    ),
    _t(
        "CA4",
        "credit-assignment",
        "zero-signal groups or length-normalization bias",
        "rewards",
        "Groups whose samples all score alike give no gradient; or aggregation biases length.",
        [("frac_zero_std_groups", "+"), ("adv_std", "-"), ("grad_norm", "-")],
        # A verifier that caches its scores by prompt: the redundant verifier does not.
        ["dynamic_sampling", "verifier_failover", "rollback"],
    ),
    _t(
        "TE1",
        "tool-environment",
        "tool errors",
        "tool_results",
        "Tools fail or return errors for some calls.",
        [("tool_error_rate", "+"), ("tool_calls_mean", "~"), ("reward_mean", "-")],
        ["retry_tools", "mask_unscorable", "skip_data"],
    ),
    _t(
        "TE2",
        "tool-environment",
        "corrupted or timed-out observations",
        "observations",
        "Tool observations arrive corrupted or not at all.",
        [("tool_aborted_frac", "+"), ("reward_mean", "-")],
        # A timed-out call is an infra failure the trainer can mask; an observation corrupted
        # with an OK status is not seen as one, and no knob of the trainer repairs the
        # environment: halt and report.
        ["mask_unscorable", "halt"],
    ),
)

BY_ID: dict[str, FaultType] = {f.id: f for f in CATALOG}


def get(fault_id: str) -> FaultType:
    """The entry of `fault_id`; a ValueError lists the known ids."""
    if fault_id not in BY_ID:
        raise ValueError(f"unknown fault type {fault_id!r}; known: {', '.join(BY_ID)}")
    return BY_ID[fault_id]


def family_of(fault_id: str) -> str:
    """The family of a fault type id, e.g. "OD1" -> "optimization-dynamics"."""
    return get(fault_id).family

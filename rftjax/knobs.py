"""Knobs: the runtime settings of the compiled step that users and the remediator change.

Every knob is a scalar array passed into the compiled functions, so changing one never
recompiles. A value <= 0 turns an optional guard off (noted per field).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Knobs(NamedTuple):
    lr: jax.Array  # base learning rate
    lr_scale: jax.Array  # multiplies lr (remediation: 0.5)
    lr_cap: jax.Array  # upper bound on the effective lr
    grad_clip: jax.Array  # global-norm clip; <= 0: off
    kl_coef: jax.Array  # β, KL-to-reference coefficient
    ent_coef: jax.Array  # entropy bonus coefficient
    eps_low: jax.Array  # PPO clip ε below 1
    eps_high: jax.Array  # PPO clip ε above 1 (clip-higher)
    temperature: jax.Array  # sampler temperature; <= 0: greedy
    top_p: jax.Array  # nucleus mass; 1: off
    top_k: jax.Array  # int32; <= 0: off
    is_cap: jax.Array  # truncated importance-sampling cap on trainer/sampler ratio; <= 0: off
    adv_clip: jax.Array  # |advantage| bound; <= 0: off
    reward_clip: jax.Array  # |reward| bound; <= 0: off
    vf_coef: jax.Array  # value-loss coefficient (PPO)
    # Remedy switches (> 0: on), turned on by fm's remediator and off by default:
    verifier_failover: jax.Array  # score with the task's own verifier, not the reward pipeline
    advantage_audit: jax.Array  # advantages of the reference (shadow) estimator, as computed
    restore_mask: jax.Array  # loss mask rebuilt from the sampler's response mask
    restore_sampler: jax.Array  # the sampler runs with these knobs' settings, as configured
    restore_coefficients: jax.Array  # the loss uses these knobs' β, entropy coef and ε
    skip_nonfinite: jax.Array  # an update whose gradients are not finite is skipped
    resync_sampler: jax.Array  # the sampler runs the trainer's current weights and numerics
    mask_unscorable: jax.Array  # completions whose tool calls failed in the environment: no loss


KNOB_NAMES = Knobs._fields
# The remedy switches among them (0: off; fm's remediator turns them on).
SWITCHES = (
    "verifier_failover",
    "advantage_audit",
    "restore_mask",
    "restore_sampler",
    "restore_coefficients",
    "skip_nonfinite",
    "resync_sampler",
    "mask_unscorable",
)
# The knobs a user sets from the command line (their defaults: `make_knobs`'s), with help.
KNOB_FLAGS = {
    "lr": "Learning rate of RL.",
    "grad_clip": "Global-norm gradient clip (<= 0: off).",
    "kl_coef": "KL-to-reference coefficient β.",
    "ent_coef": "Entropy bonus coefficient.",
    "eps_low": "Clip ε below 1.",
    "eps_high": "Clip ε above 1 (clip-higher).",
    "temperature": "Sampling temperature.",
    "top_p": "Nucleus sampling mass (1: off).",
    "top_k": "Top-k sampling (0: off).",
    "vf_coef": "PPO value-loss coefficient.",
}
MIN_TEMPERATURE = 1e-3  # below it, logits / T overflows float32


def make_knobs(
    *,
    lr: float = 1e-4,
    lr_scale: float = 1.0,
    lr_cap: float = 1.0,
    grad_clip: float = 1.0,
    kl_coef: float = 0.04,
    ent_coef: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    is_cap: float = 0.0,
    adv_clip: float = 0.0,
    reward_clip: float = 0.0,
    vf_coef: float = 0.1,
    verifier_failover: float = 0.0,
    advantage_audit: float = 0.0,
    restore_mask: float = 0.0,
    restore_sampler: float = 0.0,
    restore_coefficients: float = 0.0,
    skip_nonfinite: float = 0.0,
    resync_sampler: float = 0.0,
    mask_unscorable: float = 0.0,
) -> Knobs:
    """Builds knobs from Python numbers (float32 scalars; top_k int32)."""
    values = dict(locals())
    for name, value in values.items():
        if not np.isfinite(value):
            raise ValueError(f"knob {name}={value} must be finite")
    if lr < 0 or lr_scale < 0 or lr_cap <= 0:
        raise ValueError(f"need lr >= 0, lr_scale >= 0, lr_cap > 0; got {lr}, {lr_scale}, {lr_cap}")
    if temperature != 0 and temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {temperature}"
        )
    for name in ("kl_coef", "ent_coef", "vf_coef"):
        if values[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {values[name]}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ε must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    return Knobs(
        **{k: jnp.asarray(v, jnp.int32 if k == "top_k" else jnp.float32) for k, v in values.items()}
    )


def knobs_to_dict(knobs: Knobs) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in knobs._asdict().items()}


def knobs_from_dict(values: dict[str, float]) -> Knobs:
    unknown = set(values) - set(KNOB_NAMES)
    if unknown:
        raise ValueError(f"unknown knobs {sorted(unknown)}; accepted: {list(KNOB_NAMES)}")
    return make_knobs(**{k: int(v) if k == "top_k" else float(v) for k, v in values.items()})


def replace(knobs: Knobs, **changes: float) -> Knobs:
    return knobs_from_dict({**knobs_to_dict(knobs), **changes})


def knob_defaults() -> dict[str, float]:
    """Each knob's default (`make_knobs`'s keyword defaults)."""
    params = inspect.signature(make_knobs).parameters
    return {name: p.default for name, p in params.items()}


__all__ = [
    "KNOB_FLAGS",
    "KNOB_NAMES",
    "SWITCHES",
    "Knobs",
    "knobs_from_dict",
    "knob_defaults",
    "knobs_to_dict",
    "make_knobs",
    "replace",
]

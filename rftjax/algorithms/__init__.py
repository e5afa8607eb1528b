"""RL algorithms: advantage estimators and losses for GRPO / PPO."""

from rftjax.algorithms.advantages import (
    gae,
    group_advantages,
    group_stats,
    impute_group_mean,
    token_rewards,
    whiten,
)
from rftjax.algorithms.losses import (
    AGG_MODES,
    KL_KINDS,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    policy_loss,
    value_loss,
)

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "aggregate",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "group_stats",
    "impute_group_mean",
    "kl_penalty",
    "masked_mean",
    "policy_loss",
    "token_rewards",
    "value_loss",
    "whiten",
]

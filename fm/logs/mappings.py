"""One declared, versioned table per trainer: its logged metric names -> fm's signal names.

A table says, for each fm signal (an `fm.stats` key, the names the detector and the diagnoser
read), which of the trainer's metric names carry it (aliases, first present wins: a newer name
before an older one), which other names the trainer logs that fm knowingly does not use (with
the reason), and nothing else: any other name in a log is reported as unknown, never dropped
in silence. A table's `version` changes whenever a row changes, so that an analysis names the
exact table it used (summary.json, report.md).

The names were read from the trainers' own sources:
  TRL 1.16 `GRPOTrainer` (its `_metrics` keys, and the `Trainer`'s `loss`, `grad_norm`,
  `learning_rate`); TRL before 0.15 logged `completion_length` for the mean length;
  verl's `compute_data_metrics` (`critic/...`, `response_length/...`), its actor's update
  metrics (`actor/...`) and `rollout_corr/...` (rollout-correction diagnostics; `mismatch/...`
  in older verl);
  OpenRLHF's PPO actor status (`policy_loss`, `kl`, `ppo_kl`, `ppo_clip_ratio`, `actor_lr`,
  ...), which its wandb and TensorBoard loggers write under `train/`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import NamedTuple


class Table(NamedTuple):
    """The mapping of one trainer's log to fm signals.

    Attributes:
      format: the trainer's name, as `--format` takes it.
      version: bumped whenever a row changes.
      signals: fm signal -> the trainer's metric names carrying it (first present wins).
      notes: fm signal -> how the trainer's metric differs from fm's statistic, if it does.
      unused: glob pattern of the trainer's metric names fm reads but does not use -> why.
    """

    format: str
    version: int
    signals: Mapping[str, tuple[str, ...]]
    notes: Mapping[str, str]
    unused: Mapping[str, str]

    @property
    def tag(self) -> str:
        return f"{self.format}-v{self.version}"

    def is_unused(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.unused)


_STEP_KEYS = {"step": "the step counter", "epoch": "the epoch counter"}

TRL = Table(
    format="trl",
    version=1,
    signals={
        "reward_mean": ("reward",),
        "reward_std": ("reward_std",),
        "frac_zero_std_groups": ("frac_reward_zero_std",),
        "length_mean": ("completions/mean_length", "completion_length"),
        "length_max": ("completions/max_length",),
        "length_min": ("completions/min_length",),
        "clip_ratio": ("completions/clipped_ratio",),
        "entropy_mean": ("entropy",),
        "kl_ref_k1": ("kl",),
        "mismatch_max_abs": ("sampling/sampling_logp_difference/max",),
        "is_ratio_mean": ("sampling/importance_sampling_ratio/mean",),
        "is_ratio_max": ("sampling/importance_sampling_ratio/max",),
        "grad_norm": ("grad_norm",),
        "lr": ("learning_rate",),
        "tool_calls_mean": ("tools/call_frequency",),
        "tool_error_rate": ("tools/failure_frequency",),
    },
    notes={
        "kl_ref_k1": "TRL's kl is the k3 estimator of KL(policy || reference) per token",
        "tool_calls_mean": "TRL's call frequency is tool calls per completion",
        "tool_error_rate": "TRL's failure frequency is failed calls per completion, not per call",
    },
    unused={
        **_STEP_KEYS,
        "loss": "the loss value: no fm signal (its scale depends on the loss type)",
        "policy_loss": "the policy-gradient loss: no fm signal",
        "aux_loss": "a mixture-of-experts auxiliary loss: no fm signal",
        "entropy_coef": "a configured coefficient, not a measurement",
        "num_tokens": "tokens seen so far: a counter",
        "step_time": "seconds a step took",
        "completions/mean_terminated_length": "a length statistic fm does not model",
        "completions/min_terminated_length": "a length statistic fm does not model",
        "completions/max_terminated_length": "a length statistic fm does not model",
        "rewards/*": "per reward function; fm reads the combined reward",
        "clip_ratio/*": "importance-ratio clipping (PPO ε): no fm signal",
        "cispo_clip_ratio": "importance-ratio clipping (CISPO): no fm signal",
        "vespo/*": "VESPO statistics: no fm signal",
        "sampling/sampling_logp_difference/mean": "mean |Δ log p|: fm reads the max",
        "sampling/importance_sampling_ratio/min": "fm reads the mean and max ratio",
        "eval_*": "evaluation metrics: fm analyses training steps",
        "train_*": "end-of-training summary",
        "total_flos": "end-of-training summary",
    },
)

VERL = Table(
    format="verl",
    version=1,
    signals={
        "reward_mean": ("critic/score/mean",),
        "reward_max": ("critic/score/max",),
        "reward_min": ("critic/score/min",),
        "length_mean": ("response_length/mean",),
        "length_max": ("response_length/max",),
        "length_min": ("response_length/min",),
        "clip_ratio": ("response_length/clip_ratio",),
        "entropy_mean": ("actor/entropy",),
        "kl_ref_k1": ("actor/kl_loss", "actor/reward_kl_penalty"),
        "mismatch_k3": ("rollout_corr/k3_kl", "mismatch/mismatch_k3_kl"),
        "is_ratio_mean": ("rollout_corr/rollout_is_mean", "mismatch/rollout_is_mean"),
        "is_ratio_max": ("rollout_corr/rollout_is_max", "mismatch/rollout_is_max"),
        "is_ess": (
            "rollout_corr/rollout_is_eff_sample_size",
            "mismatch/rollout_is_eff_sample_size",
        ),
        "grad_norm": ("actor/grad_norm",),
        "lr": ("actor/lr",),
        "adv_mean": ("critic/advantages/mean",),
    },
    notes={
        "reward_mean": "verl's score is the verifier's reward before any in-reward KL penalty",
        "kl_ref_k1": "actor/kl_loss with use_kl_loss (its kl_loss_type estimator), else the "
        "in-reward KL penalty",
    },
    unused={
        **_STEP_KEYS,
        "critic/rewards/*": "score minus the in-reward KL penalty: fm reads the score",
        "critic/advantages/max": "fm reads the mean advantage",
        "critic/advantages/min": "fm reads the mean advantage",
        "critic/returns/*": "returns: no fm signal",
        "critic/values/*": "critic values: no fm signal",
        "critic/vf_*": "critic fit: no fm signal",
        "critic/*": "critic training: no fm signal",
        "actor/pg_loss": "the policy-gradient loss: no fm signal",
        "actor/pg_clipfrac*": "importance-ratio clipping (PPO ε): no fm signal",
        "actor/ppo_kl": "KL(old || new) within the update: no fm signal",
        "actor/kl_coef": "a configured coefficient, not a measurement",
        "actor/reward_kl_penalty_coeff": "a configured coefficient, not a measurement",
        "actor/*": "actor update statistics fm does not model",
        "rollout_corr/*": "rollout-correction statistics fm does not model",
        "mismatch/*": "rollout-correction statistics fm does not model (older verl names)",
        "response_length/*": "length statistics fm does not model",
        "prompt_length/*": "prompt lengths: not a training signal",
        "response/aborted_ratio": "aborted generations: no fm signal",
        "global_seqlen/*": "load balancing",
        "timing_s/*": "timings",
        "timing_per_token_ms/*": "timings",
        "perf/*": "throughput and memory",
        "training/*": "progress counters and trainer internals",
        "val-core/*": "validation metrics: fm analyses training steps",
        "val-aux/*": "validation metrics: fm analyses training steps",
        "val/*": "validation metrics: fm analyses training steps",
    },
)

OPENRLHF = Table(
    format="openrlhf",
    version=1,
    signals={
        "reward_mean": ("reward",),
        "reward_std": ("reward_std",),
        "frac_zero_std_groups": ("frac_zero_std_groups",),
        "length_mean": ("response_length",),
        "clip_ratio": ("truncated",),
        "repetition_ratio": ("repetition_ratio",),
        "entropy_mean": ("policy_entropy", "entropy"),
        "kl_ref_k1": ("kl",),
        "grad_norm": ("grad_norm", "actor_grad_norm"),
        "lr": ("actor_lr",),
        "adv_mean": ("advantage_mean",),
        "adv_std": ("advantage_std",),
        "tool_calls_mean": ("tool_call_count",),
        "tool_error_rate": ("tool_error_rate",),
    },
    notes={
        "kl_ref_k1": "OpenRLHF's kl is its configured estimator (k1/k2/k3) of KL to the reference",
        "clip_ratio": "per-rollout `truncated` (hit the length cap), averaged over the step",
        "tool_error_rate": "per step: summed tool_error_count / summed tool_call_count",
    },
    unused={
        **_STEP_KEYS,
        "global_step": "the step counter",
        "policy_loss": "the policy-gradient loss: no fm signal",
        "critic_loss": "critic training: no fm signal",
        "values": "critic values: no fm signal",
        "critic_lr": "critic learning rate: no fm signal",
        "return": "returns: no fm signal",
        "ppo_kl": "KL(old || new) within the update: no fm signal",
        "ppo_clip_ratio": "importance-ratio clipping (PPO ε): no fm signal",
        "entropy_loss": "the entropy bonus term: no fm signal",
        "total_length": "prompt + response length: fm reads the response length",
        "policy_update_steps": "a counter",
        "tool_error_count": "aggregated into tool_error_rate",
        "rollout_id": "an identifier",
        "sample_id": "an identifier",
        "prompt_id": "an identifier",
        "group_id": "an identifier",
        "eval/*": "evaluation metrics: fm analyses training steps",
        "generated_samples": "sample text",
    },
)

# rftjax writes fm's own statistics under their names: the table is the identity on them.
_FM_STATS = (
    "reward_mean reward_std reward_min reward_max reward_p10 reward_p50 reward_p90 "
    "frac_zero_std_groups group_reward_std_mean nonfinite_rewards reward_shadow_gap length_mean "
    "length_std length_max length_min clip_ratio length_at_cap repetition_ratio "
    "ngram_repeat_ratio unique_token_ratio adv_mean adv_std adv_max_abs adv_group_mean_max_abs "
    "adv_shadow_corr adv_shadow_sign_agree adv_scale_ratio check_adv_sign check_adv_group_mean "
    "check_adv_flip mismatch_k3 mismatch_max_abs is_ratio_mean is_ratio_max is_ess kl_ref_k1 "
    "kl_ref_k3 kl_ref_max entropy_mean entropy_min_seq grad_norm update_norm param_norm "
    "update_param_ratio lr tool_calls_mean tool_error_rate tool_turns_mean tool_aborted_frac "
    "check_mask_length masked_tokens_mean check_weights check_reference check_coefficients "
    "nonfinite_grads nonfinite_params"
).split()

RFTJAX = Table(
    format="rftjax",
    version=1,
    signals={name: (name,) for name in _FM_STATS},
    notes={},
    unused={
        **_STEP_KEYS,
        "alarm": "the in-step detector's verdict (fm.analyze replays the detector itself)",
        "nonfinite": "the in-step detector's verdict",
        "flag/*": "the in-step detector's flags",
        "score/*": "the in-step detector's scores",
        "cusum/*": "the in-step detector's CUSUM sums",
        "loss*": "loss terms: no fm signal",
        "pg_loss": "a loss term: no fm signal",
        "kl_loss": "a loss term: no fm signal",
        "entropy_loss": "a loss term: no fm signal",
        "eval_*": "held-out evaluation: fm analyses training steps",
        "knob/*": "runtime knobs, not measurements",
        "time*": "timings",
        "seconds*": "timings",
        "*_seconds": "timings",
    },
)

TABLES: dict[str, Table] = {t.format: t for t in (TRL, VERL, OPENRLHF, RFTJAX)}


def get(fmt: str) -> Table:
    """The table of `fmt`; a ValueError lists the formats that have one."""
    if fmt not in TABLES:
        raise ValueError(f"no mapping table for format {fmt!r}; known: {', '.join(TABLES)}")
    return TABLES[fmt]


class Mapped(NamedTuple):
    """What a table made of a log's metric names."""

    used: dict[str, str]  # fm signal -> the trainer's name it was read from
    unused: tuple[str, ...]  # names the table declares unused
    unknown: tuple[str, ...]  # names the table does not know


def resolve(table: Table, names: set[str] | frozenset[str]) -> Mapped:
    """Which fm signal each of `names` (the metric names a log holds) feeds, under `table`."""
    used = {}
    for signal, aliases in table.signals.items():
        present = [a for a in aliases if a in names]
        if present:
            used[signal] = present[0]
    taken = set(used.values())
    rest = sorted(names - taken)
    aliases = {a for aliases in table.signals.values() for a in aliases}
    unused = tuple(n for n in rest if n in aliases or table.is_unused(n))
    unknown = tuple(n for n in rest if n not in aliases and not table.is_unused(n))
    return Mapped(used, unused, unknown)

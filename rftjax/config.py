"""Run configuration: frozen, keyword-only dataclasses that validate and say what was wrong.

`RLConfig` holds what shapes the compiled step (changing it recompiles); runtime settings
that must never recompile are knobs (`rftjax.knobs`). `TrainConfig` holds the outer loop.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import faults

ALGOS = ("grpo", "ppo")
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")
FM_MODES = ("off", "detect", "full")
FM_POLICIES = ("fm", "random", "rollback_skip", "rollback_lr")  # = fm.remediate.PLANNERS
FM_DIAGNOSERS = ("learned", "rules")
DEFAULT_WARMUP_STEPS = 300  # supervised warm-up of a preset (random) model; none for checkpoints


def _check_choice(name: str, value: Any, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {', '.join(accepted)}")


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Static settings of the RL step.

    Attributes:
      algo: "grpo" (group-normalized advantages) or "ppo" (value head + GAE).
      prompts_per_step, group_size: a step samples prompts_per_step × group_size completions.
      max_new_tokens: N, response slots per completion.
      num_epochs, num_minibatches: optimizer updates per rollout = epochs × minibatches.
      loss_agg: token_mean (DAPO), seq_mean_token_mean (GRPO), seq_mean_token_sum_norm (Dr. GRPO).
      normalize_adv_std: GRPO divides by the group std; False gives Dr. GRPO.
      kl_kind: estimator of KL(π‖π_ref) in the loss and metrics: k1, k2 or k3.
      kl_in_reward: PPO puts -β·k1 into per-token rewards instead of the loss.
      gamma, lam: GAE γ and λ (PPO). vf_clip: value clip range (PPO).
      whiten_adv: PPO whitens token advantages over the batch.
    """

    algo: str = "grpo"
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 4
    num_epochs: int = 1
    num_minibatches: int = 1
    loss_agg: str = "token_mean"
    normalize_adv_std: bool = True
    kl_kind: str = "k3"
    kl_in_reward: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    vf_clip: float = 0.2
    whiten_adv: bool = True
    lr_warmup_steps: int = 0
    adam_b1: float = 0.9
    adam_b2: float = 0.999

    def __post_init__(self):
        _check_choice("algo", self.algo, ALGOS)
        _check_choice("loss_agg", self.loss_agg, AGG_MODES)
        _check_choice("kl_kind", self.kl_kind, KL_KINDS)
        _check_positive(
            self,
            "prompts_per_step",
            "group_size",
            "max_new_tokens",
            "num_epochs",
            "num_minibatches",
        )
        if self.algo == "grpo" and self.group_size < 2:
            raise ValueError(
                f"GRPO needs group_size >= 2 to compare completions, got {self.group_size}"
            )
        if self.prompts_per_step % self.num_minibatches:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} is not divisible by "
                f"num_minibatches={self.num_minibatches} (a minibatch holds whole groups)"
            )
        if self.kl_in_reward and self.algo != "ppo":
            raise ValueError(
                f"kl_in_reward applies to PPO's per-token rewards; algo="
                f"{self.algo!r} puts the KL penalty in the loss (leave it False)"
            )
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def updates_per_step(self) -> int:
        return self.num_epochs * self.num_minibatches


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The outer loop: what to train, for how long, where to write.

    ``model`` is a preset name or a local Hugging Face checkpoint folder; with a folder the
    task's tokenizer is the checkpoint's, and ``chat_template`` (auto, none) says whether
    prompts go through its chat template. ``prompt_field``, ``answer_field`` and
    ``answer_format`` (auto, gsm8k, math) configure file tasks (jsonl:, parquet:).
    ``warmup_steps=None`` resolves to 0 for a checkpoint folder (it already writes answers;
    supervised warm-up would only pull it toward the reference texts) and to
    ``DEFAULT_WARMUP_STEPS`` for a preset (a random model never earns reward without it).
    """

    workdir: str
    task: str = "arith"
    model: str = "tiny"
    model_overrides: str = ""
    chat_template: str = "auto"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    answer_format: str = "auto"
    steps: int = 1500
    seed: int = 0
    # Seed of the model's initialization and warm-up (None: `seed`). Runs that share it start
    # RL from one warmed-up checkpoint, as fine-tuning runs share a starting checkpoint; `seed`
    # still sets the RL data and sampling.
    init_seed: int | None = None
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    knobs: dict = dataclasses.field(default_factory=dict)
    warmup_steps: int | None = None
    warmup_batch_size: int = 128
    warmup_lr: float = 1e-3
    eval_every: int = 100
    eval_size: int = 512
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 100
    resume: bool = False
    fm: str = "off"
    fault: str = "none"
    fault_severity: str = "moderate"
    fault_variant: str = ""
    fault_magnitude: float | None = None  # overrides the severity preset
    fault_onset: int = 1  # first active RL step (1-based)
    fault_duration: int = -1  # <= 0: to the end
    # Start from another run's checkpoint just before the fault's onset (that run: the same
    # configuration without the fault). Its records up to there are this run's: a fault is
    # the identity before onset, bit for bit.
    fork_from: str = ""
    # --fm=full: steps without an alarm that make a checkpoint healthy (a rollback target)
    # and a remediation attempt verified.
    fm_window: int = 20
    # fm's own failures (an exception in the diagnoser or remediator) end the run instead of
    # being logged to events.jsonl while training goes on unmanaged.
    fm_strict: bool = False
    # --fm=full: who plans the remedies: fm (from the diagnosis) or a baseline (random,
    # rollback_skip, rollback_lr; FaultBench's remediate comparison).
    fm_policy: str = "fm"
    # --fm=full: the diagnoser that names the fault: the learned model shipped with fm
    # (`fm/artifacts/diagnoser.json`) or the readable rules.
    fm_diagnoser: str = "learned"
    # Write trajectories.jsonl: one line a step with per-completion arrays (FaultBench).
    record_trajectories: bool = False
    # Device mesh (`rftjax.parallel`): "" one device; "auto" all devices on data; or
    # "data:2,fsdp:4[,tensor:2]".
    mesh: str = ""
    # Folder of the warm-up cache ("": workdir/warmup); runs may share one (a campaign does).
    warmup_cache: str = ""
    # Write TensorBoard events beside metrics.jsonl (campaigns turn them off: they cost
    # ~12 ms a step of host time for ~120 scalars and nobody reads them there).
    tensorboard: bool = True

    @property
    def model_seed(self) -> int:
        """The seed of the model's initialization and warm-up."""
        return self.seed if self.init_seed is None else self.init_seed

    def __post_init__(self):
        from rftjax.tasks import ANSWER_FORMATS, CHAT_TEMPLATE_MODES

        if not self.workdir:
            raise ValueError("workdir must be given (the folder for checkpoints and logs)")
        if self.warmup_steps is None:
            steps = 0 if os.path.isdir(self.model) else DEFAULT_WARMUP_STEPS
            object.__setattr__(self, "warmup_steps", steps)
        _check_choice("chat_template", self.chat_template, CHAT_TEMPLATE_MODES)
        _check_choice("answer_format", self.answer_format, ANSWER_FORMATS)
        _check_choice("fm", self.fm, FM_MODES)
        _check_choice("fm_policy", self.fm_policy, FM_POLICIES)
        _check_choice("fm_diagnoser", self.fm_diagnoser, FM_DIAGNOSERS)
        _check_positive(
            self,
            "eval_every",
            "eval_size",
            "checkpoint_every",
            "fm_window",
            "keep_checkpoints",
            "log_every",
            "warmup_batch_size",
        )
        if self.steps < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"steps and warmup_steps must be >= 0, got {self.steps}, {self.warmup_steps}"
            )
        if self.mesh:
            from rftjax.parallel import parse_mesh

            parse_mesh(self.mesh, None)  # names a bad axis or syntax; devices are counted later
        if self.rl.algo == "grpo" and float(self.knobs.get("temperature", 1.0)) <= 0:
            raise ValueError(
                f"--temperature={self.knobs['temperature']} with GRPO: greedy sampling gives "
                "every completion of a group the same answer, so every group's rewards are "
                "equal and its advantages zero (no learning signal); use a temperature > 0 "
                "(default 1.0), or --algo=ppo, whose critic gives a baseline"
            )
        if self.fork_from and self.fault == "none":
            raise ValueError("fork_from needs a fault: a clean run has nothing to fork for")
        if self.fault != "none":
            faults.check(  # names a bad type, variant, severity or onset
                self.fault,
                onset=self.fault_onset,
                severity=self.fault_severity,
                variant=self.fault_variant or None,
                magnitude=self.fault_magnitude,
            )
            if self.fault_onset > self.steps:
                raise ValueError(
                    f"--fault_onset={self.fault_onset} is after the last step ({self.steps}): "
                    "the fault would never be active"
                )

    def task_options(self) -> dict[str, Any]:
        """Keyword arguments of `rftjax.tasks.make_task` that this config sets."""
        return {
            "chat_template": self.chat_template,
            "prompt_field": self.prompt_field,
            "answer_field": self.answer_field,
            "answer_format": self.answer_format,
        }

    def fault_params(self):
        """The injection's runtime parameters (`faults.FaultParams`); None for no fault."""
        if self.fault == "none":
            return None
        return faults.params_for(
            self.fault,
            onset=self.fault_onset,
            duration=self.fault_duration,
            severity=self.fault_severity,
            variant=self.fault_variant or None,
            magnitude=self.fault_magnitude,
            seed=self.seed,
        )

    def fault_record(self) -> dict[str, Any] | str:
        """The fault as summary.json records it."""
        if self.fault == "none":
            return "none"
        spec = faults.spec(self.fault)
        variant = spec.variants[faults.variant_index(self.fault, self.fault_variant or None)]
        custom = self.fault_magnitude is not None
        magnitude = (
            self.fault_magnitude
            if custom
            else faults.magnitude_of(self.fault, self.fault_severity, variant)
        )
        return {
            "type": self.fault,
            "variant": variant,
            "severity": "custom" if custom else self.fault_severity,
            "magnitude": magnitude,
            "onset": self.fault_onset,
            "duration": self.fault_duration,
        }

"""Run configuration: frozen, keyword-only dataclasses that validate and say what was wrong.

`RLConfig` holds what shapes the compiled step (changing it recompiles); runtime settings
that must never recompile are knobs (`rftjax.knobs`). `TrainConfig` holds the outer loop.

Each field is declared once, with `setting(...)`: its default, its help text and command-line
group, and its role. The command-line flags, the `--help` groups, the record a checkpoint keeps
(and the resume and fork checks on it), the warm-up cache's fingerprint and the settings a
campaign spec may change are all derived from these declarations (`settings()`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import faults
from rftjax.settings import (  # noqa: F401 - re-exported: the settings' vocabulary
    ALGO,
    FAULTS,
    FM,
    FORK_FREE,
    HOW,
    IDENTITY,
    MESH,
    MODEL,
    ROLES,
    RUN,
    RUNNER,
    SPEC,
    names,
    setting,
    settings,
)

ALGOS = ("grpo", "ppo")
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")
FM_MODES = ("off", "detect", "full")
FM_POLICIES = ("fm", "random", "rollback_skip", "rollback_lr")  # = fm.remediate.PLANNERS
FM_DIAGNOSERS = ("learned", "rules")
REMAT_MODES = ("none", "layer")  # = rftjax.models.transformer.REMAT_MODES
DEFAULT_WARMUP_STEPS = 300  # supervised warm-up of a preset (random) model; none for checkpoints


def task_options(values: Any) -> dict[str, Any]:
    """The settings declared `task_option` (`rftjax.tasks.make_task` keywords beside the task's
    name) of anything that holds them as attributes: a config, parsed flags."""
    return {name: getattr(values, name) for name in names(TrainConfig, task_option=True)}


def _check_choice(name: str, value: Any, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {', '.join(accepted)}")


def _check_choices(obj: Any) -> None:
    for f in settings(type(obj)):
        if f.metadata["choices"]:
            _check_choice(f.name, getattr(obj, f.name), f.metadata["choices"])


# `RLConfig.length_buckets` = 0: this many buckets when responses may reach AUTO_BUCKETS_FROM
# tokens (measured in BUILD_NOTES, "Length buckets by default").
AUTO_BUCKETS, AUTO_BUCKETS_FROM = 8, 64


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _check_nonnegative(obj: Any, **zero_means: str) -> None:
    """Each named setting is >= 0; the error says what its 0 means."""
    for name, meaning in zero_means.items():
        value = getattr(obj, name)
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0: {meaning}), got {value}")


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
      num_microbatches: gradient accumulation: each optimizer update's minibatch runs as this
        many micro-batches of whole groups, one at a time (less memory, the same update).
      remat: "layer" recomputes each decoder layer's activations in the learner's backward pass
        instead of keeping them (less memory, about one more forward); "none" keeps them.
      length_buckets: the learner sorts each minibatch's rows by response length into this many
        micro-batches and computes each only up to its longest row (the padding after EOS is
        not computed; one compiled forward and backward per bucket size, ⌈N·i/k⌉); 1 computes
        every row at max_new_tokens; 0 (the default) chooses: see `buckets`.
      logits_chunk: the learner computes the vocabulary logits (and their softmax) this many
        tokens at a time and recomputes them in the backward pass, so a step never holds all
        B·N·V of them (the same values); 0 computes them all at once.
      attention_chunk: the learner's attention runs this many queries at a time and recomputes
        their scores in the backward pass, so a layer never holds the whole [rows, heads,
        queries, keys] score array (the same values); 0 computes them all at once.
    """

    algo: str = setting("grpo", "RL algorithm.", group=ALGO, choices=ALGOS, campaign=SPEC)
    prompts_per_step: int = setting(16, "Unique prompts per RL step.", group=ALGO, campaign=SPEC)
    group_size: int = setting(8, "Completions sampled per prompt.", group=ALGO, campaign=SPEC)
    max_new_tokens: int = setting(
        4,
        "Response slots; 0: the task's own bound.",
        group=MODEL,
        flag_default=0,
        campaign=SPEC,
    )
    num_epochs: int = setting(1, "Passes over each rollout.", group=ALGO, campaign=SPEC)
    num_minibatches: int = setting(1, "Optimizer updates per pass.", group=ALGO, campaign=SPEC)
    loss_agg: str = setting(
        "token_mean", "Loss aggregation.", group=ALGO, choices=AGG_MODES, campaign=SPEC
    )
    normalize_adv_std: bool = setting(
        True, "GRPO: divide by group std (False: Dr. GRPO).", group=ALGO, campaign=SPEC
    )
    kl_kind: str = setting(
        "k3", "KL(π‖π_ref) estimator.", group=ALGO, choices=KL_KINDS, campaign=SPEC
    )
    kl_in_reward: bool = setting(
        False, "PPO: KL penalty in the per-token reward.", group=ALGO, campaign=SPEC
    )
    gamma: float = setting(1.0, "PPO GAE γ.", group=ALGO, campaign=SPEC)
    lam: float = setting(0.95, "PPO GAE λ.", group=ALGO, campaign=SPEC)
    vf_clip: float = setting(0.2, "PPO value clip range.", flag=False, campaign=SPEC)
    whiten_adv: bool = setting(True, "PPO whitens token advantages.", flag=False, campaign=SPEC)
    lr_warmup_steps: int = setting(0, "Linear lr warm-up steps.", flag=False, campaign=SPEC)
    adam_b1: float = setting(0.9, "Adam β1.", flag=False, campaign=SPEC)
    adam_b2: float = setting(0.999, "Adam β2.", flag=False, campaign=SPEC)
    num_microbatches: int = setting(
        1,
        "Micro-batches (of whole groups) per optimizer update: gradient accumulation.",
        group=ALGO,
        role=HOW,
        campaign=SPEC,
    )
    remat: str = setting(
        "none",
        "Learner: recompute each decoder layer in the backward pass (layer) or not (none).",
        group=MODEL,
        role=HOW,
        choices=REMAT_MODES,
        campaign=SPEC,
    )
    length_buckets: int = setting(
        0,
        "Learner: rows sorted by length into this many chunks, each computed up to its "
        f"longest row (1: every row at full length; 0: {AUTO_BUCKETS} when responses may "
        f"reach {AUTO_BUCKETS_FROM} tokens and a minibatch's rows divide by {AUTO_BUCKETS}, "
        "else 1).",
        group=MODEL,
        role=HOW,
        campaign=SPEC,
    )
    logits_chunk: int = setting(
        0,
        "Learner: vocabulary logits computed this many tokens at a time and recomputed in "
        "the backward pass (0: all at once).",
        group=MODEL,
        role=HOW,
        campaign=SPEC,
    )
    attention_chunk: int = setting(
        0,
        "Learner: attention computed this many queries at a time and its scores recomputed "
        "in the backward pass (0: all at once).",
        group=MODEL,
        role=HOW,
        campaign=SPEC,
    )

    def __post_init__(self):
        _check_choices(self)
        _check_positive(
            self,
            "prompts_per_step",
            "group_size",
            "max_new_tokens",
            "num_epochs",
            "num_minibatches",
            "num_microbatches",
        )
        _check_nonnegative(
            self,
            length_buckets="chosen from max_new_tokens",
            logits_chunk="all at once",
            attention_chunk="all at once",
            lr_warmup_steps="no warm-up",
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
        groups_per_minibatch = self.prompts_per_step // self.num_minibatches
        if groups_per_minibatch % self.num_microbatches:
            raise ValueError(
                f"a minibatch holds prompts_per_step / num_minibatches = {groups_per_minibatch} "
                f"groups, not divisible by num_microbatches={self.num_microbatches} (a "
                "micro-batch holds whole groups); accepted: a divisor of "
                f"{groups_per_minibatch}"
            )
        if self.length_buckets > 1 and self.num_microbatches > 1:
            raise ValueError(
                f"length_buckets={self.length_buckets} already runs each minibatch as that many "
                "micro-batches (of rows sorted by length); set num_microbatches=1"
            )
        rows = self.minibatch_rows
        if self.length_buckets and rows % self.length_buckets:
            raise ValueError(
                f"a minibatch holds {rows} rows, not divisible by length_buckets="
                f"{self.length_buckets}; accepted: a divisor of {rows}"
            )
        if self.kl_in_reward and self.algo != "ppo":
            raise ValueError(
                f"kl_in_reward applies to PPO's per-token rewards; algo="
                f"{self.algo!r} puts the KL penalty in the loss (leave it False)"
            )
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def updates_per_step(self) -> int:
        return self.num_epochs * self.num_minibatches

    @property
    def minibatch_rows(self) -> int:
        """Rows an optimizer update sees: prompts_per_step / num_minibatches whole groups."""
        return self.prompts_per_step // self.num_minibatches * self.group_size

    @property
    def buckets(self) -> int:
        """The learner's length buckets: `length_buckets`, or with 0 the choice for this shape:
        `AUTO_BUCKETS` when responses may reach `AUTO_BUCKETS_FROM` tokens, a minibatch's rows
        divide by it and there is one micro-batch; else 1 (short responses leave nothing to
        skip worth another compiled forward and backward per bucket)."""
        if self.length_buckets:
            return self.length_buckets
        if (
            self.max_new_tokens >= AUTO_BUCKETS_FROM
            and self.num_microbatches == 1
            and self.minibatch_rows % AUTO_BUCKETS == 0
        ):
            return AUTO_BUCKETS
        return 1


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

    workdir: str = setting(
        "", "Folder for checkpoints, logs and summary.json.", group=RUN, role=HOW, flag="entry"
    )
    steps: int = setting(1500, "RL steps.", group=RUN, role=HOW, flag="entry", campaign=SPEC)
    resume: bool = setting(
        False,
        "Continue the run in --workdir from its latest checkpoint.",
        group=RUN,
        role=HOW,
        flag="entry",
    )
    seed: int = setting(0, "Seed of model init, data and sampling.", group=RUN)
    eval_every: int = setting(
        100, "Greedy held-out evaluation period (steps).", group=RUN, campaign=SPEC
    )
    eval_size: int = setting(512, "Held-out prompts evaluated.", group=RUN, campaign=SPEC)
    checkpoint_every: int = setting(100, "Checkpoint period (steps).", group=RUN, campaign=SPEC)
    keep_checkpoints: int = setting(
        3,
        "Most recent checkpoints kept (plus pinned).",
        group=RUN,
        role=FORK_FREE,
        campaign=SPEC,
    )
    log_every: int = setting(
        100, "Progress line period (steps).", group=RUN, role=FORK_FREE, campaign=SPEC
    )
    model: str = setting(
        "tiny",
        "Preset name (tiny, tiny-qwen2, small) or a local Hugging Face checkpoint folder "
        "(Llama / Qwen2: config.json, safetensors, tokenizer files).",
        group=MODEL,
        campaign=SPEC,
        fingerprint="model",
    )
    model_overrides: str = setting(
        "",
        "Comma-separated ModelConfig overrides, e.g. num_layers=2,hidden_size=128",
        group=MODEL,
        campaign=SPEC,
        fingerprint="model_overrides",
    )
    task: str = setting(
        "arith",
        "arith | sort | calc (tool use) | jsonl:/path/to/file.jsonl | "
        "parquet:/path/to/file_or_folder.parquet",
        group=MODEL,
        campaign=SPEC,
        fingerprint="task",
    )
    prompt_field: str = setting(
        "prompt", "File tasks: the field holding the prompt.", group=MODEL, task_option=True
    )
    answer_field: str = setting(
        "answer", "File tasks: the field holding the answer.", group=MODEL, task_option=True
    )
    answer_format: str = setting(
        "auto",
        "File tasks: answer verification: gsm8k (final number, '#### 42'), math (\\boxed{}), "
        "or auto (gsm8k if every reference answer is a number or ends in '#### N').",
        group=MODEL,
        task_option=True,
    )
    chat_template: str = setting(
        "auto",
        "auto: render prompts through the tokenizer's chat template when it has one; none.",
        group=MODEL,
        task_option=True,
    )
    tfds_data_dir: str | None = setting(
        None,
        "--task=tfds:NAME[/CONFIG][:SPLIT]: the folder of prepared TensorFlow Datasets "
        "(array_record; nothing is downloaded). Default: $TFDS_DATA_DIR, else "
        "~/tensorflow_datasets.",
        group=MODEL,
        role=HOW,
        task_option=True,
    )
    # Seed of the model's initialization and warm-up (None: `seed`). Runs that share it start
    # RL from one warmed-up checkpoint, as fine-tuning runs share a starting checkpoint; `seed`
    # still sets the RL data and sampling. (The fingerprint holds `model_seed`.)
    init_seed: int | None = setting(
        None, "Seed of model init and warm-up.", flag=False, campaign=SPEC, fingerprint="seed"
    )
    warmup_steps: int | None = setting(
        None,
        "Supervised warm-up steps before RL (0: none). Default: 300 for a preset model, 0 for "
        "a Hugging Face checkpoint folder.",
        group=MODEL,
        campaign=SPEC,
        fingerprint="steps",
    )
    warmup_batch_size: int = setting(
        128, "Warm-up batch size.", group=MODEL, campaign=SPEC, fingerprint="batch"
    )
    warmup_lr: float = setting(
        1e-3, "Warm-up learning rate.", group=MODEL, campaign=SPEC, fingerprint="lr"
    )
    # Folder of the warm-up cache ("": workdir/warmup); runs may share one (a campaign does).
    warmup_cache: str = setting("", "Warm-up cache folder.", role=HOW, flag=False)
    rl: RLConfig = setting(default_factory=RLConfig, flag=False)
    # The knobs' initial values (`rftjax.knobs.make_knobs` keywords; their flags are defined
    # from `rftjax.knobs.KNOB_FLAGS`).
    knobs: dict = setting(default_factory=dict, flag=False, campaign=SPEC)
    fault: str = setting(
        "none",
        "Fault type id, 'none', or 'list' to print the catalog.",
        group=FAULTS,
        role=FORK_FREE,
    )
    fault_severity: str = setting(
        "moderate",
        "Preset strength of the fault.",
        group=FAULTS,
        role=FORK_FREE,
        choices=faults.SEVERITIES,
    )
    fault_variant: str = setting(
        "", "Variant of the fault type (default: its first).", group=FAULTS, role=FORK_FREE
    )
    fault_magnitude: float | None = setting(
        None, "Explicit strength; overrides --fault_severity.", group=FAULTS, role=FORK_FREE
    )
    fault_onset: int = setting(
        1,
        "First RL step with the fault active; -1: just after a third of --steps.",
        group=FAULTS,
        role=FORK_FREE,
        flag_default=-1,
    )
    fault_duration: int = setting(
        -1, "Steps the fault lasts; <= 0: to the end.", group=FAULTS, role=FORK_FREE
    )
    # Start from another run's checkpoint just before the fault's onset (that run: the same
    # configuration without the fault). Its records up to there are this run's: a fault is
    # the identity before onset, bit for bit.
    fork_from: str = setting("", "Clean twin to fork from.", role=FORK_FREE, flag=False)
    fm: str = setting(
        "off",
        "Failure management: off, detect (in-step statistics and alarms), full (also "
        "diagnosis, rollback to a healthy checkpoint, remedies, verification, halt).",
        group=FM,
        choices=FM_MODES,
        campaign=RUNNER,
    )
    fm_window: int = setting(
        20,
        "--fm=full: alarm-free steps that make a checkpoint healthy and an attempt verified.",
        group=FM,
        campaign=SPEC,
    )
    fm_policy: str = setting(
        "fm",
        "--fm=full: who plans the remedies: fm (from its diagnosis), or a baseline: random "
        "(3 random remedies), rollback_skip (rollback + skip the data window, 3 times), "
        "rollback_lr (rollback + lr x 0.5, 3 times).",
        group=FM,
        choices=FM_POLICIES,
        campaign=RUNNER,
    )
    fm_diagnoser: str = setting(
        "learned",
        "--fm=full: the diagnoser: learned (the model shipped in fm/artifacts) or rules.",
        group=FM,
        choices=FM_DIAGNOSERS,
    )
    fm_strict: bool = setting(
        False,
        "--fm=full: an exception inside fm (diagnoser, remediator) ends the run; by default it "
        "is logged to events.jsonl and training goes on without management.",
        group=FM,
        role=HOW,
    )
    # Write trajectories.jsonl: one line a step with per-completion arrays (FaultBench).
    record_trajectories: bool = setting(
        False, "Write trajectories.jsonl.", flag=False, campaign=RUNNER
    )
    mesh: str = setting(
        "",
        "Device mesh over the axes data, fsdp, tensor, e.g. data:2,fsdp:4 or data:2,tensor:4 "
        "(one size may be -1: the rest); 'auto': every device on data. Default: one device "
        "(with --multihost: auto).",
        group=MESH,
        role=HOW,
    )
    # Write TensorBoard events beside metrics.jsonl (campaigns turn them off: they cost
    # ~12 ms a step of host time for ~120 scalars and nobody reads them there).
    tensorboard: bool = setting(True, "Write TensorBoard events.", role=HOW, flag=False)

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
        _check_choices(self)
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
        return task_options(self)

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

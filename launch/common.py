"""Flags shared by the entry points (train, bench) and their translation into configs."""

from __future__ import annotations

import os

from absl import flags

from faults import SEVERITIES
from rftjax.config import (
    AGG_MODES,
    ALGOS,
    FM_DIAGNOSERS,
    FM_MODES,
    FM_POLICIES,
    KL_KINDS,
    RLConfig,
    TrainConfig,
)


def define_run_flags() -> None:
    """Model, task, algorithm and knob flags: what a user tunes every day."""
    flags.DEFINE_string(
        "task",
        "arith",
        "arith | sort | calc (tool use) | jsonl:/path/to/file.jsonl | "
        "parquet:/path/to/file_or_folder.parquet",
    )
    flags.DEFINE_string("prompt_field", "prompt", "File tasks: the field holding the prompt.")
    flags.DEFINE_string("answer_field", "answer", "File tasks: the field holding the answer.")
    flags.DEFINE_string(
        "answer_format",
        "auto",
        "File tasks: answer verification: gsm8k (final number, '#### 42'), math (\\boxed{}), "
        "or auto (gsm8k if every reference answer is a number or ends in '#### N').",
    )
    flags.DEFINE_string(
        "chat_template",
        "auto",
        "auto: render prompts through the tokenizer's chat template when it has one; none.",
    )
    flags.DEFINE_enum("algo", "grpo", ALGOS, "RL algorithm.")
    flags.DEFINE_string(
        "model",
        "tiny",
        "Preset name (tiny, tiny-qwen2, small) or a local Hugging Face checkpoint folder "
        "(Llama / Qwen2: config.json, safetensors, tokenizer files).",
    )
    flags.DEFINE_string(
        "model_overrides",
        "",
        "Comma-separated ModelConfig overrides, e.g. num_layers=2,hidden_size=128",
    )
    flags.DEFINE_integer("seed", 0, "Seed of model init, data and sampling.")
    flags.DEFINE_string("fault", "none", "Fault type id, 'none', or 'list' to print the catalog.")
    flags.DEFINE_enum("fault_severity", "moderate", SEVERITIES, "Preset strength of the fault.")
    flags.DEFINE_string("fault_variant", "", "Variant of the fault type (default: its first).")
    flags.DEFINE_float("fault_magnitude", None, "Explicit strength; overrides --fault_severity.")
    flags.DEFINE_integer(
        "fault_onset", -1, "First RL step with the fault active; -1: just after a third of --steps."
    )
    flags.DEFINE_integer("fault_duration", -1, "Steps the fault lasts; <= 0: to the end.")
    flags.DEFINE_enum(
        "fm",
        "off",
        FM_MODES,
        "Failure management: off, detect (in-step statistics and alarms), full (also "
        "diagnosis, rollback to a healthy checkpoint, remedies, verification, halt).",
    )
    flags.DEFINE_integer(
        "fm_window",
        20,
        "--fm=full: alarm-free steps that make a checkpoint healthy and an attempt verified.",
    )
    flags.DEFINE_enum(
        "fm_policy",
        "fm",
        FM_POLICIES,
        "--fm=full: who plans the remedies: fm (from its diagnosis), or a baseline: random "
        "(3 random remedies), rollback_skip (rollback + skip the data window, 3 times), "
        "rollback_lr (rollback + lr x 0.5, 3 times).",
    )
    flags.DEFINE_enum(
        "fm_diagnoser",
        "learned",
        FM_DIAGNOSERS,
        "--fm=full: the diagnoser: learned (the model shipped in fm/artifacts) or rules.",
    )
    flags.DEFINE_bool(
        "fm_strict",
        False,
        "--fm=full: an exception inside fm (diagnoser, remediator) ends the run; by default it "
        "is logged to events.jsonl and training goes on without management.",
    )
    flags.DEFINE_string(
        "mesh",
        "",
        "Device mesh over the axes data, fsdp, tensor, e.g. data:2,fsdp:4 or data:2,tensor:4 "
        "(one size may be -1: the rest); 'auto': every device on data. Default: one device "
        "(with --multihost: auto).",
    )
    flags.DEFINE_bool(
        "multihost",
        False,
        "Run as one process of a multi-host job: jax.distributed.initialize with the "
        "--coordinator_address/--num_processes/--process_id flags, or, when those are unset, "
        "the cluster's environment (TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS...).",
    )
    flags.DEFINE_string("coordinator_address", "", "--multihost: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "--multihost: number of processes.")
    flags.DEFINE_integer("process_id", None, "--multihost: this process's index.")
    flags.DEFINE_integer("prompts_per_step", 16, "Unique prompts per RL step.")
    flags.DEFINE_integer("group_size", 8, "Completions sampled per prompt.")
    flags.DEFINE_integer("max_new_tokens", 0, "Response slots; 0: the task's own bound.")
    flags.DEFINE_integer("num_epochs", 1, "Passes over each rollout.")
    flags.DEFINE_integer("num_minibatches", 1, "Optimizer updates per pass.")
    flags.DEFINE_enum("loss_agg", "token_mean", AGG_MODES, "Loss aggregation.")
    flags.DEFINE_enum("kl_kind", "k3", KL_KINDS, "KL(π‖π_ref) estimator.")
    flags.DEFINE_bool("normalize_adv_std", True, "GRPO: divide by group std (False: Dr. GRPO).")
    flags.DEFINE_bool("kl_in_reward", False, "PPO: KL penalty in the per-token reward.")
    flags.DEFINE_float("gamma", 1.0, "PPO GAE γ.")
    flags.DEFINE_float("lam", 0.95, "PPO GAE λ.")
    flags.DEFINE_float("lr", 1e-4, "Learning rate of RL.")
    flags.DEFINE_float("grad_clip", 1.0, "Global-norm gradient clip (<= 0: off).")
    flags.DEFINE_float("kl_coef", 0.04, "KL-to-reference coefficient β.")
    flags.DEFINE_float("ent_coef", 0.0, "Entropy bonus coefficient.")
    flags.DEFINE_float("eps_low", 0.2, "Clip ε below 1.")
    flags.DEFINE_float("eps_high", 0.28, "Clip ε above 1 (clip-higher).")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
    flags.DEFINE_integer("top_k", 0, "Top-k sampling (0: off).")
    flags.DEFINE_float("vf_coef", 0.1, "PPO value-loss coefficient.")
    flags.DEFINE_integer(
        "warmup_steps",
        None,
        "Supervised warm-up steps before RL (0: none). Default: 300 for a preset model, 0 for "
        "a Hugging Face checkpoint folder.",
    )
    flags.DEFINE_integer("warmup_batch_size", 128, "Warm-up batch size.")
    flags.DEFINE_float("warmup_lr", 1e-3, "Warm-up learning rate.")
    flags.DEFINE_integer("eval_every", 100, "Greedy held-out evaluation period (steps).")
    flags.DEFINE_integer("eval_size", 512, "Held-out prompts evaluated.")
    flags.DEFINE_integer("checkpoint_every", 100, "Checkpoint period (steps).")
    flags.DEFINE_integer("keep_checkpoints", 3, "Most recent checkpoints kept (plus pinned).")
    flags.DEFINE_integer("log_every", 100, "Progress line period (steps).")


# The main flags of `launch.train --help`, grouped; absl's own and the rest stay in --helpfull.
HELP_GROUPS = {
    "run": (
        "workdir", "steps", "resume", "seed", "eval_every", "eval_size", "checkpoint_every",
        "keep_checkpoints", "log_every",
    ),
    "model & task": (
        "model", "model_overrides", "task", "prompt_field", "answer_field", "answer_format",
        "chat_template", "max_new_tokens", "warmup_steps", "warmup_batch_size", "warmup_lr",
    ),
    "algorithm": (
        "algo", "prompts_per_step", "group_size", "num_epochs", "num_minibatches", "loss_agg",
        "kl_kind", "normalize_adv_std", "kl_in_reward", "gamma", "lam", "lr", "grad_clip",
        "kl_coef", "ent_coef", "eps_low", "eps_high", "temperature", "top_p", "top_k", "vf_coef",
    ),
    "faults": (
        "fault", "fault_severity", "fault_variant", "fault_magnitude", "fault_onset",
        "fault_duration",
    ),
    "fm (failure management)": ("fm", "fm_window", "fm_policy", "fm_diagnoser", "fm_strict"),
    "mesh": ("mesh", "multihost", "coordinator_address", "num_processes", "process_id"),
}  # fmt: skip


def grouped_help(usage: str, groups=HELP_GROUPS) -> str:
    """Help text of the flags in `groups` (name: default, then the help), group by group."""
    lines = [usage, ""]
    for group, names in groups.items():
        lines.append(f"{group}:")
        for name in names:
            flag = flags.FLAGS[name]
            value = flag.default
            shown = repr(value) if isinstance(value, str) else value
            default = "" if value is None else f" (default: {shown})"
            lines.append(f"  --{name}{default}")
            lines.append(f"      {flag.help}")
        lines.append("")
    lines.append("--flagfile=FILE reads flags from a file; --helpfull lists every flag.")
    return "\n".join(lines)


def help_requested(argv) -> bool:
    """Whether the command line asks for --help (absl's own -h / --help / -?)."""
    return any(a in ("-h", "--help", "-?", "--help=true") for a in argv[1:])


# --- tfds: tasks (one block) ------------------------------------------------------------------
# The data folder reaches `rftjax.tasks.TfdsTask` (and campaign worker processes) as
# TFDS_DATA_DIR, tensorflow-datasets' own variable, so the run configs need no new field.
flags.DEFINE_string(
    "tfds_data_dir",
    None,
    "--task=tfds:NAME[/CONFIG][:SPLIT]: the folder of prepared TensorFlow Datasets "
    "(array_record; nothing is downloaded). Default: $TFDS_DATA_DIR, else ~/tensorflow_datasets.",
)
HELP_GROUPS["model & task"] += ("tfds_data_dir",)


def export_tfds_data_dir(values) -> None:
    """Sets TFDS_DATA_DIR from --tfds_data_dir, when given."""
    if getattr(values, "tfds_data_dir", None):
        os.environ["TFDS_DATA_DIR"] = os.path.abspath(os.path.expanduser(values.tfds_data_dir))


# --- end of the tfds: block --------------------------------------------------------------------


def task_options(values) -> dict:
    """File-task options of the flags (`rftjax.tasks.make_task` keyword arguments)."""
    export_tfds_data_dir(values)
    names = ("chat_template", "prompt_field", "answer_field", "answer_format")
    return {name: getattr(values, name) for name in names}


def max_new_tokens(values) -> int:
    if values.max_new_tokens:
        return values.max_new_tokens
    from rftjax.models.hf import load_tokenizer
    from rftjax.tasks import make_task

    tokenizer = load_tokenizer(values.model) if os.path.isdir(values.model) else None
    task = make_task(values.task, seed=values.seed, tokenizer=tokenizer, **task_options(values))
    return task.max_new_tokens_hint


def rl_config(values) -> RLConfig:
    return RLConfig(
        algo=values.algo,
        prompts_per_step=values.prompts_per_step,
        group_size=values.group_size,
        max_new_tokens=max_new_tokens(values),
        num_epochs=values.num_epochs,
        num_minibatches=values.num_minibatches,
        loss_agg=values.loss_agg,
        normalize_adv_std=values.normalize_adv_std,
        kl_kind=values.kl_kind,
        kl_in_reward=values.kl_in_reward,
        gamma=values.gamma,
        lam=values.lam,
    )


def knob_values(values) -> dict:
    names = (
        "lr",
        "grad_clip",
        "kl_coef",
        "ent_coef",
        "eps_low",
        "eps_high",
        "temperature",
        "top_p",
        "top_k",
        "vf_coef",
    )
    return {name: getattr(values, name) for name in names}


def init_multihost(values) -> None:
    """With --multihost, joins the job (`jax.distributed.initialize`) once, before jax starts."""
    import jax

    from rftjax import parallel

    if getattr(values, "multihost", False) and not jax.distributed.is_initialized():
        parallel.initialize_distributed(
            values.coordinator_address, values.num_processes, values.process_id
        )


def train_config(values, *, workdir: str, steps: int, resume: bool) -> TrainConfig:
    from rftjax.knobs import make_knobs

    init_multihost(values)  # first: nothing below may start the jax backend before it
    knobs = knob_values(values)
    make_knobs(**knobs)  # validates before any work starts
    return TrainConfig(
        workdir=workdir,
        task=values.task,
        model=values.model,
        model_overrides=values.model_overrides,
        **task_options(values),
        steps=steps,
        seed=values.seed,
        rl=rl_config(values),
        knobs=knobs,
        warmup_steps=values.warmup_steps,
        warmup_batch_size=values.warmup_batch_size,
        warmup_lr=values.warmup_lr,
        eval_every=values.eval_every,
        eval_size=values.eval_size,
        checkpoint_every=values.checkpoint_every,
        keep_checkpoints=values.keep_checkpoints,
        log_every=values.log_every,
        resume=resume,
        fm=values.fm,
        fm_window=values.fm_window,
        fm_strict=values.fm_strict,
        fm_policy=values.fm_policy,
        fm_diagnoser=values.fm_diagnoser,
        fault=values.fault,
        fault_severity=values.fault_severity,
        fault_variant=values.fault_variant,
        fault_magnitude=values.fault_magnitude,
        fault_onset=values.fault_onset if values.fault_onset >= 0 else steps // 3 + 1,
        fault_duration=values.fault_duration,
        mesh=values.mesh or ("auto" if getattr(values, "multihost", False) else ""),
    )


class _DropLibraryInfo:
    """absl-handler filter: hide the INFO chatter of Orbax (it logs every save) and of jax's
    backend probe (a missing TPU runtime on every CPU start), but keep their warnings."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(
            name in record.pathname for name in ("orbax", "xla_bridge")
        )


def quiet_libraries() -> None:
    from absl import logging

    logging.get_absl_handler().addFilter(_DropLibraryInfo())

"""Flags shared by the entry points (train, bench) and their translation into configs."""

from __future__ import annotations

import os

from absl import flags

from rftjax import config
from rftjax.config import RLConfig, TrainConfig
from rftjax.knobs import KNOB_FLAGS, knob_defaults

# Flags of the launchers themselves (not settings of a run), by help group.
_LAUNCH_FLAGS = {
    "multihost": (
        config.MESH,
        False,
        "Run as one process of a multi-host job: jax.distributed.initialize with the "
        "--coordinator_address/--num_processes/--process_id flags, or, when those are unset, "
        "the cluster's environment (TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS...).",
    ),
    "coordinator_address": (config.MESH, "", "--multihost: host:port of process 0."),
    "num_processes": (config.MESH, None, "--multihost: number of processes."),
    "process_id": (config.MESH, None, "--multihost: this process's index."),
}


def _run_settings():
    """(name, declared field) of every setting that is a flag, in declaration order."""
    for cls in (TrainConfig, RLConfig):
        for f in config.settings(cls):
            if f.metadata["flag"]:
                yield f.name, f


def _define(name: str, default, help_text: str, kind: str, choices=None) -> None:
    """One absl flag of a setting's type (`kind`: the field's annotation)."""
    if choices:
        flags.DEFINE_enum(name, default, choices, help_text)
    elif kind == "bool":
        flags.DEFINE_bool(name, default, help_text)
    elif kind.startswith("int"):
        flags.DEFINE_integer(name, default, help_text)
    elif kind.startswith("float"):
        flags.DEFINE_float(name, default, help_text)
    else:
        flags.DEFINE_string(name, default, help_text)


def define_run_flags() -> None:
    """The flags of every run setting declared in `rftjax.config` (those the entry point
    defines itself aside: workdir, steps, resume), of the knobs, and of multi-host jobs."""
    for name, f in _run_settings():
        if f.metadata["flag"] is True:
            meta = f.metadata
            _define(name, meta["flag_default"], meta["help"], str(f.type), meta["choices"])
    defaults = knob_defaults()
    for name, help_text in KNOB_FLAGS.items():
        _define(name, defaults[name], help_text, type(defaults[name]).__name__)
    for name, (_, default, help_text) in _LAUNCH_FLAGS.items():
        kind = "bool" if isinstance(default, bool) else "int" if default is None else "str"
        _define(name, default, help_text, kind)


def define_entry_flags(*names: str) -> None:
    """Flags of settings each entry point defines itself (e.g. workdir, steps, resume)."""
    fields = {f.name: f for f in config.settings(TrainConfig)}
    for name in names:
        f = fields[name]
        default = f.metadata["flag_default"] or None if f.type == "str" else f.default
        _define(name, default, f.metadata["help"], str(f.type))


def _help_groups() -> dict[str, tuple[str, ...]]:
    """The main flags of `launch.train --help`, grouped; absl's own and the rest stay in
    --helpfull."""
    groups: dict[str, list[str]] = {}
    for name, f in _run_settings():
        if f.metadata["group"]:
            groups.setdefault(f.metadata["group"], []).append(name)
    groups[config.ALGO] += list(KNOB_FLAGS)
    for name, (group, _, _) in _LAUNCH_FLAGS.items():
        groups[group].append(name)
    order = (config.RUN, config.MODEL, config.ALGO, config.FAULTS, config.FM, config.MESH)
    return {g: tuple(groups[g]) for g in order}


HELP_GROUPS = _help_groups()


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


def task_options(values) -> dict:
    """File-task options of the flags (`rftjax.tasks.make_task` keyword arguments)."""
    return config.task_options(values)


def max_new_tokens(values) -> int:
    if values.max_new_tokens:
        return values.max_new_tokens
    from rftjax.models.hf import load_tokenizer
    from rftjax.tasks import response_slots

    tokenizer = load_tokenizer(values.model) if os.path.isdir(values.model) else None
    return response_slots(values.task, tokenizer=tokenizer, **task_options(values))


def _flag_values(values, cls) -> dict:
    """The settings of `cls` that are flags of every entry point, as the flags hold them."""
    return {
        f.name: getattr(values, f.name) for f in config.settings(cls) if f.metadata["flag"] is True
    }


def rl_config(values) -> RLConfig:
    return RLConfig(**{**_flag_values(values, RLConfig), "max_new_tokens": max_new_tokens(values)})


def knob_values(values) -> dict:
    return {name: getattr(values, name) for name in KNOB_FLAGS}


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
    settings = _flag_values(values, TrainConfig)
    if values.fault_onset < 0:  # the flag's default: just after a third of the steps
        settings["fault_onset"] = steps // 3 + 1
    if not values.mesh and getattr(values, "multihost", False):
        settings["mesh"] = "auto"
    return TrainConfig(
        **settings,
        workdir=workdir,
        steps=steps,
        resume=resume,
        rl=rl_config(values),
        knobs=knobs,
    )


def quiet_libraries() -> None:
    """Keeps library chatter off absl's console handler (entry points without a `Console`)."""
    from absl import logging

    from rftjax.train.console import LibraryNoise

    logging.get_absl_handler().addFilter(LibraryNoise())

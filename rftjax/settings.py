"""Declared settings: each config field says once what it is (`setting`), and everything that
needs a list of settings (flags, --help groups, the checkpoint record, the resume and fork
checks, the warm-up fingerprint, campaign keys) asks `names` / `settings` instead of keeping
its own list."""

from __future__ import annotations

import dataclasses
from typing import Any

# Groups of `launch.train --help`.
RUN, MODEL, ALGO, FAULTS, FM, MESH = (
    "run",
    "model & task",
    "algorithm",
    "faults",
    "fm (failure management)",
    "mesh",
)
# Roles of a setting in a run's identity:
IDENTITY = "identity"  # recorded in checkpoints: a resume or a fork must match it
FORK_FREE = "fork_free"  # recorded, a resume must match it; a fork of a clean twin may differ
HOW = "how"  # how, not what: not recorded, may change on resume (workdir, mesh, ...)
ROLES = (IDENTITY, FORK_FREE, HOW)
# Who may set a setting in a FaultBench campaign (beside the fault): its spec or its runners.
SPEC, RUNNER = "spec", "runner"


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - the flag's help text
    *,
    group: str | None = None,
    role: str = IDENTITY,
    flag: bool | str = True,
    flag_default: Any = dataclasses.MISSING,
    choices: tuple | None = None,
    campaign: str | None = None,
    fingerprint: str | None = None,
    task_option: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its declaration.

    Args:
      default / default_factory: the dataclass default.
      help: the flag's help text. group: its `--help` group (None: not in --help).
      role: IDENTITY, FORK_FREE or HOW (see above).
      flag: True: a flag of every entry point (`launch.common.define_run_flags`); "entry": each
        entry point defines its own (workdir, steps, resume); False: no flag.
      flag_default: the flag's default where it differs from the field's (a sentinel that the
        entry point resolves, e.g. -1: "a third of --steps").
      choices: the accepted values (an enum flag; checked by the config).
      campaign: SPEC or RUNNER: who may set it in a FaultBench campaign (None: nobody).
      fingerprint: its name in the warm-up cache's fingerprint (None: not part of it).
      task_option: a keyword of `rftjax.tasks.make_task` (configures the task beside its name).
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r}; accepted: {', '.join(ROLES)}")
    meta = {
        "help": help,
        "group": group,
        "role": role,
        "flag": flag,
        "flag_default": default if flag_default is dataclasses.MISSING else flag_default,
        "choices": choices,
        "campaign": campaign,
        "fingerprint": fingerprint,
        "task_option": task_option,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def settings(cls) -> tuple[dataclasses.Field, ...]:
    """The declared fields of a config class, in declaration order."""
    return tuple(f for f in dataclasses.fields(cls) if "role" in f.metadata)


def names(cls, **where: Any) -> tuple[str, ...]:
    """Names of the settings of `cls` whose declaration has every `key=value` of `where`,
    e.g. `names(TrainConfig, role=HOW)`."""
    return tuple(f.name for f in settings(cls) if all(f.metadata[k] == v for k, v in where.items()))

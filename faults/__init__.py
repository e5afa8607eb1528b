"""The fault catalog: one jit-compatible injection per type of the fm taxonomy.

    fault = faults.make("RF1", faults.Setup(group_size=8, max_new_tokens=4))
    params = faults.params_for("RF1", onset=500, severity="severe")

`fault.hooks` are pure functions the trainer calls at its hook points; `params` is a pytree of
arrays, so changing onset, duration, magnitude or variant never recompiles.
"""

from faults.base import (
    HOOK_NAMES,
    NO_HOOKS,
    SEVERITIES,
    Ctx,
    Fault,
    FaultParams,
    Hooks,
    Setup,
    context,
    make_params,
)
from faults.catalog import (
    BLOCKED,
    ONE_TIME,
    REPORTED,
    SPECS,
    acted,
    check,
    listing,
    magnitude_of,
    make,
    params_for,
    spec,
    variant_index,
)

__all__ = [
    "BLOCKED",
    "ONE_TIME",
    "REPORTED",
    "HOOK_NAMES",
    "NO_HOOKS",
    "SEVERITIES",
    "SPECS",
    "acted",
    "check",
    "Ctx",
    "Fault",
    "FaultParams",
    "Hooks",
    "Setup",
    "context",
    "listing",
    "magnitude_of",
    "make",
    "make_params",
    "params_for",
    "spec",
    "variant_index",
]

"""Campaigns of training runs (clean and faulted), FaultBench specs and records.

`runs`: running many runs in worker processes, resumable, faulted runs forked from their
clean twin; the severity table. `spec`: JSON campaign specs, validated and resolved to runs;
the built-in `smoke` and `standard` campaigns. `records`: `generate` and the Parquet tables.
`on_ray`: the Ray executor (each run a Ray task; needs the `ray` extra).
"""

from rftjax.campaign.dataset import assemble, dataset_card, generate
from rftjax.campaign.runs import (
    OVERRIDE_KEYS,
    Run,
    apply_overrides,
    config_of,
    markdown,
    read_summary,
    run_campaign,
    severity_runs,
    severity_table,
    twin_name,
)
from rftjax.campaign.spec import (
    BUILTINS,
    SPLITS,
    TOOL_TYPES,
    Campaign,
    base_config,
    builtin_spec,
    has_tools,
    load_spec,
    plan,
    resolve,
)

__all__ = [
    "BUILTINS",
    "OVERRIDE_KEYS",
    "SPLITS",
    "TOOL_TYPES",
    "Campaign",
    "Run",
    "apply_overrides",
    "assemble",
    "base_config",
    "builtin_spec",
    "config_of",
    "dataset_card",
    "generate",
    "has_tools",
    "load_spec",
    "markdown",
    "plan",
    "read_summary",
    "resolve",
    "run_campaign",
    "severity_runs",
    "severity_table",
    "twin_name",
]

"""The FaultBench record schema: every fixed column of the three tables and what it means.

A FaultBench campaign is three Parquet tables in one folder:

    manifest.parquet      one row a run: its labels and outcome
    steps.parquet         one row a run and RL step: labels, then every metric and statistic
    trajectories.parquet  one row a sampled completion: labels, ids and per-completion numbers

Any trainer can write these (`fm.faultbench.records`), and every scorer in `fm.faultbench` reads
only the columns named here. Steps are 1-based. A clean run has type, family and severity "none",
onset -1, duration 0 and magnitude NaN. `steps.parquet` also holds one float column per metric
the trainer logged (names as in its metrics log: `fm.stats` keys, loss terms, and the in-step
detector's `alarm`, `flag/<signal>`, `score/<signal>`, `cusum/<signal>`); columns a run did not
log at a step (held-out evaluation between evaluation steps) are NaN.
"""

from __future__ import annotations

import json
from typing import NamedTuple


class Column(NamedTuple):
    name: str
    dtype: str  # "string" | "int64" | "int32" | "float64" | "float32"
    meaning: str


CLEAN = "none"  # type, family and severity of a clean run

_LABELS = (
    Column("run_id", "string", "run name, unique in the campaign (also its folder)"),
    Column("split", "string", "train or eval (seeds never shared), or none when unsplit"),
    Column("type", "string", "fault type id (fm.taxonomy), or none for a clean run"),
    Column("family", "string", "fault family (fm.taxonomy.FAMILIES), or none"),
    Column("severity", "string", "subtle | moderate | severe | custom (explicit magnitude) | none"),
)

MANIFEST: tuple[Column, ...] = (
    *_LABELS,
    Column("seed", "int64", "seed of model init, data, sampling and the fault's draws"),
    Column("twin", "string", "run_id of the clean run with the same seed and config"),
    Column("config", "string", "JSON of the run's settings that differ from the trainer default"),
    Column("task", "string", "task name"),
    Column("algo", "string", "RL algorithm (grpo, ppo)"),
    Column("steps", "int64", "RL steps of the run"),
    Column("variant", "string", "fault variant (faults catalog), empty for a clean run"),
    Column("magnitude", "float64", "fault strength in the variant's units; NaN when clean"),
    Column("onset", "int64", "first RL step with the fault active; -1 when clean"),
    Column("duration", "int64", "steps the fault lasts; <= 0: to the end (0 when clean)"),
    Column(
        "first_acted",
        "int64",
        "first step on which the fault changed the computation: the onset, or for variants "
        "that draw their event per step (OD2 nonfinite, RF3 outage) the first drawn step; "
        "-1 when clean or when it never acted (scoring's event onset)",
    ),
    Column("eval_accuracy_initial", "float64", "held-out greedy accuracy before RL"),
    Column("eval_accuracy_final", "float64", "held-out greedy accuracy after the last step"),
    Column("eval_reward_initial", "float64", "held-out mean reward before RL"),
    Column("eval_reward_final", "float64", "held-out mean reward after the last step"),
    Column("steps_completed", "int64", "RL steps the run completed"),
    Column("alarms", "int64", "steps on which the in-step detector raised an alarm"),
    Column("wall_seconds", "float64", "wall time of the run (forked runs: from the fork)"),
)

STEPS: tuple[Column, ...] = (
    *_LABELS,
    Column("seed", "int64", "as in the manifest"),
    Column("step", "int64", "RL step, 1-based"),
    Column("fault_active", "int32", "1 if the fault acted on this step, else 0"),
)

TRAJECTORIES: tuple[Column, ...] = (
    *_LABELS,
    Column("step", "int64", "RL step, 1-based"),
    Column("fault_active", "int32", "1 if the fault acted on this step, else 0"),
    Column(
        "prompt_id",
        "int64",
        "(step - 1) × prompts_per_step + group: the prompt's place in "
        "the run's data stream; equal ids of one seed are the same prompt in every run",
    ),
    Column("group", "int32", "prompt row within the step (GRPO group)"),
    Column("index", "int32", "completion index within its group"),
    Column("reward", "float32", "reward from the task's verifier"),
    Column("score", "float32", "reward the learner saw (after reward faults and guards)"),
    Column("length", "int32", "response tokens"),
    Column("truncated", "int32", "1 if the response hit the token cap without EOS"),
    Column("sampler_logp_sum", "float32", "Σ log-probs of the sampled tokens, sampler"),
    Column("trainer_logp_sum", "float32", "Σ log-probs of the sampled tokens, trainer"),
    Column("ref_logp_sum", "float32", "Σ log-probs of the sampled tokens, reference model"),
    Column("advantage", "float32", "sequence advantage (mean over the loss mask)"),
    Column("is_ratio", "float32", "mean sampler→trainer importance ratio over the tokens"),
    Column("repetition", "float32", "fraction of repeated n-grams in the response"),
    Column("tool_calls", "int32", "tool calls in the completion (0 without tools)"),
    Column("tool_errors", "int32", "tool calls that failed (0 without tools)"),
)

TABLES = {"manifest": MANIFEST, "steps": STEPS, "trajectories": TRAJECTORIES}

# Metric columns that are not inputs of a detector: labels, and the in-step detector's own
# outputs (scoring a baseline on them would score fm's detector again).
DETECTOR_PREFIXES = ("flag/", "score/", "cusum/")
NOT_FEATURES = frozenset({"alarm", "nonfinite", "fault_active", "fault_acted", "step", "seed"})


def names(table: str) -> tuple[str, ...]:
    """Fixed column names of `table` ("manifest", "steps" or "trajectories")."""
    if table not in TABLES:
        raise ValueError(f"unknown FaultBench table {table!r}; accepted: {', '.join(TABLES)}")
    return tuple(c.name for c in TABLES[table])


# Config keys that say how long a run is and how often it logs, evaluates and saves, or which
# initial weights it starts from: not the conditions it trains under.
CADENCE_KEYS = frozenset({"steps", "eval_every", "checkpoint_every", "log_every", "init_seed"})


def condition(config: str) -> str:
    """The training condition a manifest `config` (JSON) names: its settings less
    `CADENCE_KEYS`, as sorted compact JSON; "{}" for the trainer's defaults. Runs of two
    campaigns under the same settings share a condition, whatever their lengths."""
    settings = {k: v for k, v in json.loads(config or "{}").items() if k not in CADENCE_KEYS}
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def is_feature(column: str) -> bool:
    """Whether a steps column is a trainer statistic a detector may read (not a label, not a
    held-out evaluation, not an output of the in-step detector)."""
    fixed = {c.name for c in STEPS}
    return (
        column not in fixed
        and column not in NOT_FEATURES
        and not column.startswith(DETECTOR_PREFIXES)
        and not column.startswith("eval_")
    )


def check_columns(table: str, present: list[str] | tuple[str, ...]) -> None:
    """Raises ValueError naming the fixed columns of `table` missing from `present`."""
    missing = [n for n in names(table) if n not in present]
    if missing:
        raise ValueError(f"{table} records lack columns {missing}; present: {sorted(present)}")


def markdown_table(table: str) -> str:
    """The fixed columns of `table` as a Markdown table (the dataset card uses it)."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{c.name}` | {c.dtype} | {c.meaning} |" for c in TABLES[table]]
    return "\n".join(lines)

"""summary.json: what a run did, from its evaluations, timings and events.jsonl."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from rftjax.config import TrainConfig


class Outcome(NamedTuple):
    """How the RL loop ended."""

    steps_completed: int
    steps_run: int  # by this process (a resumed run counts from its checkpoint)
    initial: dict  # the evaluation before RL
    final: dict  # the last evaluation
    final_step: int | None  # the step it evaluated
    preempted: bool


def summarize(
    cfg: TrainConfig, outcome: Outcome, events: list[dict], seconds: dict[str, float]
) -> dict[str, Any]:
    """The summary. `seconds`: wall, warm-up and RL times of the whole run (over its resumed
    segments) and "rl_segment", this process's RL time: the steps per second are this
    segment's (a speed; replayed and forked steps are not counted twice)."""
    initial, final = outcome.initial, outcome.final
    alarms = [e for e in events if e["event"] == "alarm"]
    # "final" only from an evaluation of the state the run ended with (a preempted run's last
    # evaluation may be older: it is reported as "last", with its step).
    ended_evaluated = outcome.final_step == outcome.steps_completed
    rl = seconds["rl"]
    summary = {
        "eval_accuracy_initial": initial["eval_accuracy"],
        "eval_accuracy_final": final["eval_accuracy"] if ended_evaluated else None,
        "eval_reward_initial": initial["eval_reward"],
        "eval_reward_final": final["eval_reward"] if ended_evaluated else None,
        "eval_accuracy_last": final["eval_accuracy"],
        "eval_last_step": outcome.final_step,
        "steps_completed": outcome.steps_completed,
        "wall_seconds": seconds["wall"],
        "warmup_seconds": seconds["warmup"],
        "rl_seconds": rl,
        "rl_steps_per_second": (
            outcome.steps_run / seconds["rl_segment"] if outcome.steps_run else 0.0
        ),
        "algo": cfg.rl.algo,
        "task": cfg.task,
        "model": cfg.model,
        "fault": cfg.fault_record(),
        "fm": cfg.fm,
        "alarms": [{"step": e["step"], "signals": e["signals"]} for e in alarms],
        **remediation_summary(events),
        # Stopped by SIGTERM / SIGINT after a checkpoint of its last step: --resume goes on.
        "preempted": outcome.preempted,
        "fm_errors": [e for e in events if e["event"] == "fm_error"],
    }
    for name in ("eval_tool_rate", "eval_tool_rate_correct"):  # tool tasks
        if name in final:
            summary[f"{name}_initial"] = initial.get(name)
            summary[f"{name}_final"] = final[name]
    return summary


def remediation_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's record of the closed loop (`--fm=full`), from events.jsonl."""
    of = lambda kind: [e for e in records if e["event"] == kind]  # noqa: E731
    halts = of("halt")
    return {
        "diagnoses": of("diagnosis"),
        "actions": of("action"),
        "verifications": of("verification"),
        "halted": bool(halts),
        "halt_report": halts[-1] if halts else None,
    }


def write(workdir: str, summary: dict[str, Any]) -> None:
    """Atomically: a crash leaves the old summary or the new."""
    path = os.path.join(workdir, "summary.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)

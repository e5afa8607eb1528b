"""FaultBench's closed-loop comparison (`launch.faultbench remediate`).

Each faulted run of a campaign spec is trained once per policy, from scratch (no fork: the
remediator needs its own healthy checkpoints before the onset):

- `none`: the fault with detection only (the no-op remediator; detection does not change
  training, so this is also "fm off");
- `fm`: `--fm=full`, fm's diagnosis and plan;
- `random`, `rollback_skip`, `rollback_lr`: `--fm=full` with a baseline planner (three random
  remedies; rollback + skip the data window, as PaLM did; rollback + lr × 0.5, as OPT did).

Each seed (and setting) also has a clean run under `--fm=full`: its accuracy gives the clean
distribution, and its rollbacks count as false remediations. A run recovers when it was not
halted and its final held-out accuracy is at least the median of the clean runs (same
settings) minus `margin`. That criterion measures seed spread as well as remediation, so each
faulted run is also compared with its own clean twin (same seed, settings, data and steps):
the paired difference (managed final accuracy minus the twin's) with its spread, and recovery
as "not halted and within `margin` of the twin"; halts are counted apart.
A type whose remedies end in "halt" (OD3, TE2) is not remediable unless its variant acts once
(a rollback to before it undoes it: `faults.ONE_TIME`) or the environment reports its failures
(the samples they touch can be masked: `faults.REPORTED`); otherwise the right outcome is a
halt with its diagnosis within `halt_within` steps of onset.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

import faults
from fm import taxonomy
from rftjax.campaign.runs import Run, config_prefix, read_summary
from rftjax.campaign.spec import Campaign

POLICIES = ("none", "fm", "random", "rollback_skip", "rollback_lr")


def _settings(config: str, **extra: Any) -> str:
    values = {**(json.loads(config) if config else {}), **extra}
    return json.dumps(values, sort_keys=True)


def runs_for(campaign: Campaign, policies: Sequence[str] = POLICIES) -> list[Run]:
    """The clean run of each (seed, settings) under --fm=full, then every faulted run once
    per policy; none of them forks."""
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; accepted: {', '.join(POLICIES)}")
    out = []
    for run in campaign.runs:
        if run.clean:
            config = _settings(run.config, fm="full", fm_policy="fm", record_trajectories=False)
            name = f"{config_prefix(run.config)}s{run.seed}/clean"
            out.append(Run(name, run.seed, {}, config, run.split, fork=False))
    for run in campaign.runs:
        if run.clean:
            continue
        for policy in policies:
            managed = {"fm": "full", "fm_policy": policy} if policy != "none" else {}
            config = _settings(run.config, record_trajectories=False, **managed)
            out.append(
                Run(f"{run.name}/{policy}", run.seed, run.fault, config, run.split, fork=False)
            )
    return out


def _policy(run: Run) -> str:
    return "clean" if run.clean else run.name.rsplit("/", 1)[1]


def _base_settings(run: Run) -> str:
    """The run's settings without the policy's: what its clean runs share."""
    values = json.loads(run.config)
    for key in ("fm", "fm_policy", "record_trajectories"):
        values.pop(key, None)
    return json.dumps(values, sort_keys=True)


def outcome(run: Run, summary: dict[str, Any], clean_median: float, *, margin: float,
            halt_within: int) -> dict[str, Any]:  # fmt: skip
    """One run's figures: recovered, rollbacks, wasted (replayed) steps, halt and whether the
    halt was right."""
    actions = summary.get("actions", [])
    wasted = sum(a["step"] - a["restored_to"] for a in actions)
    row = {
        "run": run.name,
        "policy": _policy(run),
        "final": summary["eval_accuracy_final"],
        # A halted run did not finish training: whatever its accuracy then, it did not recover.
        "recovered": not summary.get("halted")
        and summary["eval_accuracy_final"] >= clean_median - margin,
        "rollbacks": len(actions),
        "wasted_steps": wasted,
        "halted": bool(summary.get("halted")),
    }
    if not run.clean:
        type_id = run.fault["fault"]
        variant = run.fault.get("fault_variant") or faults.SPECS[type_id].variants[0]
        remediable = (
            "halt" not in taxonomy.get(type_id).remedies
            or variant in faults.ONE_TIME.get(type_id, ())  # a rollback undoes it
            or variant in faults.REPORTED.get(type_id, ())  # its samples can be masked
        )
        report = summary.get("halt_report") or {}
        onset = run.fault.get("fault_onset", 1)
        right = (
            row["halted"]
            and report.get("diagnosis") == type_id
            and report.get("alarm_step", 1 << 30) - onset <= halt_within
        )
        row.update(type=type_id, remediable=remediable, correct_halt=bool(right))
    return row


def twin_comparison(row: dict[str, Any], twin: float | None, *, margin: float) -> dict:
    """A faulted run's row against its clean twin's final accuracy `twin` (None: the twin did
    not finish): the twin's final, the paired difference (run − twin) and whether it recovered
    (not halted and at most `margin` below the twin)."""
    if twin is None:
        return {"twin_final": None, "paired_difference": None, "recovered_vs_twin": False}
    return {
        "twin_final": twin,
        "paired_difference": row["final"] - twin,
        "recovered_vs_twin": not row["halted"] and row["final"] >= twin - margin,
    }


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Paired differences summarized: runs, mean, median, p10 and p90 (None when empty)."""
    if not values:
        return {"runs": 0, "mean": None, "median": None, "p10": None, "p90": None}
    v = np.asarray(values, np.float64)
    return {
        "runs": int(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
    }


def score(
    out: str, runs: Sequence[Run], *, margin: float = 0.05, halt_within: int = 20
) -> dict[str, Any]:
    """Per policy: recovery rate on remediable faults, rollbacks per faulty run (median),
    wasted steps (mean), halts and correct halts on the others; clean runs with no rollback.
    Against each run's clean twin: recovery (`recovery_vs_twin`, halted runs not recovered) and
    the paired difference of the remediable runs that were not halted (`spread`)."""
    summaries = {r.name: s for r in runs if (s := read_summary(out, r)) is not None}
    clean_finals: dict[str, list[float]] = {}
    twin_final: dict[tuple[str, int], float] = {}  # (settings, seed) → the clean run's final
    for r in runs:
        if r.clean and r.name in summaries:
            final = summaries[r.name]["eval_accuracy_final"]
            clean_finals.setdefault(_base_settings(r), []).append(final)
            twin_final[(_base_settings(r), r.seed)] = final
    rows = []
    for r in runs:
        finals = clean_finals.get(_base_settings(r))
        if r.name not in summaries or not finals:
            continue
        row = outcome(
            r, summaries[r.name], float(np.median(finals)), margin=margin, halt_within=halt_within
        )
        twin = twin_final.get((_base_settings(r), r.seed))
        if not r.clean:
            row.update(twin_comparison(row, twin, margin=margin))
        rows.append(row)
    table = {}
    for policy in ("clean", *POLICIES):
        mine = [x for x in rows if x["policy"] == policy]
        if not mine:
            continue
        if policy == "clean":
            table[policy] = {
                "runs": len(mine),
                "no_rollback": float(np.mean([x["rollbacks"] == 0 for x in mine])),
            }
            continue
        fixable = [x for x in mine if x["remediable"]]
        final = [x for x in mine if not x["remediable"]]
        twinned = [x for x in fixable if x["twin_final"] is not None]
        table[policy] = {
            "runs": len(mine),
            "recovery": float(np.mean([x["recovered"] for x in fixable])) if fixable else None,
            "rollbacks_median": float(np.median([x["rollbacks"] for x in mine])),
            "wasted_steps_mean": float(np.mean([x["wasted_steps"] for x in mine])),
            "halts": sum(x["halted"] for x in mine),
            "halts_on_remediable": sum(x["halted"] for x in fixable),
            "correct_halts": (
                float(np.mean([x["correct_halt"] for x in final])) if final else None
            ),
            "recovery_vs_twin": (
                float(np.mean([x["recovered_vs_twin"] for x in twinned])) if twinned else None
            ),
            "paired_difference": spread(
                [x["paired_difference"] for x in twinned if not x["halted"]]
            ),
        }
    return {"margin": margin, "halt_within": halt_within, "policies": table, "runs": rows}


def markdown(result: dict[str, Any]) -> str:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)
    lines = [
        f"Recovery: final held-out accuracy >= clean median - {result['margin']:.2f}; against "
        f"the twin: not halted and >= the run's own clean twin - {result['margin']:.2f}. The "
        "paired difference (run − twin: median [p10, p90]) is over the remediable runs not "
        f"halted. Halts are correct with the right diagnosis within {result['halt_within']} "
        "steps of onset.",
        "",
        "| policy | runs | recovery (remediable) | rollbacks (median) | wasted steps (mean) | "
        "halts (on remediable) | correct halts (not remediable) | recovery vs twin | "
        "paired difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, t in result["policies"].items():
        if policy == "clean":
            continue
        d = t.get("paired_difference") or {"runs": 0}
        paired = (
            "–"
            if not d["runs"]
            else (f"{d['median']:+.3f} [{d['p10']:+.3f}, {d['p90']:+.3f}] ({d['runs']})")
        )
        lines.append(
            f"| {policy} | {t['runs']} | {fmt(t['recovery'], '.2f')} | "
            f"{t['rollbacks_median']:.1f} | {t['wasted_steps_mean']:.1f} | {t['halts']} "
            f"({t['halts_on_remediable']}) | {fmt(t['correct_halts'], '.2f')} | "
            f"{fmt(t.get('recovery_vs_twin'), '.2f')} | {paired} |"
        )
    if "clean" in result["policies"]:
        c = result["policies"]["clean"]
        lines += ["", f"Clean runs under --fm=full: {c['runs']}, with no rollback: "
                  f"{c['no_rollback']:.2f}."]  # fmt: skip
    return "\n".join(lines)


def run(
    campaign: Campaign,
    out: str,
    policies: Sequence[str] = POLICIES,
    *,
    workers: int = 1,
    ray_options=None,
) -> tuple[dict[str, Any], list[Run]]:
    """`launch.faultbench remediate`: trains every faulted run of `campaign` once per policy
    (and the clean runs) into `out`, one process at a time on the folder (resumable), and
    scores them. Returns (the scores, the runs that failed)."""
    import os

    from rftjax.campaign.dataset import exclusive
    from rftjax.campaign.runs import run_campaign
    from rftjax.campaign.spec import base_config

    runs = runs_for(campaign, policies)
    os.makedirs(out, exist_ok=True)
    with exclusive(out):
        base = base_config(out, campaign.base)
        failed = run_campaign(
            runs, out, base, workers=workers, runs_per_worker=10, ray_options=ray_options
        )
    return score(out, runs), failed

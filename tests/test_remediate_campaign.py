"""`launch.faultbench remediate`: the runs of each policy and their scoring (hand-made
summaries; the closed loop itself is tested end to end in test_train.py)."""

import json
import os

import pytest

from rftjax.campaign import closed_loop as remediate
from rftjax.campaign import resolve
from rftjax.campaign.runs import Run, apply_overrides, config_of
from rftjax.campaign.spec import base_config

SPEC = {
    "name": "r",
    "base": {"steps": 40, "checkpoint_every": 5, "fm_window": 4},
    "runs": [
        {"seed": 0, "type": "CA3", "severity": "severe", "onset": 12},
        {"seed": 1, "type": "CA3", "severity": "severe", "onset": 12},
        {"seed": 0, "type": "OD3", "variant": "reference", "severity": "severe", "onset": 12},
        {"seed": 1, "type": "OD3", "severity": "severe", "onset": 12},  # policy: acts once
    ],
}


def test_every_faulted_run_once_per_policy_from_scratch_and_a_managed_clean_run_per_seed(tmp_path):
    campaign = resolve(SPEC)
    runs = remediate.runs_for(campaign)
    clean = [r for r in runs if r.clean]
    assert [r.name for r in clean] == ["s0/clean", "s1/clean"]
    faulted = [r for r in runs if not r.clean]
    assert len(faulted) == 4 * len(remediate.POLICIES)
    base = base_config(str(tmp_path), campaign.base)
    by_policy = {}
    for run in runs:
        cfg = config_of(base, str(tmp_path), run)
        assert cfg.fork_from == "" and not cfg.record_trajectories and cfg.fm_window == 4
        by_policy[run.name.rsplit("/", 1)[1]] = cfg
    assert by_policy["clean"].fm == "full" and by_policy["none"].fm == "detect"
    for policy in ("fm", "random", "rollback_skip", "rollback_lr"):
        assert by_policy[policy].fm == "full" and by_policy[policy].fm_policy == policy
    with pytest.raises(ValueError, match="unknown policies \\['oracle'\\]"):
        remediate.runs_for(campaign, ["fm", "oracle"])
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\[.fm.\\]"):  # not in specs
        resolve({**SPEC, "base": {"fm": "off"}})
    assert apply_overrides(base, {"fm": "full"}).fm == "full"  # runners may


def _summary(final, actions=(), halt=None):
    return {
        "eval_accuracy_final": final,
        "actions": [{"step": s, "restored_to": r} for s, r in actions],
        "halted": halt is not None,
        "halt_report": halt,
    }


def test_recovery_rollbacks_wasted_steps_and_halts_are_scored_per_policy(tmp_path):
    runs = remediate.runs_for(resolve(SPEC), ["none", "fm"])
    finals = {
        "s0/clean": _summary(0.80),
        "s1/clean": _summary(0.70, actions=[(20, 15)]),  # a false remediation
        # clean median 0.75: recovered from 0.70 up.
        "s0/CA3-severe-o12/none": _summary(0.30),
        "s1/CA3-severe-o12/none": _summary(0.72),
        "s0/CA3-severe-o12/fm": _summary(0.74, actions=[(14, 10)]),
        "s1/CA3-severe-o12/fm": _summary(0.69, actions=[(14, 10), (16, 5)]),
        "s0/OD3-severe-reference-o12/none": _summary(0.10),
        "s0/OD3-severe-reference-o12/fm": _summary(
            0.20, actions=[(14, 10)], halt={"diagnosis": "OD3", "alarm_step": 13}
        ),
        # A one-time weight corruption: a rollback undoes it, so it is remediable.
        "s1/OD3-severe-o12/fm": _summary(0.76, actions=[(14, 10)]),
    }
    for name, summary in finals.items():
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "summary.json", "w") as f:
            json.dump(summary, f)
    result = remediate.score(str(tmp_path), runs, margin=0.05, halt_within=20)
    fm, none = result["policies"]["fm"], result["policies"]["none"]
    # fm: 0.74 and OD3's 0.76 >= 0.70, 0.69 not; none: 0.72 of two.
    assert fm["recovery"] == pytest.approx(2 / 3) and none["recovery"] == 0.5
    assert fm["rollbacks_median"] == 1.0  # of 1, 2, 1 and 1 rollbacks
    assert fm["wasted_steps_mean"] == pytest.approx((4 + 4 + 11 + 4 + 4) / 4)
    assert fm["halts"] == 1 and fm["halts_on_remediable"] == 0 and fm["correct_halts"] == 1.0
    assert none["correct_halts"] == 0.0
    assert result["policies"]["clean"] == {"runs": 2, "no_rollback": 0.5}
    assert "| fm | 4 | 0.67 |" in remediate.markdown(result)
    # A halt ends training: a halted run is not recovered, whatever its accuracy then.
    with open(tmp_path / "s0/CA3-severe-o12/fm/summary.json", "w") as f:
        json.dump(_summary(0.74, actions=[(14, 10)], halt={"diagnosis": "CA3"}), f)
    result = remediate.score(str(tmp_path), runs, margin=0.05, halt_within=20)
    assert result["policies"]["fm"]["recovery"] == pytest.approx(1 / 3)
    assert result["policies"]["fm"]["halts_on_remediable"] == 1


def test_recovery_against_each_runs_own_clean_twin(tmp_path):
    runs = remediate.runs_for(resolve(SPEC), ["none", "fm"])
    finals = {
        "s0/clean": _summary(0.80),
        "s1/clean": _summary(0.70),
        "s0/CA3-severe-o12/none": _summary(0.30),
        "s1/CA3-severe-o12/none": _summary(0.72),
        "s0/CA3-severe-o12/fm": _summary(0.74),  # 0.06 below its twin 0.80: not recovered
        "s1/CA3-severe-o12/fm": _summary(0.69),  # 0.01 below its twin 0.70: recovered
        "s0/OD3-severe-reference-o12/fm": _summary(0.20, halt={"diagnosis": "OD3"}),
        "s1/OD3-severe-o12/fm": _summary(0.76),  # 0.06 above its twin 0.70
        "s1/OD3-severe-o12/none": _summary(0.60, halt={"diagnosis": "OD3"}),  # halted
    }
    for name, summary in finals.items():
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "summary.json", "w") as f:
            json.dump(summary, f)
    result = remediate.score(str(tmp_path), runs, margin=0.05, halt_within=20)
    fm, none = result["policies"]["fm"], result["policies"]["none"]
    # Against the clean median 0.75 the verdicts on the CA3 runs are the other way round.
    assert fm["recovery"] == pytest.approx(2 / 3) and fm["recovery_vs_twin"] == pytest.approx(2 / 3)
    rows = {r["run"]: r for r in result["runs"]}
    assert rows["s0/CA3-severe-o12/fm"]["recovered"] is True
    assert rows["s0/CA3-severe-o12/fm"]["recovered_vs_twin"] is False
    assert rows["s1/CA3-severe-o12/fm"]["recovered"] is False
    assert rows["s1/CA3-severe-o12/fm"]["recovered_vs_twin"] is True
    # fm, remediable and not halted: -0.06, -0.01, +0.06 (the OD3 reference run is neither).
    d = fm["paired_difference"]
    assert d["runs"] == 3 and d["median"] == pytest.approx(-0.01)
    assert d["mean"] == pytest.approx(-0.01 / 3)
    assert d["p10"] == pytest.approx(-0.06 + 0.2 * 0.05)  # between -0.06 and -0.01
    assert d["p90"] == pytest.approx(-0.01 + 0.8 * 0.07)
    # none: -0.50 and +0.02 differences; its halted OD3 run counts as not recovered and
    # is left out of the differences, counted with the halts.
    assert none["recovery_vs_twin"] == pytest.approx(1 / 3)
    assert none["paired_difference"]["runs"] == 2
    assert none["paired_difference"]["median"] == pytest.approx(-0.24)
    assert none["halts"] == 1 and none["halts_on_remediable"] == 1
    text = remediate.markdown(result)
    assert "| 0.67 | -0.010 [-0.050, +0.046] (3) |" in text


@pytest.mark.parametrize(
    "type_id,variant,remediable",
    [
        ("TE2", "", False),  # "corrupt": an OK status, nothing marks the samples it touches
        ("TE2", "timeout", True),  # reported by the environment: those samples can be masked
        ("TE1", "", True),
        ("OD3", "reference", False),
        ("OD3", "optimizer", True),  # acts once: a rollback undoes it
    ],
)
def test_a_type_that_ends_in_a_halt_is_remediable_only_in_its_undoable_variants(
    type_id, variant, remediable
):
    fault = {"fault": type_id, "fault_variant": variant, "fault_onset": 30}
    run = Run(f"s0/{type_id}/fm", 0, fault, "", "eval", fork=False)
    halt = {"diagnosis": type_id, "alarm_step": 31}
    row = remediate.outcome(run, _summary(0.5, halt=halt), 0.8, margin=0.05, halt_within=20)
    assert row["remediable"] is remediable and row["correct_halt"] is True
    late = remediate.outcome(
        run, _summary(0.5, halt={**halt, "alarm_step": 51}), 0.8, margin=0.05, halt_within=20
    )
    assert late["correct_halt"] is False  # more than 20 steps after onset

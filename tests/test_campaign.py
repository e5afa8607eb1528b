"""Campaigns: the severity table from run summaries (hand-made), and a tiny campaign end to end
through `launch.faultbench severity` (forked runs, resumable)."""

import json
import os
import subprocess
import sys

import pytest
import small_shapes

from rftjax import campaign

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _summary(out, name, final, alarms, fault=None, steps=100):
    os.makedirs(out / name, exist_ok=True)
    record = {
        "eval_accuracy_final": final,
        "alarms": [{"step": s, "signals": ["x"]} for s in alarms],
        "steps_completed": steps,
        "fm": "detect",
        "fault": fault or "none",
    }
    (out / name / "summary.json").write_text(json.dumps(record))


def test_severity_table_pairs_seeds_and_scores_detection(tmp_path):
    runs = campaign.severity_runs([0, 1], ["RF1"], ["severe"])
    fault = {"type": "RF1", "variant": "flip", "severity": "severe", "magnitude": 0.6, "onset": 51}
    _summary(tmp_path, "s0/clean", 0.8, alarms=[10, 60])  # one alarm from step 51 on
    _summary(tmp_path, "s1/clean", 0.6, alarms=[])
    _summary(tmp_path, "s0/RF1-severe", 0.5, alarms=[40, 55, 70], fault=fault)  # delay 4
    _summary(tmp_path, "s1/RF1-severe", 0.5, alarms=[20], fault=fault)  # missed
    table = campaign.severity_table(str(tmp_path), runs, window=200)
    row = table["rows"]["RF1-severe"]
    assert row["deltas"] == pytest.approx([-0.3, -0.1]) and row["delta_mean"] == pytest.approx(-0.2)
    assert row["detected"] == 0.5 and row["delay_median"] == 4.0
    # Clean steps from onset 51 to 100: 2 × 50; one alarm -> 10 per 1,000 steps.
    assert table["clean_alarms_per_1000_steps"] == pytest.approx(10.0)
    text = campaign.markdown(table)
    assert "| RF1 | flip |" in text and "0.6: 0.500 (-0.200, n=2); detected 50% (4)" in text


def test_faultbench_severity_runs_a_tiny_campaign_and_resumes(tmp_path):
    args = [
        sys.executable,
        "-m",
        "launch.faultbench",
        "severity",
        f"--out={tmp_path}",
        "--seeds=0",
        "--types=CA1",
        "--workers=1",
        "--steps=6",
        "--checkpoint_every=2",
        "--warmup_steps=10",
        "--warmup_batch_size=16",
        "--eval_size=16",
        "--eval_every=3",
        *small_shapes.RUN_FLAGS,
    ]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((tmp_path / "severity.json").read_text())
    assert sorted(table["rows"]) == ["CA1-moderate", "CA1-severe", "CA1-subtle"]
    assert "| CA1 | flip |" in (tmp_path / "severity.md").read_text()
    # Faulted runs forked from the clean run (onset 3: its checkpoint at step 2).
    assert not os.path.exists(tmp_path / "s0" / "CA1-severe" / "warmup")
    with open(tmp_path / "s0" / "CA1-severe" / "metrics.jsonl", encoding="utf-8") as f:
        active = [json.loads(line)["fault_active"] for line in f]
    assert active == [0, 0, 1, 1, 1, 1]
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "4 of 4 runs already finished; 0 to go" in again.stdout

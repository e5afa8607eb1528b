"""End to end: `launch.train` on a shrunken config, outputs, resume, and bad inputs."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import small_shapes

import faults
from fm import taxonomy
from rftjax.checkpoint import Checkpointer
from rftjax.config import RLConfig
from rftjax.train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRUNK = [
    *small_shapes.RUN_FLAGS,
    "--warmup_steps=20",
    "--warmup_batch_size=32",
    "--eval_size=32",
    "--eval_every=3",
    "--checkpoint_every=3",
    "--log_every=2",
]


def _launch(*args):
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_launch_train_writes_the_promised_outputs(tmp_path):
    workdir = str(tmp_path / "run")
    proc = _launch(f"--workdir={workdir}", "--steps=6", *SHRUNK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    for key in (
        "eval_accuracy_initial",
        "eval_accuracy_final",
        "steps_completed",
        "wall_seconds",
        "fault",
        "alarms",
        "diagnoses",
        "actions",
        "halted",
    ):
        assert key in summary
    assert summary["steps_completed"] == 6 and summary["halted"] is False
    records = _records(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert "eval_accuracy" in records[2] and "eval_accuracy" not in records[1]
    assert all("reward_mean" in r and "kl_ref" in r and "grad_norm" in r for r in records)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:2] == ["3", "6"]
    assert any(
        n.startswith("events.out.tfevents")
        for n in os.listdir(os.path.join(workdir, "tensorboard"))
    )
    assert "warm-up" in proc.stderr and "held-out accuracy" in proc.stderr
    # The console (a pipe here): plain lines, progress every --log_every steps, no "\r", no
    # absl prefix, no JSON. The full log, prefixes and library chatter included, is train.log.
    prefix = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")
    console = proc.stderr.splitlines()
    assert "\r" not in proc.stderr and not any(prefix.match(line) for line in console)
    assert not any(line.lstrip().startswith("{") for line in console)
    assert [line.split(" reward")[0] for line in console if " reward " in line] == [
        "step 2/6", "step 4/6", "step 6/6"
    ]  # fmt: skip
    with open(os.path.join(workdir, "train.log"), encoding="utf-8") as f:
        logged = f.read().splitlines()
    assert all(prefix.match(line) for line in logged if line[:1] in "IWEF")
    for line in console:  # every console line is in the log
        assert sum(line in entry for entry in logged) >= 1, line
    hidden = [e for e in logged if re.search(r" \S*(checkpoint|xla_bridge)\S*\.py:", e)]
    assert hidden and not any(prefix.sub("", e) in proc.stderr for e in hidden)


_config = small_shapes.run_config


def test_resumed_run_continues_with_identical_metrics(tmp_path):
    # With fm on, the detector's history is part of the state: its scores must resume too.
    straight = tmp_path / "straight"
    run(_config(straight, 6, fm="detect"))
    broken = tmp_path / "broken"
    first = run(_config(broken, 4, fm="detect"))
    # Records past the last checkpoint (a run that died at step 5) must be replaced on resume.
    with open(broken / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 5, "reward_mean": -1.0}) + "\n")
    summary = run(_config(broken, 6, resume=True, fm="detect"))
    assert summary["steps_completed"] == 6
    assert _records(straight) == _records(broken)
    # Timings count every segment: the warm-up ran in the first one only; the RL time kept in
    # the step-4 checkpoint (the resume point) is part of the total (before: the last
    # segment's alone).
    with Checkpointer(str(broken / "checkpoints")) as ckpt:
        kept = ckpt.read_meta(4)["seconds"]
    assert summary["warmup_seconds"] == first["warmup_seconds"] > 0
    assert summary["rl_seconds"] > kept["rl"] > 0 and summary["wall_seconds"] > kept["wall"]
    assert "score/grad_norm" in _records(broken)[0]


@pytest.mark.parametrize("epochs", [1, 2])
def test_trajectory_records_agree_with_the_step_metrics(tmp_path, epochs):
    # One update: rows come from the loss's own forward; several: from the precomputed one.
    rl = RLConfig(prompts_per_step=4, group_size=4, num_epochs=epochs)
    run(dataclasses.replace(_config(tmp_path, 3, record_trajectories=True), rl=rl))
    rows = [json.loads(line) for line in open(tmp_path / "trajectories.jsonl", encoding="utf-8")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r, m in zip(rows, _records(tmp_path), strict=True):
        assert r["group"] == [g for g in range(4) for _ in range(4)]
        assert r["index"] == list(range(4)) * 4
        np.testing.assert_allclose(np.mean(r["score"]), m["reward_mean"], rtol=1e-5)
        np.testing.assert_allclose(np.mean(r["length"]), m["length_mean"], rtol=1e-5)
        # The trainer recomputes the sampler's log-probs (same weights before the update).
        np.testing.assert_allclose(r["trainer_logp_sum"], r["sampler_logp_sum"], atol=1e-4)
        np.testing.assert_allclose(r["is_ratio"], 1.0, atol=1e-4)
        assert max(r["sampler_logp_sum"]) < 0 and r["tool_calls"] == [0] * 16
        # GRPO: a completion's advantage is its group-normalized score.
        score = np.asarray(r["score"]).reshape(4, 4)
        centred = score - score.mean(1, keepdims=True)
        expected = centred / (score.std(1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(r["advantage"], expected.ravel(), atol=1e-4)


def test_tool_task_runs_end_to_end_and_reports_tool_use(tmp_path):
    rl = RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=22)
    cfg = dataclasses.replace(_config(tmp_path, 3, task="calc", fm="detect"), rl=rl)
    summary = run(cfg)
    records = _records(tmp_path)
    assert all(0 <= r["tool_calls_mean"] <= 2 and "score/tool_error_rate" in r for r in records)
    assert 0 <= summary["eval_tool_rate_correct_final"] <= 1
    assert "eval_tool_rate_initial" in summary and "eval_tool_rate" in records[1]


def test_fm_full_rolls_back_a_transient_fault_and_verifies_recovery(tmp_path, caplog):
    # CA3 (loss mask one slot late) breaks the mask/length invariant at once; it lasts 3 steps
    # of run time, so the rollback replays clean steps and verification passes.
    cfg = _config(
        tmp_path,
        20,
        fm="full",
        fm_window=4,
        fault="CA3",
        fault_severity="severe",
        fault_onset=10,
        fault_duration=3,
    )
    summary = run(cfg)
    (diagnosis,) = summary["diagnoses"]
    assert diagnosis["top"] == "CA3" and diagnosis["alarm_step"] == 10
    (action,) = summary["actions"]
    assert action["restored_to"] < 10 and action["actions"][0]["remedy"] == "rollback"
    assert [v["outcome"] for v in summary["verifications"]] == ["recovered"]
    assert not summary["halted"] and summary["steps_completed"] == 20
    records = _records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 21))  # replayed steps replaced
    assert all(r["check_mask_length"] == 0 for r in records[9:])
    # The steps the rollback dropped are kept aside, tagged with it (fm.report draws them).
    with open(tmp_path / "metrics_abandoned.jsonl", encoding="utf-8") as f:
        abandoned = [json.loads(line) for line in f]
    branch = list(range(action["restored_to"] + 1, action["step"] + 1))
    assert [r["step"] for r in abandoned] == branch
    assert {(r["rollback_step"], r["rolled_back_to"]) for r in abandoned} == {
        (action["step"], action["restored_to"])
    }
    assert any(r["check_mask_length"] > 0 for r in abandoned)  # what went wrong is there
    # The console tells the story in sentences; JSON stays in events.jsonl.
    said = [r.getMessage() for r in caplog.records]
    story = [m for m in said if m.startswith("step ") and "  " in m]
    assert any("ALARM check_mask_length" in m for m in story), said
    assert any("diagnosis CA3 mask, padding or EOS bug" in m for m in story), said
    assert any(f"rollback to {action['restored_to']}" in m for m in story), said
    assert any("recovered" in m for m in story), said
    assert not any('"event"' in m or "{" in m for m in said), said


def test_persistent_nan_gradients_fm_skips_them_and_a_plan_without_that_halts(tmp_path):
    fault = dict(fm="full", fm_window=4, fault="OD2", fault_severity="severe", fault_onset=10)
    # A baseline plan (rollback + skip the data window) cannot stop NaN gradients that keep
    # coming: it escalates and halts with the diagnosis, saving the rest of the compute.
    summary = run(_config(tmp_path / "baseline", 40, fm_policy="rollback_skip", **fault))
    assert summary["halted"] and summary["halt_report"]["diagnosis"] == "OD2"
    first = summary["actions"][0]
    assert first["restored_to"] < summary["halt_report"]["alarm_step"]  # before the NaNs
    assert summary["steps_completed"] < 40
    # fm's plan: a plain rollback, then skip_nonfinite, which the run finishes with.
    summary = run(_config(tmp_path / "fm", 40, **fault))
    assert not summary["halted"] and summary["steps_completed"] == 40
    remedies = [a["actions"][-1]["remedy"] for a in summary["actions"]]
    assert remedies == ["rollback", "skip_nonfinite"]
    assert summary["verifications"][-1]["outcome"] == "recovered"


def test_faulted_run_marks_active_steps_and_resumes_with_its_fault_state(tmp_path):
    # PG2 keeps the sampler's stale weights in the train state: a resumed run must restore them.
    fault = dict(fault="PG2", fault_onset=3, fault_severity="moderate")
    straight = tmp_path / "straight"
    summary = run(_config(straight, 6, **fault))
    broken = tmp_path / "broken"
    run(_config(broken, 4, **fault))
    run(_config(broken, 6, resume=True, **fault))
    assert _records(straight) == _records(broken)
    assert [r["fault_active"] for r in _records(straight)] == [0, 0, 1, 1, 1, 1]
    assert summary["fault"] == {
        "type": "PG2",
        "variant": "lag",
        "severity": "moderate",
        "magnitude": 8,
        "onset": 3,
        "duration": -1,
    }


# PG2 adds a fault state to the fork (kept for the slow suite; the fault state's resume is
# tested in the default run above).
@pytest.mark.parametrize("fault_id", ["OD3", pytest.param("PG2", marks=pytest.mark.slow)])
def test_fork_from_the_clean_run_equals_a_straight_faulted_run(tmp_path, fault_id):
    # Before onset a fault is the identity, so a campaign may start a faulted run from the clean
    # run's checkpoint just before onset: records and final state must match a straight run.
    # OD3 corrupts the weights at onset (the first forked step); PG2 carries fault state.
    fault = dict(fault=fault_id, fault_onset=5, fault_severity="severe")
    straight = run(_config(tmp_path / "straight", 6, **fault))
    run(_config(tmp_path / "clean", 6, keep_checkpoints=10))
    forked = run(_config(tmp_path / "fork", 6, fork_from=str(tmp_path / "clean"), **fault))
    assert _records(tmp_path / "fork") == _records(tmp_path / "straight")
    for key in ("eval_accuracy_initial", "eval_accuracy_final", "fault"):
        assert forked[key] == straight[key], key
    assert not os.path.exists(tmp_path / "fork" / "warmup")  # nothing before the fork is redone
    with pytest.raises(ValueError, match="not this run without its fault.*seed"):
        run(_config(tmp_path / "other", 6, seed=1, fork_from=str(tmp_path / "clean"), **fault))


def test_fork_without_a_checkpoint_before_onset_starts_from_scratch(tmp_path):
    fault = dict(fault="CA1", fault_onset=2, fault_severity="severe")
    run(_config(tmp_path / "clean", 4, keep_checkpoints=10))  # checkpoints at 2 and 4
    forked = run(_config(tmp_path / "fork", 4, fork_from=str(tmp_path / "clean"), **fault))
    straight = run(_config(tmp_path / "straight", 4, **fault))
    assert _records(tmp_path / "fork") == _records(tmp_path / "straight")
    assert forked["eval_accuracy_final"] == straight["eval_accuracy_final"]


def test_resume_with_nothing_left_keeps_the_final_evaluation(tmp_path):
    first = run(_config(tmp_path, 4))
    again = run(_config(tmp_path, 4, resume=True))
    assert again["steps_completed"] == 4
    assert again["eval_accuracy_final"] == first["eval_accuracy_final"]
    assert again["eval_accuracy_initial"] == first["eval_accuracy_initial"]


def test_all_padding_prompt_rows_are_refused():
    from rftjax.tasks import Batch
    from rftjax.train.setup import to_prompt_batch

    bad = Batch(np.array([[1, 5], [0, 0]]), np.array([[1, 1], [0, 0]]), np.zeros((2, 2)), ("", ""))
    with pytest.raises(ValueError, match="left-padded"):
        to_prompt_batch(bad)


def test_resume_refuses_a_different_configuration(tmp_path):
    run(_config(tmp_path, 2))
    changed = dataclasses.replace(
        _config(tmp_path, 4, resume=True), rl=RLConfig(prompts_per_step=4, group_size=4, algo="ppo")
    )
    with pytest.raises(ValueError, match="different configuration.*rl"):
        run(changed)
    with pytest.raises(ValueError, match="--resume"):
        run(_config(tmp_path, 4))  # a finished run's workdir is not silently overwritten


def test_memory_settings_may_change_on_resume():
    # Micro-batches and remat change how a step is computed, not what: a run that ran out of
    # memory resumes with more micro-batches. Every other RL setting stays part of the record.
    from rftjax.train.resume import config_record, differences

    cfg = _config("w", 4)
    more = dataclasses.replace(
        cfg, rl=dataclasses.replace(cfg.rl, num_microbatches=2, remat="layer")
    )
    assert differences(config_record(cfg), config_record(more)) == []
    other = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, group_size=2))
    assert differences(config_record(cfg), config_record(other)) == ["rl"]


def test_a_field_missing_from_an_older_record_counts_as_its_default():
    # Runs recorded before a TrainConfig field existed still resume and fork.
    from rftjax.train.resume import differences

    ours = {"seed": 1, "fm_window": 20, "chat_template": "auto"}
    assert differences({"seed": 1}, ours) == []
    assert differences({"seed": 1}, {**ours, "fm_window": 5}) == ["fm_window"]
    assert differences({"seed": 2, "fm_window": 20}, ours) == ["seed"]


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--task=nope", "unknown task 'nope'"),
        ("--fault=XX9", "unknown fault type 'XX9'"),
        ("--fault=TE1", "TE1 acts on tool calls: it needs a task with tools"),
        ("--fault=RF1 --fault_variant=bogus", "RF1 has no variant 'bogus'; accepted: flip, noise"),
        ("--fault=CA1 --fault_onset=5", "--fault_onset=5 is after the last step (1)"),
        ("--fm_window=0", "fm_window must be > 0"),
        ("--kl_in_reward", "kl_in_reward applies to PPO"),
        ("--temperature=1e-5", "temperature must be 0 (greedy) or >= 0.001"),
        ("--kl_coef=-0.1", "kl_coef must be >= 0"),
        ("--model=huge", "unknown model preset 'huge'"),
        ("--model_overrides=depth=2", "unknown model override 'depth'"),
        ("--top_p=1.5", "top_p must be in (0, 1]"),
        ("--prompts_per_step=5 --num_minibatches=2", "not divisible by num_minibatches"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(tmp_path, flag, message):
    proc = _launch(f"--workdir={tmp_path}", "--steps=1", *flag.split())
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_enum_value_is_rejected_by_flag_parsing(tmp_path):
    proc = _launch(f"--workdir={tmp_path}", "--algo=dpo")
    assert proc.returncode != 0 and "grpo" in proc.stderr and "ppo" in proc.stderr


def test_fm_detect_logs_statistics_alarms_and_events(tmp_path):
    # The loop runs its hot part under jax.transfer_guard("disallow"), so this run also checks
    # that no step makes an implicit host transfer.
    summary = run(_config(tmp_path, 4, fm="detect"))
    records = _records(tmp_path)
    for key in (
        "alarm",
        "mismatch_k3",
        "is_ess",
        "kl_ref_k3",
        "unique_token_ratio",
        "grad_norm/layer_0",
        "nonfinite_grads",
        "check_mask_length",
        "flag/grad_norm",
    ):
        assert key in records[0], key
    with open(tmp_path / "events.jsonl", encoding="utf-8") as f:
        events = [json.loads(line) for line in f]
    alarm_steps = [r["step"] for r in records if r["alarm"] > 0]
    assert [e["step"] for e in events if e["event"] == "alarm"] == alarm_steps
    assert [a["step"] for a in summary["alarms"]] == alarm_steps


def test_alarm_event_names_the_flagged_signals():
    from rftjax.train.supervisor import alarm_event

    values = {
        "alarm": 1.0,
        "flag/grad_norm": 1.0,
        "score/grad_norm": 21.5,
        "flag/reward_mean": 0.0,
        "score/reward_mean": 0.3,
        "flag/nonfinite_grads": 1.0,
    }
    assert alarm_event(7, values) == {
        "step": 7,
        "event": "alarm",
        "signals": ["grad_norm", "nonfinite_grads"],
        "scores": {"grad_norm": 21.5},
    }


def test_fault_list_prints_the_catalog():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "--fault=list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:] if not line.startswith(" ")]
    assert [r[0] for r in rows] == [f.id for f in taxonomy.CATALOG]
    assert [r[1] for r in rows] == [f.family for f in taxonomy.CATALOG]
    spec = faults.SPECS["PG3"]
    for name, preset in zip(spec.variants, spec.presets, strict=True):
        assert f"{name}: " in proc.stdout and " / ".join(f"{v:g}" for v in preset) in proc.stdout


def test_the_closed_loop_uses_the_shipped_learned_diagnoser_unless_rules_are_asked_for():
    from fm import diagnose
    from rftjax.knobs import make_knobs
    from rftjax.train import manage

    learned = manage.Manager(None, RLConfig(), None, make_knobs())
    named = learned.remediator.diagnoser  # restricted to the types this trainer can have
    assert isinstance(named.func, diagnose.Learned)
    assert len(named.func.model.classes) == 16  # every type, tools included
    assert "TE1" not in named.keywords["types"] and len(named.keywords["types"]) == 14
    rules = manage.Manager(None, RLConfig(), None, make_knobs(), diagnoser="rules", tools=True)
    assert rules.remediator.diagnoser.func is diagnose.diagnose
    assert len(rules.remediator.diagnoser.keywords["types"]) == 16
    with pytest.raises(ValueError, match="fm_diagnoser"):
        _config("w", 2, fm="full", fm_diagnoser="oracle")

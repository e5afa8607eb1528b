"""What a person meets first: --help, refusals that say why, one trainer per workdir."""

import os
import signal
import subprocess
import sys

import pytest

from rftjax.config import RLConfig, TrainConfig
from rftjax.train.lock import WorkdirBusy, WorkdirLock
from rftjax.train.resume import describe_differences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_exits_0_with_the_main_flags_grouped_and_every_flag_in_a_group():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for heading in ("run:", "model & task:", "algorithm:", "faults:", "fm (failure", "mesh:"):
        assert f"\n{heading}" in out, heading
    assert "--fault_severity (default: 'moderate')" in out and "calc" in out
    assert "--helpfull" in out and "--alsologtostderr" not in out  # absl's own stay out
    # Every flag the entry point defines is in a group: none only under --helpfull.
    check = (
        "import launch.train, launch.common as c; from absl import flags; "
        "defined = {f.name for m in ('launch.common', 'launch.train') "
        "for f in flags.FLAGS.get_flags_for_module(m)}; "
        "grouped = {n for g in c.HELP_GROUPS.values() for n in g}; "
        "assert defined == grouped, sorted(defined ^ grouped)"
    )
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True, timeout=120)


def _hold(workdir):
    """A child process that takes the workdir lock and waits (killed by the test)."""
    code = (
        "import sys, time; from rftjax.train.lock import WorkdirLock; "
        f"l = WorkdirLock({str(workdir)!r}).__enter__(); print('held', flush=True); "
        "time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_on_a_workdir_is_refused_at_once_and_a_dead_holder_frees_it(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(WorkdirBusy, match=f"process {holder.pid} on"):
            WorkdirLock(str(tmp_path)).__enter__()
        # The real entry point refuses too, naming the holder, before any work.
        proc = subprocess.run(
            [sys.executable, "-m", "launch.train", f"--workdir={tmp_path}", "--steps=1"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2 and f"process {holder.pid}" in proc.stderr
        assert proc.stderr.count("is in use by") == 1
        assert sorted(os.listdir(tmp_path)) == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: a stale lock file
        holder.wait()
    with WorkdirLock(str(tmp_path)) as lock:  # the kernel freed it with the process
        assert f"process {os.getpid()}" in open(lock.path).read()


def test_resume_mismatches_name_each_field_with_both_values():
    saved = {"seed": 1, "rl": {"group_size": 8, "lr": 1e-4}, "knobs": {"lr": 1e-4}, "fm": "off"}
    ours = {"seed": 1, "rl": {"group_size": 4, "lr": 1e-4}, "knobs": {"lr": 2e-4}, "fm": "full"}
    assert describe_differences(saved, ours) == [
        "fm: saved 'off', now 'full'",
        "knobs.lr: saved 0.0001, now 0.0002",
        "rl.group_size: saved 8, now 4",
    ]


def test_grpo_at_temperature_0_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="no learning signal"):
        TrainConfig(workdir=str(tmp_path), knobs={"temperature": 0.0})
    # PPO's critic gives a baseline: greedy sampling is allowed there.
    TrainConfig(workdir=str(tmp_path), rl=RLConfig(algo="ppo"), knobs={"temperature": 0.0})


def test_closed_loop_events_read_as_sentences():
    from fm.report import describe

    events = [
        {"step": 103, "event": "alarm", "signals": ["grad_norm", "update_param_ratio"],
         "scores": {"update_param_ratio": 117.2, "grad_norm": 21.0}},
        {"step": 105, "event": "diagnosis", "top": "OD1", "ranking": [["OD1", 0.97]],
         "plan": ["rollback", "lr_cap", "halt"],
         "unavailable": [{"remedy": "lr_scale", "type": "OD1", "reason": "no knob"}]},
        {"step": 105, "event": "action", "restored_to": 80,
         "actions": [{"remedy": "rollback", "knobs": {}},
                     {"remedy": "lr_cap", "knobs": {"lr_cap": 1e-4}}]},
        {"step": 121, "event": "verification", "outcome": "recovered"},
        {"step": 140, "event": "halt", "reason": "the plan is used up", "diagnosis": "OD1"},
    ]  # fmt: skip
    assert [describe(e) for e in events] == [
        "step 103  ALARM grad_norm +21σ, update_param_ratio +117σ",
        "step 105  diagnosis OD1 learning-rate spike or stall (97%), plan: rollback, lr cap, "
        "halt (not available here: lr_scale)",
        "step 105  rollback to 80 + lr cap 0.0001",
        "step 121  recovered (no alarm since the remedy)",
        "step 140  HALT: the plan is used up (diagnosis OD1)",
    ]

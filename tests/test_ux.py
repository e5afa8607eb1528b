"""What a person meets first: --help, refusals that say why, one trainer per workdir, a plain
console with a progress bar, and the full log in the workdir."""

import io
import logging
import os
import re
import signal
import subprocess
import sys
import types

import pytest
from absl import logging as absl_logging

from rftjax.config import RLConfig, TrainConfig
from rftjax.train import console
from rftjax.train.console import bar_line
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


# -- the console and the run log ------------------------------------------------------------

ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")


def test_the_bar_renders_step_total_rate_and_eta():
    # 375 of 1500: 25% of a 20-character bar is 5 full blocks; 1125 steps left at 2.5 steps/s
    # are 450 s. 63 columns: 19 before the bar, 24 after it.
    assert bar_line(375, 1500, 2.5, 450.0, width=63) == (
        "step 375/1500  25%|█████               | 2.5 steps/s, ETA 7m30s"
    )
    # 412/1500 of 20 eighths-blocks: int(0.27467 * 160) = 43 = 5 full + 3/8 ('▍').
    line = bar_line(412, 1500, 2.5, 435.2, note="reward 0.412", width=77)
    assert line == "step 412/1500  27%|█████▍              | 2.5 steps/s, ETA 7m15s, reward 0.412"
    # Under a step a second, seconds a step; 1497 steps at 0.25/s are 5988 s = 1 h 39 min 48 s.
    assert bar_line(3, 1500, 0.25, 5988.0, width=63).endswith("| 4.0 s/step, ETA 1h39m")
    assert bar_line(0, 1500, None, None, width=63).endswith("| measuring speed")


def test_pace_counts_dispatched_steps_after_the_first_rollbacks_included(monkeypatch):
    from rftjax.train import supervisor

    clock = iter([10.0, 12.0, 13.0])  # the first step's dispatch, then two readings
    monkeypatch.setattr(supervisor, "time", types.SimpleNamespace(time=lambda: next(clock)))
    pace = supervisor.Pace()
    pace.stepped(1)  # its call compiled: the clock starts here
    assert pace.rate(1, 10) == (None, None) and pace.describe(1, 10) == "measuring speed"
    for step in (2, 3, 4, 5):
        pace.stepped(step)
    assert pace.rate(5, 10) == (2.0, 2.5)  # 4 steps in 2 s; 5 left
    for step in (3, 4):  # a rollback to 2 replays steps 3 and 4: 6 steps in 3 s
        pace.stepped(step)
    assert pace.describe(4, 10) == "2.0 steps/s, ETA 0m03s"


def _noise(level, path, message):
    """A library's record as its logger makes it (Orbax logs through absl's logger)."""
    return logging.LogRecord("absl", level, path, 1, message, (), None)


def test_console_is_plain_and_the_run_log_keeps_everything(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    stream = io.StringIO()
    root_handlers = list(logging.getLogger().handlers)
    with console.Console(stream, tty=False) as shown:
        absl_logging.info("warm-up: step 5/20 loss 3.9693")  # before the workdir is held
        logging.getLogger().handle(_noise(logging.INFO, "/x/jax/_src/xla_bridge.py", "no TPU"))
        logging.getLogger("transformers").warning("PyTorch was not found.")
        import transformers.utils.logging as hf_logging  # transformers' own handler set up

        shown.route_transformers()  # its modules' records too, through the root logger
        logging.getLogger("transformers.tokenization_utils_base").warning("special tokens")
        logging.getLogger("transformers.tokenization_utils_base").error("no vocabulary")
        shown.open_run_log(str(tmp_path), append=False)
        absl_logging.info("step 2/6 reward 0.000 (measuring speed)", extra=console.PROGRESS)
        absl_logging.warning("step 69  ALARM update_param_ratio +92σ", extra=console.STORY)
        logging.getLogger().handle(_noise(logging.INFO, "/x/orbax/checkpoint/m.py", "Saving"))
        absl_logging.warning("stopped after step 6 (checkpoint saved)")
        absl_logging.error("step 7: replicas disagree on params")
        absl_logging.error("the run failed", extra=console.FILE_ONLY)
    assert logging.getLogger().handlers == root_handlers  # absl's handler is back
    assert hf_logging._default_handler in logging.getLogger("transformers").handlers  # and its
    assert stream.getvalue().splitlines() == [
        "warm-up: step 5/20 loss 3.9693",
        "error: no vocabulary",  # transformers' errors pass, its warnings do not
        "step 2/6 reward 0.000 (measuring speed)",  # off a terminal: the progress lines
        "step 69  ALARM update_param_ratio +92σ",
        "warning: stopped after step 6 (checkpoint saved)",
        "error: step 7: replicas disagree on params",
    ]
    logged = (tmp_path / console.LOG_NAME).read_text(encoding="utf-8").splitlines()
    assert len(logged) == 11 and all(ABSL_PREFIX.match(line) for line in logged), logged
    assert [line[0] for line in logged] == list("IIWWEIWIWEE")
    for said in ("warm-up: step 5/20", "no TPU", "PyTorch was not found.", "special tokens",
                 "no vocabulary", "Saving",
                 "ALARM update_param_ratio", "the run failed"):  # fmt: skip
        assert sum(said in line for line in logged) == 1, said


def test_on_a_terminal_lines_print_above_one_updating_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with console.Console(stream) as shown:
        assert shown.tty
        console.progress(1, 10, None, None)
        absl_logging.warning("step 1  ALARM grad_norm +21σ", extra=console.STORY)
        absl_logging.info("step 1/10 reward 0.5", extra=console.PROGRESS)  # the bar shows it
        console.progress(2, 10, 2.0, 4.0)
    out = stream.getvalue()
    assert "step 1/10 reward" not in out
    # The sentence is a line of its own, after the bar's line is cleared ("\r" + blanks + "\r").
    before, after = out.split("step 1  ALARM grad_norm +21σ\n")
    assert before.startswith("\rstep 1/10  10%|") and before.rstrip(" ").endswith("\r")
    assert "\rstep 1/10  10%|" in after and "step 2/10  20%|" in after  # redrawn, then moved
    assert "2.0 steps/s, ETA 0m04s" in after and after.endswith("\n")  # closed at the end


def test_off_a_terminal_progress_writes_no_carriage_return():
    stream = io.StringIO()
    with console.Console(stream, tty=False):
        for step in range(1, 4):
            console.progress(step, 3, 2.0, (3 - step) / 2.0)
            absl_logging.warning("step %d  ALARM x +5σ", step, extra=console.STORY)
    assert "\r" not in stream.getvalue() and len(stream.getvalue().splitlines()) == 3

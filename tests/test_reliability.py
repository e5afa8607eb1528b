"""Nothing lost: preemption, a crash during a save, corrupt checkpoints, bad inputs, and
failures of fm itself. Signals are sent to real `launch.train` subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import small_shapes

from fm import remediate
from rftjax.benchmarks import chaos
from rftjax.config import RLConfig
from rftjax.train.logs import read_jsonl
from rftjax.train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    *small_shapes.RUN_FLAGS,
    "--warmup_steps=10",
    "--warmup_batch_size=16",
    "--eval_size=16",
    "--eval_every=50",
    "--checkpoint_every=50",
    "--log_every=50",
    "--fm=detect",
]


def _train(workdir, *args, **popen):
    cmd = [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *FLAGS, *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


# SIGINT goes through the same handler as SIGTERM: its run is kept for the slow suite.
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
def test_a_signal_saves_the_step_in_flight_and_resume_is_identical(tmp_path, sig):
    reference, stopped = str(tmp_path / "reference"), str(tmp_path / "stopped")
    proc = _train(stopped, "--steps=60")
    # Signal once a few steps are logged (checkpoints come every 50: the stop saves its own).
    deadline = time.time() + 300
    while chaos.logged_step(stopped) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    summary = _summary(stopped)
    at = summary["steps_completed"]
    assert summary["preempted"] is True and 5 <= at < 60, summary
    # "final" only from an evaluation of the state it stopped at (evaluations every 50 steps).
    evaluated = at // 50 * 50
    assert summary["eval_last_step"] == evaluated
    assert (summary["eval_accuracy_final"] is None) == (at != evaluated)
    assert chaos.logged_step(stopped) == at == chaos.checkpoint_step(stopped)  # nothing lost
    assert _train(stopped, "--steps=60", "--resume").wait() == 0
    assert _train(reference, "--steps=60").wait() == 0
    assert chaos.compare(reference, stopped) == []
    assert _summary(stopped)["preempted"] is False


def test_sigkill_during_an_asynchronous_save_never_leaves_a_listed_step(tmp_path):
    # A child saves step 1, starts the asynchronous save of a 256 MB step 2 and kills itself
    # with SIGKILL while it is being written. Step 2 must not be listed; step 1 restores.
    script = f"""
import os, signal, jax.numpy as jnp
from rftjax.checkpoint import Checkpointer
ckpt = Checkpointer({str(tmp_path / "ckpt")!r})
ckpt.save(1, {{"w": jnp.ones((4,))}}, {{"step": 1}})
ckpt.wait()
ckpt.save(2, {{"w": jnp.ones((64, 1024, 1024))}}, {{"step": 2}})
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    from rftjax.checkpoint import Checkpointer

    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        assert ckpt.all_steps() == [1]
        import jax.numpy as jnp

        step, state, meta, skipped = ckpt.restore_latest({"w": jnp.zeros((4,))})
    assert (step, meta, skipped) == (1, {"step": 1}, [])
    assert float(state["w"].sum()) == 4.0
    # The half-written step is there under a temporary name only.
    assert any("tmp" in name for name in os.listdir(tmp_path / "ckpt") if name != "pins.json")


_config = small_shapes.run_config


def test_resume_skips_a_corrupt_latest_checkpoint_and_replays_identically(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run(_config(straight, 8, fm="detect"))
    run(_config(broken, 6, fm="detect"))
    data = [
        os.path.join(root, f)
        for root, _, files in os.walk(broken / "checkpoints" / "6" / "state")
        for f in files
        if os.path.basename(root) == "d"
    ]
    with open(max(data, key=os.path.getsize), "r+b") as f:  # flip a byte mid-file
        f.seek(os.path.getsize(f.name) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    summary = run(_config(broken, 8, fm="detect", resume=True))
    assert summary["steps_completed"] == 8
    (note,) = [e for e in read_jsonl(broken / "events.jsonl") if e["event"] == "corrupt_checkpoint"]
    assert note["checkpoint"] == 6 and note["step"] == 4
    assert os.listdir(str(broken / "checkpoints.corrupt"))  # kept aside for inspection
    ours = [r for r in read_jsonl(broken / "metrics.jsonl")]
    assert ours == read_jsonl(straight / "metrics.jsonl")  # steps 5, 6 replayed identically


def _failing_diagnoser(monkeypatch):
    def boom(self, step):
        raise RuntimeError("diagnoser exploded")

    monkeypatch.setattr(remediate.Remediator, "_diagnose", boom)


def test_an_exception_inside_fm_is_logged_and_training_goes_on(tmp_path, monkeypatch):
    _failing_diagnoser(monkeypatch)
    cfg = _config(
        tmp_path, 16, fm="full", fm_window=4, fault="CA3", fault_severity="severe", fault_onset=8
    )
    summary = run(cfg)
    assert summary["steps_completed"] == 16 and not summary["actions"]
    (error,) = summary["fm_errors"]
    assert error["where"] == "remediator" and "diagnoser exploded" in error["error"]
    assert "boom" in error["traceback"]
    # Unmanaged from there on, also after a restart.
    meta = json.load(open(tmp_path / "checkpoints" / "16" / "meta" / "metadata"))
    assert "diagnoser exploded" in meta["fm_failure"]


def test_fm_strict_turns_an_fm_exception_into_a_failed_run(tmp_path, monkeypatch):
    _failing_diagnoser(monkeypatch)
    cfg = _config(
        tmp_path,
        16,
        fm="full",
        fm_window=4,
        fm_strict=True,
        fault="CA3",
        fault_severity="severe",
        fault_onset=8,
    )
    with pytest.raises(RuntimeError, match="diagnoser exploded"):
        run(cfg)


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


BAD_DATA = [
    (b'{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": "4"}\n', ":2: empty line"),
    (b'{"prompt": "1+1=", "answer": "2"}\n{"q": "2+2=", "answer": "4"}\n', ":2: missing field"),
    (b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "\xff", "answer": "4"}\n', "not UTF-8"),
    (b'{"prompt": "1+1=", "answer": 2\n', ":1: malformed JSON"),
    (b"\n\n", "no rows"),
]


@pytest.mark.parametrize(
    "data,message", BAD_DATA, ids=["empty_line", "field", "utf8", "json", "none"]
)
def test_bad_dataset_files_fail_before_any_work(tmp_path, data, message):
    path = _write(tmp_path / "data.jsonl", data)
    proc = _train(tmp_path / "run", "--steps=2", f"--task=jsonl:{path}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and message in err, err[-2000:]
    assert not os.path.exists(tmp_path / "run")  # a failed start leaves no folder behind


def test_bad_model_folders_fail_before_any_work(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    proc = _train(tmp_path / "run", "--steps=2", f"--model={folder}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "config.json" in err, err[-2000:]
    proc = _train(tmp_path / "run", "--steps=2", f"--model={tmp_path / 'absent'}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "absent" in err, err[-2000:]
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "run_spec,message",
    [
        ({"seed": 0, "type": "ZZ9", "severity": "severe", "onset": 3}, "unknown fault type 'ZZ9'"),
        ({"seed": 0, "type": "CA1", "severity": "severe", "onset": 99}, "after the last step"),
        ({"seed": 0, "type": "CA1", "severity": "awful", "onset": 3}, "severity"),
    ],
)
def test_bad_campaign_specs_fail_before_any_run(tmp_path, run_spec, message):
    spec = {"name": "bad", "base": {"steps": 12}, "runs": [run_spec]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.faultbench",
            "generate",
            f"--spec={path}",
            f"--out={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out" / "s0")


# Random kills: the deterministic SIGTERM and SIGKILL-during-save tests above cover each kind
# of kill in the default run.
@pytest.mark.slow
def test_chaos_kills_and_resumes_to_identical_records(tmp_path):
    args = [*FLAGS, "--steps=60", "--checkpoint_every=5"]
    lines = []
    out = chaos.run_chaos(str(tmp_path), args, cycles=2, seed=3, report=lines.append)
    assert out["cycles"] == 2 and out["mismatched_episodes"] == 0, lines
    assert out["sigterm_exit_0"] == out["sigterm"]
    assert out["sigterm_steps_lost_max"] == 0
    # Since the last complete checkpoint: every 5 steps, one more may be in flight.
    assert out["sigkill_steps_lost_max"] <= 10


def test_a_stop_mid_remediation_resumes_with_the_remediators_history(tmp_path, monkeypatch):
    # --fm=full, a transient CA3: alarm at 10, rollback, verification. The run is stopped (as
    # by SIGTERM) at its 16th executed step, after the rollback and before verification ends;
    # the resumed run must write the same metrics and events as the straight run.
    from rftjax.train import preempt

    def cfg(workdir, **kw):
        return _config(
            workdir,
            20,
            fm="full",
            fm_window=4,
            fault="CA3",
            fault_severity="severe",
            fault_onset=10,
            fault_duration=3,
            **kw,
        )

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    reference = run(cfg(straight))
    (action,) = reference["actions"]
    assert action["step"] == 12 and action["restored_to"] < 10
    calls = []

    def reached(self, step):
        calls.append(step)
        if len(calls) == 16:  # 12 steps, the rollback, 4 replayed
            self.signal = signal.SIGTERM
        return self.signal is not None

    monkeypatch.setattr(preempt.Preemption, "reached", reached)
    first = run(cfg(stopped))
    assert first["preempted"] and first["actions"] and not first["verifications"]
    monkeypatch.undo()
    resumed = run(cfg(stopped, resume=True))
    assert not resumed["preempted"] and resumed["steps_completed"] == 20
    assert chaos.compare(str(straight), str(stopped)) == []
    assert resumed["verifications"] == reference["verifications"]


def test_the_run_controller_refuses_a_corrupt_rollback_target(tmp_path):
    from rftjax import models
    from rftjax.checkpoint import Checkpointer
    from rftjax.knobs import make_knobs
    from rftjax.train.manage import RunController
    from rftjax.train.step import init_state

    rl = RLConfig(prompts_per_step=4, group_size=4)
    _, params = models.create(small_shapes.MODEL, 0)
    state = init_state(params, rl, 0)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=5)
    for step in (2, 4, 6):
        ckpt.save(step, state._replace(step=state.step + step), {"step": step})
    ckpt.wait()
    ckpt.pin(4)
    meta_file = tmp_path / "ckpt" / "4" / "meta" / "metadata"
    meta_file.write_text("{")
    controller = RunController(ckpt, rl, state, make_knobs())
    with pytest.raises(remediate.RestoreError, match="step 4"):
        controller.restore(4)
    assert ckpt.all_steps() == [2, 6] and ckpt.pinned == []
    controller.restore(2)  # a good one: restored, and the abandoned later steps deleted
    assert int(controller.state.step) == int(state.step) + 2 and controller.restored_to == 2
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_a_second_generate_on_the_same_folder_is_refused(tmp_path):
    # The first holds the lock (a child process that waits); the second must refuse at once.
    from rftjax.campaign import dataset as records

    hold = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from rftjax.campaign import dataset as records\n"
            f"with records.exclusive({str(tmp_path)!r}):\n"
            "    print('locked', flush=True); time.sleep(60)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hold.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"being generated by process {hold.pid}"):
            records.generate(None, str(tmp_path))
    finally:
        hold.kill()
        hold.wait()
    with records.exclusive(str(tmp_path)):  # released when its holder died
        pass


def test_a_preempted_campaign_run_counts_as_unfinished(tmp_path):
    # Ctrl-C reaches a campaign's worker processes too: their runs save and write a summary
    # marked preempted, which the next `generate` must resume rather than skip.
    from rftjax.campaign.runs import Run, read_summary

    run = Run("s0/clean", 0, {})
    os.makedirs(tmp_path / "s0" / "clean")
    path = tmp_path / "s0" / "clean" / "summary.json"
    assert read_summary(str(tmp_path), run) is None
    path.write_text(json.dumps({"steps_completed": 7, "preempted": True}))
    assert read_summary(str(tmp_path), run) is None
    path.write_text(json.dumps({"steps_completed": 12, "preempted": False}))
    assert read_summary(str(tmp_path), run) == {"steps_completed": 12, "preempted": False}

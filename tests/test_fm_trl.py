"""fm on a real TRL GRPOTrainer run (CPU, a tiny random Llama built here, no download).

The run is `launch.trl_demo`'s: completions over 16 letters; the reward is the share of the
letter "a" (≈ 6% for the random policy). The faulty run's reward function flips its rewards
(1 - r) from step K = 25 on: a reward fault. A clean run must raise no alarm, offline
(`fm.analyze` on its trainer_state.json) or online (`FMCallback`); the flipped run must alarm
within 10 steps of K with a reward-family diagnosis, both ways; with `action="rollback"` the
callback restores a snapshot from before K and halves the learning rate.
"""

import json
import os

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from fm import analyze  # noqa: E402
from fm.integrations.trl import FMCallback  # noqa: E402
from launch import trl_demo  # noqa: E402

STEPS, K = 40, 25


def _train(model, out, *, flip_at=None, callback=None):
    return trl_demo.train(model, out, steps=STEPS, flip_at=flip_at, callback=callback)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return trl_demo.tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def clean(model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clean"))
    callback = FMCallback(action="stop")
    return _train(model, out, callback=callback), callback, out


@pytest.fixture(scope="module")
def flipped(model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("flipped"))
    callback = FMCallback(action="stop")
    return _train(model, out, flip_at=K, callback=callback), callback, out


def test_clean_run_offline_no_alarm(clean):
    trainer, _, out = clean
    assert trainer.state.global_step == STEPS
    result = analyze.analyze([out])  # the folder resolves to its trainer_state.json
    s = result.summary
    assert s["format"] == "trl" and s["steps"] == STEPS
    assert {"reward_mean", "kl_ref_k1", "entropy_mean", "length_mean", "grad_norm"} <= set(
        s["monitored"]
    )
    assert s["unknown_metrics"] == []  # every name TRL 1.16 logged here is in the table
    assert s["alarms"] == 0, result.events


def test_clean_run_online_no_alarm(clean):
    trainer, callback, _ = clean
    assert callback.monitor is not None and callback.monitor.alarms == 0
    assert not callback.stopped and trainer.state.global_step == STEPS


def test_flipped_rewards_offline_alarm_and_reward_family(flipped):
    _, _, out = flipped
    result = analyze.analyze([os.path.join(out, "trainer_state.json")], "trl")
    s = result.summary
    assert s["alarm_steps"], "no alarm"
    assert K <= s["alarm_steps"][0] < K + 10, s["alarm_steps"]
    assert s["diagnoses"][0]["family"] == "reward", s["diagnoses"]
    paths = analyze.write(result, os.path.join(out, "fm_analysis"))
    events = [json.loads(line) for line in open(paths["events.jsonl"], encoding="utf-8")]
    assert events == json.loads(json.dumps(result.events))
    assert os.path.getsize(paths["report.png"]) > 0


def test_flipped_rewards_online_alarm_stops_training(flipped):
    trainer, callback, out = flipped
    alarms = [e["step"] for e in callback.events if e["event"] == "alarm"]
    diagnoses = [e for e in callback.events if e["event"] == "diagnosis"]
    assert alarms and K <= alarms[0] < K + 10, alarms
    assert diagnoses and diagnoses[0]["family"] == "reward"
    halt = [e for e in callback.events if e["event"] == "halt"]
    assert callback.stopped and halt and halt[0]["step"] == diagnoses[0]["step"]
    assert trainer.state.global_step == halt[0]["step"] < STEPS
    written = [json.loads(line) for line in open(os.path.join(out, "fm_events.jsonl"))]
    assert [e["event"] for e in written] == [e["event"] for e in callback.events]


def test_rollback_restores_a_snapshot_before_the_fault_and_scales_lr(model, tmp_path):
    restored = {}

    class Spy(FMCallback):
        """Records the weights right after the rollback, to compare with the snapshot."""

        def _act(self, step, diagnosis, control, model, optimizer, lr_scheduler):
            before = [s for s, _ in self.snapshots]
            lr_before = [g["lr"] for g in optimizer.param_groups]
            super()._act(step, diagnosis, control, model, optimizer, lr_scheduler)
            if self.rolled_back_at == step:
                target = next(e for e in reversed(self.events) if e["event"] == "action")
                snap = dict(self._kept)[target["restored_to"]]
                restored.update(
                    snapshots=before, lr_before=lr_before,
                    lr_after=[g["lr"] for g in optimizer.param_groups],
                    same=all(torch.equal(v.cpu(), snap["model"][k])
                             for k, v in model.state_dict().items()),
                )  # fmt: skip

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            super().on_step_end(args, state, control, model=model, optimizer=optimizer, **kwargs)
            self._kept = list(self.snapshots)

    callback = Spy(action="rollback", lr_scale=0.5, snapshot_every=5)
    trainer = _train(model, str(tmp_path), flip_at=K, callback=callback)
    action = [e for e in callback.events if e["event"] == "action"]
    assert len(action) == 1, callback.events
    assert action[0]["restored_to"] < K and action[0]["restored_to"] in restored["snapshots"]
    assert restored["same"], "the model's weights are not the snapshot's"
    assert restored["lr_after"] == pytest.approx([lr * 0.5 for lr in restored["lr_before"]])
    # The flipped reward is in the reward function, which no rollback repairs: the alarm
    # returns and the callback stops the run.
    halt = [e for e in callback.events if e["event"] == "halt"]
    assert halt and halt[0]["reason"] == "the alarm returned after the rollback"
    assert trainer.state.global_step < STEPS


def test_callback_arguments_and_where_rollback_is_refused():
    from types import SimpleNamespace

    from fm.integrations import trl as fm_trl

    with pytest.raises(ValueError, match="action must be one of"):
        FMCallback(action="halt")
    with pytest.raises(ValueError, match="snapshot_every must be an int >= 1"):
        FMCallback(action="rollback", snapshot_every=0)
    plain = SimpleNamespace(deepspeed=None, fsdp="", world_size=1, output_dir="unused")
    assert fm_trl._unshardable(plain) is None
    assert "DeepSpeed" in fm_trl._unshardable(
        SimpleNamespace(**{**vars(plain), "deepspeed": "z3.json"})
    )
    assert "FSDP" in fm_trl._unshardable(SimpleNamespace(**{**vars(plain), "fsdp": "full_shard"}))
    assert "2 processes" in fm_trl._unshardable(SimpleNamespace(**{**vars(plain), "world_size": 2}))
    with pytest.raises(ValueError, match="cannot roll back here: 2 processes"):
        FMCallback(action="rollback", events_file=None).on_train_begin(
            SimpleNamespace(**{**vars(plain), "world_size": 2}), None, None
        )

"""fm.remediate: healthy checkpoints, plans, and the closed loop on a scripted controller."""

import pytest

from fm import diagnose, remediate, report, taxonomy


class FakeTrainer:
    """A controller that records what it was asked to do; the test drives the steps."""

    def __init__(self, **knobs):
        self.values = {
            "lr": 1e-4,
            "lr_scale": 1.0,
            "lr_cap": 1.0,
            "grad_clip": 1.0,
            "kl_coef": 0.04,
            "is_cap": 0.0,
            **knobs,
        }
        self.calls = []
        self.pinned = set()

    def restore(self, step):
        self.calls.append(("restore", step))

    def capabilities(self):
        # A setting named after a remedy is that remedy's switch.
        switches = frozenset(self.values) & set(taxonomy.REMEDIES)
        return remediate.Capabilities(
            knobs=frozenset(self.values) - switches, switches=switches, reset_moments=True
        )

    def knobs(self):
        return dict(self.values)

    def set_knobs(self, **changes):
        self.calls.append(("set_knobs", changes))
        self.values.update(changes)

    def skip(self, n):
        self.calls.append(("skip", n))

    def reset_moments(self):
        self.calls.append(("reset_moments",))

    def pin(self, step):
        self.pinned.add(step)

    def unpin(self, step):
        self.pinned.discard(step)

    def halt(self, report):
        self.calls.append(("halt", report["diagnosis"]))


def _stats(step, bad):
    # A learning-rate spike: update/param ratio and grad norm jump while bad.
    return {
        "update_param_ratio": 1e-2 if bad else 1e-3 * (1 + 0.01 * (step % 3)),
        "grad_norm": 50.0 if bad else 5.0 + 0.05 * (step % 4),
        "reward_mean": 0.5,
    }


def _drive(rem, trainer, steps, fault_from, *, persistent, start=1, executed=0, stop_after=None):
    """Steps from `start`; checkpoints every 10; the fault is active from `fault_from` (in
    steps actually executed, so a rollback does not undo a persistent fault's start).
    `stop_after` executed steps: returns (events, next step, executed) there instead."""
    events, step = [], start
    while step <= steps and not rem.halted:
        if executed == stop_after:
            return events, step, executed
        executed += 1
        bad = executed >= fault_from and (persistent or executed < fault_from + 3)
        restores = len([c for c in trainer.calls if c[0] == "restore"])
        out = rem.observe(step, _stats(step, bad), alarm=bad)
        events += out
        if step % 10 == 0:
            rem.saved(step)
        new_restores = [c for c in trainer.calls if c[0] == "restore"][restores:]
        step = new_restores[-1][1] + 1 if new_restores else step + 1
    return events


def test_checkpoints_become_healthy_after_a_quiet_window_and_only_the_latest_stay_pinned():
    trainer = FakeTrainer()
    health = remediate.Health(trainer, window=15, keep=2)
    for step in range(1, 61):
        if step % 10 == 0:
            health.saved(step)
        health.observe(step, alarm=step == 42)
    # 10 → healthy at 25, 20 at 35; 30 and 40 were in their window at the alarm of step 42;
    # 50 became healthy at 65 (not yet).
    assert health.healthy == [10, 20] and trainer.pinned == {10, 20}
    assert health.target(before=42) == 20 and health.target(before=42, skip=1) == 10
    assert health.target(before=15) == 10 and health.target(before=5) is None


def test_plan_rolls_back_first_skips_what_the_trainer_cannot_do_and_ends_in_a_halt():
    d = diagnose.Diagnosis((("OD1", 0.9), ("PG1", 0.1)), "optimization-dynamics", 0.9, ())
    assert remediate.plan(d, supported=lambda r: True) == ["rollback", "lr_cap", "lr_scale", "halt"]
    d = diagnose.Diagnosis((("CA1", 0.9), ("RF1", 0.1)), "credit-assignment", 0.9, ())
    assert remediate.plan(d, supported=lambda r: False) == ["rollback", "halt"]
    d = diagnose.Diagnosis((("OD3", 0.9), ("RF1", 0.1)), "optimization-dynamics", 0.9, ())
    assert remediate.plan(d, supported=lambda r: True) == ["rollback", "halt"]


def test_a_transient_fault_is_rolled_back_and_verified():
    trainer = FakeTrainer()
    rem = remediate.Remediator(trainer, verify_window=10, healthy_window=10, evidence_steps=2)
    events = _drive(rem, trainer, 80, fault_from=45, persistent=False)
    kinds = [e["event"] for e in events]
    assert kinds == ["diagnosis", "action", "verification"]
    assert events[0]["top"] == "OD1" and events[0]["alarm_step"] == 45
    assert events[1]["restored_to"] == 30  # 40 was still in its window at the alarm
    assert events[2]["outcome"] == "recovered" and not rem.halted
    assert ("restore", 30) in trainer.calls


def test_a_persistent_fault_escalates_through_the_plan_and_halts_with_its_diagnosis():
    trainer = FakeTrainer()
    rem = remediate.Remediator(trainer, verify_window=10, healthy_window=10, evidence_steps=2)
    events = _drive(rem, trainer, 400, fault_from=45, persistent=True)
    actions = [e for e in events if e["event"] == "action"]
    assert [a["actions"][-1]["remedy"] for a in actions] == ["rollback", "lr_cap", "lr_scale"]
    assert [a["restored_to"] for a in actions] == [30, 30, 20]  # the third goes further back
    assert trainer.values["lr_scale"] == 0.5 and trainer.values["lr_cap"] == pytest.approx(1e-4)
    assert events[-1]["event"] == "halt" and events[-1]["diagnosis"] == "OD1"
    assert trainer.calls[-1] == ("halt", "OD1") and rem.halted
    assert rem.observe(500, _stats(500, True), alarm=True) == []  # halted: nothing more


def _mismatch(step, bad):
    # A persistent sampler/trainer mismatch: mismatch_k3 jumps and stays; learning is fine.
    return {"mismatch_k3": 0.5 if bad else 1e-9, "grad_norm": 5.0, "reward_mean": 0.5}


def _drive_mismatch(*, more_trouble: bool):
    """A persistent mismatch from executed step 45 under a rollback-then-truncated-IS plan;
    with `more_trouble`, the grad norm also alarms for two steps once IS is on."""
    trainer = FakeTrainer()
    plan = remediate.fixed_plan("rollback", "truncated_is")
    rem = remediate.Remediator(
        trainer, verify_window=10, healthy_window=10, evidence_steps=2, planner=plan
    )
    events, step, executed = [], 1, 0
    while step <= 120 and not rem.halted:
        executed += 1
        bad = executed >= 45
        flagged = ["mismatch_k3"] if bad else []
        if executed in (46, 70):  # the signature's stragglers: seen in the episode, accepted
            flagged = ["mismatch_k3", "clip_ratio"]
        if more_trouble and 60 < executed < 63 and trainer.values["is_cap"] > 0:
            flagged = ["mismatch_k3", "grad_norm"]
        restores = len([c for c in trainer.calls if c[0] == "restore"])
        events += rem.observe(step, _mismatch(step, bad), alarm=bool(flagged), flagged=flagged)
        if step % 10 == 0:
            rem.saved(step)
        new = [c for c in trainer.calls if c[0] == "restore"][restores:]
        step = new[-1][1] + 1 if new else step + 1
    outcomes = [e["outcome"] for e in events if e["event"] == "verification"]
    return trainer, rem, outcomes


def test_after_a_mitigation_its_signals_no_longer_fail_verification():
    # The plain rollback fails (the mismatch persists); with truncated IS on, the mismatch
    # alarm is accepted and the attempt is verified.
    trainer, rem, outcomes = _drive_mismatch(more_trouble=False)
    assert outcomes == ["alarm_returned", "recovered"] and not rem.halted
    assert trainer.values["is_cap"] == 2.0
    assert rem.accepted == {"mismatch_k3", "mismatch_max_abs", "is_ratio_max", "is_ess",
                            "clip_ratio"}  # fmt: skip
    assert rem.state_dict()["accepted"] == sorted(rem.accepted)
    # Another signal alarming next to the accepted ones still fails the attempt: halt.
    trainer, rem, outcomes = _drive_mismatch(more_trouble=True)
    assert outcomes == ["alarm_returned", "alarm_returned"] and rem.halted


def test_a_resumed_remediator_goes_on_exactly_as_the_uninterrupted_one():
    # Stop mid-episode (after an action, before its verification), save the state as JSON,
    # load it into a fresh remediator over a fresh trainer with the same knobs: the rest of
    # the run produces the same events and the same trainer calls.
    import json

    trainer = FakeTrainer()
    rem = remediate.Remediator(trainer, verify_window=10, healthy_window=10, evidence_steps=2)
    straight = _drive(rem, trainer, 400, fault_from=45, persistent=True)

    first = FakeTrainer()
    rem1 = remediate.Remediator(first, verify_window=10, healthy_window=10, evidence_steps=2)
    head, step, executed = _drive(rem1, first, 400, 45, persistent=True, stop_after=48)
    assert head[0]["event"] == "diagnosis" and head[-1]["event"] == "action"  # mid-episode
    assert not rem1.halted
    saved = json.loads(json.dumps(rem1.state_dict()))

    second = FakeTrainer(**first.values)
    second.pinned = set(first.pinned)
    rem2 = remediate.Remediator(second, verify_window=10, healthy_window=10, evidence_steps=2)
    rem2.load_state_dict(saved)
    assert json.loads(json.dumps(rem2.state_dict())) == saved
    tail = _drive(rem2, second, 400, 45, persistent=True, start=step, executed=executed)
    assert head + tail == straight
    assert first.calls + second.calls == trainer.calls


def test_a_corrupt_rollback_target_is_dropped_and_an_earlier_one_used():
    class CorruptAt30(FakeTrainer):
        def restore(self, step):
            if step == 30:
                self.calls.append(("restore_failed", step))
                raise remediate.RestoreError("checkpoint step 30: checksum mismatch")
            super().restore(step)

    trainer = CorruptAt30()
    rem = remediate.Remediator(trainer, verify_window=10, healthy_window=10, evidence_steps=2)
    events = _drive(rem, trainer, 80, fault_from=45, persistent=False)
    kinds = [e["event"] for e in events]
    assert kinds == ["diagnosis", "restore_failed", "action", "verification"]
    assert events[1]["checkpoint"] == 30 and "checksum" in events[1]["reason"]
    assert events[2]["restored_to"] == 20 and ("restore", 30) not in trainer.calls
    assert 30 not in trainer.pinned and 30 not in rem.health.healthy


def test_a_switch_knob_makes_its_remedy_supported_and_the_attempt_turns_it_on():
    # rftjax's knobs carry the switches advantage_audit, restore_mask, verifier_failover.
    from rftjax.knobs import KNOB_NAMES

    assert {"advantage_audit", "restore_mask", "verifier_failover"} <= set(KNOB_NAMES)
    d = diagnose.Diagnosis((("CA1", 0.9), ("RF1", 0.1)), "credit-assignment", 0.9, ())
    without = remediate.Remediator(FakeTrainer())
    assert remediate.plan(d, supported=without.supported) == ["rollback", "halt"]
    trainer = FakeTrainer(advantage_audit=0.0)
    rem = remediate.Remediator(trainer)
    assert remediate.plan(d, supported=rem.supported) == ["rollback", "advantage_audit", "halt"]
    rem.episode = remediate._Episode(alarm_step=45, diagnosis=d, plan=("advantage_audit",))
    assert rem._apply("advantage_audit") == remediate.Action(
        "advantage_audit", {"advantage_audit": 1.0}
    )
    assert trainer.values["advantage_audit"] == 1.0


def test_baseline_planners_ignore_the_diagnosis_and_random_is_reproducible():
    from rftjax.config import FM_POLICIES

    assert FM_POLICIES == remediate.PLANNERS
    d = diagnose.Diagnosis((("CA1", 0.9), ("RF1", 0.1)), "credit-assignment", 0.9, ())
    supported = remediate.Remediator(FakeTrainer()).supported
    skip = remediate.planner_for("rollback_skip")
    assert skip(d, supported, 45) == ["skip_data"] * 3 + ["halt"]
    assert remediate.planner_for("rollback_lr")(d, supported, 45) == ["lr_scale"] * 3 + ["halt"]
    assert remediate.planner_for("fm")(d, supported, 45) == remediate.plan(d, supported=supported)
    rand = remediate.planner_for("random", seed=3)
    drawn = [rand(d, supported, step) for step in range(40, 60)]
    assert drawn == [rand(d, supported, step) for step in range(40, 60)]  # same seed, same draws
    remedies = {r for p in drawn for r in p[:-1]}
    assert all(p[-1] == "halt" and len(p) == 4 for p in drawn)
    assert len(remedies) > 3 and all(r == "rollback" or supported(r) for r in remedies)
    assert "advantage_audit" not in remedies  # the fake trainer has no such switch
    with pytest.raises(ValueError, match="accepted: fm, random"):
        remediate.planner_for("oracle")


def test_a_baseline_planner_drives_the_closed_loop():
    trainer = FakeTrainer()
    rem = remediate.Remediator(
        trainer,
        verify_window=10,
        healthy_window=10,
        planner=remediate.planner_for("rollback_lr"),
    )
    events = _drive(rem, trainer, 400, fault_from=45, persistent=True)
    actions = [e for e in events if e["event"] == "action"]
    assert [a["actions"][-1]["remedy"] for a in actions] == ["lr_scale"] * len(actions)
    assert trainer.values["lr_scale"] == 0.5 ** len(actions) and events[-1]["event"] == "halt"


class KnoblessTrainer(FakeTrainer):
    """A trainer that can roll back, skip data and halt, and nothing else."""

    def __init__(self):
        super().__init__()
        self.values = {}

    def capabilities(self):
        return remediate.Capabilities()


def test_a_trainer_lacking_a_knob_is_told_which_remedies_are_unavailable_and_still_rolls_back():
    trainer = FakeTrainer()
    del trainer.values["lr_cap"]  # OD1's first remedy needs it
    rem = remediate.Remediator(trainer, verify_window=10, healthy_window=10, evidence_steps=2)
    events = _drive(rem, trainer, 400, fault_from=45, persistent=True)
    diagnosis = events[0]
    assert diagnosis["top"] == "OD1" and diagnosis["plan"] == ["rollback", "lr_scale", "halt"]
    assert diagnosis["unavailable"] == [
        {"remedy": "lr_cap", "type": "OD1", "reason": "the trainer has no knob lr_cap"}
    ]
    actions = [e for e in events if e["event"] == "action"]
    assert [a["actions"][-1]["remedy"] for a in actions] == ["rollback", "lr_scale"]
    assert events[-1]["event"] == "halt" and trainer.calls[-1] == ("halt", "OD1")


def test_a_trainer_with_no_knobs_still_gets_rollback_then_a_halt_with_a_report():
    trainer = KnoblessTrainer()
    rem = remediate.Remediator(trainer, verify_window=10, healthy_window=10, evidence_steps=2)
    events = _drive(rem, trainer, 400, fault_from=45, persistent=True)
    assert events[0]["plan"] == ["rollback", "halt"]
    assert {u["remedy"] for u in events[0]["unavailable"]} == {"lr_cap", "lr_scale"}
    assert [e["event"] for e in events] == ["diagnosis", "action", "verification", "halt"]
    assert ("restore", 30) in trainer.calls and trainer.calls[-1] == ("halt", "OD1")
    assert not any(c[0] == "set_knobs" for c in trainer.calls)


def test_availability_names_what_is_missing_and_a_controller_must_declare_capabilities():
    caps = remediate.Capabilities(knobs=frozenset({"lr", "lr_scale"}), switches=frozenset())
    assert remediate.availability("lr_scale", caps) is None
    assert remediate.availability("lr_cap", caps) == "the trainer has no knob lr_cap"
    assert (
        remediate.availability("resync_sampler", caps) == "the trainer has no switch resync_sampler"
    )
    assert "temperature" in remediate.availability("restore_sampler", caps)
    assert remediate.availability("reset_moments", caps) is not None
    for always in ("rollback", "skip_data", "halt"):
        assert remediate.availability(always, remediate.Capabilities()) is None
    with pytest.raises(ValueError, match="unknown remedy"):
        remediate.availability("pray", caps)

    class Undeclared(FakeTrainer):
        capabilities = None

    with pytest.raises(TypeError, match="capabilities"):
        remediate.Remediator(Undeclared())
    liar = FakeTrainer()
    liar.capabilities = lambda: remediate.Capabilities(knobs=frozenset({"nope"}))
    with pytest.raises(ValueError, match="nope"):
        remediate.Remediator(liar)


def _scripted(*ranking):
    """A diagnoser that returns `ranking` whatever the records say."""
    d = diagnose.Diagnosis(tuple(ranking), taxonomy.get(ranking[0][0]).family, ranking[0][1], ())
    return lambda records, index, flagged=(): d


UNSURE = (("OD1", 0.4), ("PG1", 0.35), ("OD2", 0.2), ("CA1", 0.05))


def test_an_unsure_diagnosis_only_rolls_back_then_halts_naming_the_candidates():
    trainer = FakeTrainer()
    rem = remediate.Remediator(trainer, diagnoser=_scripted(*UNSURE), verify_window=10,
                               healthy_window=10, evidence_steps=2)  # fmt: skip
    events = _drive(rem, trainer, 400, fault_from=45, persistent=True)
    assert [e["event"] for e in events] == ["diagnosis", "action", "verification", "halt"]
    d = events[0]
    # 0.4 < 0.5: unsure; 0.4 + 0.35 + 0.2 = 0.95 is the first sum to reach 0.9.
    assert d["unsure"] and d["candidates"] == ["OD1", "PG1", "OD2"]
    assert d["plan"] == ["rollback", "halt"] and "unavailable" not in d
    assert events[1]["actions"] == [{"remedy": "rollback", "knobs": {}}]
    assert events[-1]["candidates"] == ["OD1", "PG1", "OD2"]
    assert "OD1, PG1, OD2" in events[-1]["summary"]
    # Nothing specific to a guess: no knob was touched, only a restore and the halt.
    assert [c[0] for c in trainer.calls] == ["restore", "halt"]
    story = [report.describe(e) for e in events]
    assert story[0] == (
        "step 47  diagnosis unsure: one of OD1, PG1, OD2 (best OD1 at 40%), plan: rollback, halt"
    )
    assert story[-1].endswith("HALT: the plan is used up (unsure: one of OD1, PG1, OD2)")


def test_an_unsure_diagnosis_of_a_transient_fault_recovers_by_rollback_alone():
    trainer = FakeTrainer()
    rem = remediate.Remediator(trainer, diagnoser=_scripted(*UNSURE), verify_window=10,
                               healthy_window=10, evidence_steps=2)  # fmt: skip
    events = _drive(rem, trainer, 80, fault_from=45, persistent=False)
    assert [e["event"] for e in events] == ["diagnosis", "action", "verification"]
    assert events[-1]["outcome"] == "recovered" and not rem.halted
    assert [c[0] for c in trainer.calls] == ["restore"]


def test_the_unsure_threshold_is_a_setting():
    # The same diagnosis above a lower threshold is acted on: OD1's remedies.
    trainer = FakeTrainer()
    rem = remediate.Remediator(trainer, diagnoser=_scripted(*UNSURE), verify_window=10,
                               healthy_window=10, evidence_steps=2, unsure_below=0.3)  # fmt: skip
    events = _drive(rem, trainer, 400, fault_from=45, persistent=True)
    assert not events[0]["unsure"] and "candidates" not in events[0]
    assert events[0]["plan"][:3] == ["rollback", "lr_cap", "lr_scale"]
    assert any(c[0] == "set_knobs" for c in trainer.calls)
    d = diagnose.Diagnosis(UNSURE, "optimization-dynamics", 0.6, ())
    assert remediate.plan(d, supported=lambda r: True) == ["rollback", "halt"]
    assert remediate.plan(d, supported=lambda r: True, unsure_below=0.0)[1] == "lr_cap"
    with pytest.raises(ValueError, match=r"confidence in \[0, 1\], got 1.5"):
        remediate.Remediator(FakeTrainer(), unsure_below=1.5)


def test_unsure_table_by_hand():
    from fm.faultbench import diagnosis as fb_diagnosis

    rankings = [
        (("OD1", 0.9), ("OD2", 0.1)),  # OD1: right, sure
        (("PG1", 0.4), ("OD1", 0.35), ("OD2", 0.2), ("CA1", 0.05)),  # OD1: wrong, truth named
        (("OD4", 0.45), ("CA2", 0.3), ("CA3", 0.2), ("PG1", 0.05)),  # PG1: wrong, not named
        (("CA1", 0.55), ("CA2", 0.45)),  # CA1: right; unsure only below 0.6
    ]
    truth = ["OD1", "OD1", "PG1", "CA1"]
    data = [
        fb_diagnosis.Example(f"r{i}", t, "moderate", [{"i": i}], 0, ()) for i, t in enumerate(truth)
    ]

    def scripted(window, index, flagged=()):
        r = rankings[int(window[0]["i"])]
        return diagnose.Diagnosis(r, taxonomy.get(r[0][0]).family, r[0][1], ())

    half, more = fb_diagnosis.unsure_table(scripted, data, thresholds=(0.5, 0.6))
    assert half == {"threshold": 0.5, "unsure_share": 0.5, "top1_sure": 1.0,
                    "top1_unsure": 0.0, "candidates_hold_truth": 0.5}  # fmt: skip
    assert more["unsure_share"] == 0.75 and more["top1_sure"] == 1.0
    assert more["top1_unsure"] == pytest.approx(1 / 3)
    assert more["candidates_hold_truth"] == pytest.approx(2 / 3)

"""fm.report: the closed loop's history read back from events.jsonl, and the PNG."""

import json
import sys

import pytest

from fm import report, report_figure

EVENTS = [
    {"step": 40, "event": "alarm", "signals": ["check_reference", "kl_ref_k1"]},
    {"step": 41, "event": "alarm", "signals": ["check_reference"]},
    {"step": 42, "event": "diagnosis", "alarm_step": 40, "top": "OD3",
     "ranking": [["OD3", 0.97], ["OD1", 0.02]]},
    {"step": 42, "event": "action", "attempt": 1, "restored_to": 30,
     "actions": [{"remedy": "rollback", "knobs": {}}, {"remedy": "lr_cap", "knobs": {}}]},
    {"step": 31, "event": "verification", "outcome": "alarm_returned"},
    {"step": 31, "event": "halt", "reason": "the plan is used up", "diagnosis": "OD3"},
]  # fmt: skip


def _metrics(steps=45):
    return [
        {"step": s, "reward_mean": 0.1 * s, "kl_ref_k1": 0.01, "check_reference": float(s >= 40)}
        for s in range(1, steps + 1)
    ]


def test_timeline_reads_alarms_diagnoses_rollbacks_and_the_halt():
    line = report.timeline(EVENTS)
    assert line.alarms == [(40, ("check_reference", "kl_ref_k1")), (41, ("check_reference",))]
    assert line.diagnoses == [(42, "OD3", 0.97)]
    assert line.rollbacks == [(42, 30, ("rollback", "lr_cap"))]
    assert line.halt == (31, "OD3")
    assert report.timeline([]) == report.Timeline([], [], [], None)


def test_signals_alarmed_most_come_first_then_the_defaults_that_were_logged():
    line = report.timeline(EVENTS)
    assert report.choose_signals(_metrics(), line) == ["check_reference", "kl_ref_k1",
                                                       "reward_mean"]  # fmt: skip
    assert report.choose_signals(_metrics(), line, limit=1) == ["check_reference"]
    assert report.choose_signals(_metrics(), report.timeline([])) == ["reward_mean", "kl_ref_k1"]


def test_report_writes_a_png_of_a_run_folder_and_refuses_an_empty_one(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _metrics()))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    path = report.report(str(run))
    assert path == str(run / "report.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no metrics.jsonl records"):
        report.report(str(tmp_path))
    with pytest.raises(ValueError, match="signals \\['not_logged'\\] are not in the metrics"):
        report.report(str(run), str(tmp_path / "x.png"), signals=["not_logged"])


# A rollback at step 42 back to 30: steps 31..42 were abandoned; their values (10 + step) differ
# from the kept timeline's (0.1 * step), so a marker drawn on the branch can be told apart.
ABANDONED = [
    {"step": s, "reward_mean": 10.0 + s, "check_reference": float(s >= 40), "fault_active": 1.0,
     "rollback_step": 42, "rolled_back_to": 30}
    for s in range(31, 43)
]  # fmt: skip


def test_branches_group_by_rollback_and_keep_the_last_copy_of_a_replayed_step():
    again = {**ABANDONED[0], "reward_mean": -1.0}  # a resumed run wrote step 31 again
    other = {"step": 5, "reward_mean": 0.0, "rollback_step": 6, "rolled_back_to": 4}
    parts = report.branches([*ABANDONED, again, other])
    assert [(b.rollback_step, b.rolled_back_to) for b in parts] == [(42, 30), (6, 4)]
    assert [r["step"] for r in parts[0].records] == list(range(31, 43))
    assert parts[0].records[0]["reward_mean"] == -1.0
    assert report.branches([]) == []


def test_fault_onset_from_the_summary_else_from_the_first_pass():
    kept = [{"step": s, "fault_active": float(s > 30)} for s in range(1, 46)]  # clock ran on
    parts = report.branches(ABANDONED)
    assert report.fault_onset({"fault": {"type": "OD1", "onset": 33}}, kept, parts) == 33
    # Without a summary: the first pass is steps 1..30 kept, then the branch 31..42.
    assert report.fault_onset(None, kept, parts) == 31
    assert report.fault_onset({"fault": "none"}, [{"step": 1, "fault_active": 0.0}]) is None


def test_robust_limits_leave_out_the_transient_and_far_outliers_and_go_log_for_spikes():
    values = [100.0] + [float(v) for v in range(1, 11)]  # step 1's transient, then 1..10
    # 1..10: range 9, padded by 8% (0.72).
    assert report_figure.robust_limits(values, skip=1) == pytest.approx((0.28, 10.72, False))
    # A far outlier inside: quartiles 3.5, 8.5 of 1..10 + 1000, fence 8.5 + 30: left out.
    outlier = report_figure.robust_limits([*values[1:], 1000.0])
    assert outlier == pytest.approx((0.28, 10.72, False))
    # Extra values within reach (10 + 3 * 9 = 37) are taken in: 1..30, padded by 2.32.
    within = report_figure.robust_limits(values, [30.0], skip=1)
    assert within == pytest.approx((-1.32, 32.32, False))
    # Beyond reach and all positive: a log scale that holds them, padded by x1.3.
    assert report_figure.robust_limits(values, [50.0], skip=1) == pytest.approx(
        (1 / 1.3, 65.0, True)
    )
    # Beyond reach with a negative value: clipped at 1 - 27 = -26, then padded by 2.88.
    assert report_figure.robust_limits(values, [-50.0], skip=1) == pytest.approx(
        (-28.88, 12.88, False)
    )
    assert report_figure.robust_limits([float("nan")]) is None
    assert report_figure.robust_limits([0.0, 0.0]) == (-1.0, 1.0, False)
    assert report_figure.robust_limits([2.0, 2.0]) == pytest.approx((1.8, 2.2, False))


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_figure_draws_the_abandoned_branch_and_marks_every_event_with_a_legend():
    pytest.importorskip("matplotlib")
    metrics = _metrics()
    metrics[0]["reward_mean"] = 1e4  # a start-up transient that must not set the scale
    summary = {"fault": {"type": "OD3", "severity": "severe", "onset": 38}}
    events = [{"step": 38, "event": "alarm", "signals": ["reward_mean"]}, *EVENTS]
    fig = report_figure.figure(metrics, events, ["reward_mean", "check_reference"],
                               abandoned=ABANDONED, summary=summary)  # fmt: skip
    # The strip, then a row a signal: the whole run and the steps where fm acted (20..45).
    strip, reward_all, reward, check_all, check = fig.axes
    assert reward.get_xlim() == (20, 45) and strip.get_xlim() == (20, 45)
    for ax in (reward_all, reward):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        branch = lines["abandoned branch (rolled back)"]
        assert list(branch.get_xdata()) == list(range(30, 43))  # joined at the step restored
        assert list(branch.get_ydata()) == [3.0] + [10.0 + s for s in range(31, 43)]
        assert branch.get_alpha() < 1.0  # faded next to the kept timeline
        assert list(lines["kept timeline"].get_xdata()) == list(range(1, 46))
        # The alarm at 38 was raised on the branch the rollback later dropped: marked there.
        alarm = lines["alarm on reward_mean"]
        assert list(alarm.get_xdata()) == [38] and list(alarm.get_ydata()) == [48.0]
    assert reward_all.get_ylim()[1] < 100  # not set by step 1's 1e4
    assert reward_all.get_legend() is None and check_all.get_legend() is None
    # check_reference's alarms at 40 and 41, on its panel only.
    alarm = {ln.get_label(): ln for ln in check.get_lines()}["alarm on check_reference"]
    assert list(alarm.get_xdata()) == [40, 41] and list(alarm.get_ydata()) == [1.0, 1.0]
    assert "alarm on check_reference" not in _legend(reward)
    for ax in (reward, check):
        legend = _legend(ax)
        for entry in (
            "kept timeline",
            "abandoned branch (rolled back)",
            "fault onset",
            "diagnosis",
            "rollback (replayed steps shaded)",
            "verified: alarm came back",
            "halt",
        ):
            assert entry in legend, (entry, legend)
        vlines = {ln.get_label(): ln.get_xdata()[0] for ln in ax.get_lines()}
        assert vlines["fault onset"] == 38 and vlines["diagnosis"] == 42
        assert vlines["halt"] == 31
    # The strip names the events in the order they happened.
    assert sorted(t.get_text() for t in strip.texts) == [
        "1. fault onset OD3 (severe)",
        "2. diagnosis OD3 97%",
        "3. rollback 42→30\n+ lr cap",
        "4. alarm came back",
        "5. HALT",
    ]
    assert fig._suptitle.get_text() == "fault OD3 (severe) from step 38"
    # A run without events: no strip and no zoom, a panel a signal.
    quiet = report_figure.figure(_metrics(), [])
    assert [ax.get_ylabel() for ax in quiet.axes] == ["reward_mean", "kl_ref_k1"]


def test_without_matplotlib_one_line_names_the_install_command(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _metrics()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises
    with pytest.raises(SystemExit) as exit_:
        report.main([str(run)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err, err

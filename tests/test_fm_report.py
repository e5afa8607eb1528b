"""fm.report: the closed loop's history read back from events.jsonl, and the PNG."""

import json

import pytest

from fm import report

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

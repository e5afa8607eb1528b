"""fm.logs and fm.analyze: reading each trainer's logs into fm signals, hand-written logs."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from fm import analyze, detect
from fm.logs import load, mappings, monitor, readers, views
from fm.logs.readers import LogError


def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _trl_entries(steps=3, length_key="completions/mean_length"):
    return [
        {"loss": 0.1, "grad_norm": 1.0 + s, "learning_rate": 1e-5, "reward": 0.1 * s,
         "reward_std": 0.2, "frac_reward_zero_std": 0.0, length_key: 10.0 + s, "kl": 0.01,
         "entropy": 2.0, "clip_ratio/region_mean": 0.0, "rewards/acc/mean": 0.1 * s,
         "epoch": 0.1 * s, "step": s}
        for s in range(1, steps + 1)
    ]  # fmt: skip


def test_trl_trainer_state_with_the_older_completion_length_name(tmp_path):
    history = _trl_entries(length_key="completion_length")
    history.append({"train_runtime": 3.0, "train_loss": 0.1, "step": 3})  # the summary entry
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": history, "global_step": 3}))
    run = load.load([str(tmp_path)])  # a folder resolves to its trainer_state.json
    assert run.format == "trl" and run.table.tag == "trl-v1"
    assert run.mapped.used["length_mean"] == "completion_length"
    assert [r["length_mean"] for r in run.records] == [11.0, 12.0, 13.0]
    assert [r["reward_mean"] for r in run.records] == pytest.approx([0.1, 0.2, 0.3])
    assert run.mapped.unknown == ()
    assert {"loss", "rewards/acc/mean", "clip_ratio/region_mean", "train_runtime"} <= set(
        run.mapped.unused
    )


def test_trl_json_lines_prefer_the_newer_name_and_list_unknown_metrics(tmp_path):
    entries = _trl_entries()
    for e in entries:
        e["completion_length"] = -1.0  # both names: the newer one wins
        e["my/custom_metric"] = 5.0
        e["note"] = "text"
    run = load.load([_write(tmp_path / "log.jsonl", entries)], "trl")
    assert run.mapped.used["length_mean"] == "completions/mean_length"
    assert [r["length_mean"] for r in run.records] == [11.0, 12.0, 13.0]
    assert run.mapped.unknown == ("my/custom_metric",)
    assert run.text == ("note",)


def test_verl_file_logger(tmp_path):
    lines = [
        {"step": s, "data": {"critic/score/mean": 0.5 + s, "actor/entropy": 1.0,
                             "actor/grad_norm": 0.3, "response_length/mean": 100.0,
                             "response_length/clip_ratio": 0.0, "actor/pg_clipfrac": 0.01,
                             "timing_s/gen": 2.0, "rollout_corr/k3_kl": 1e-4}}
        for s in (1, 2)
    ]  # fmt: skip
    run = load.load([_write(tmp_path / "metrics.jsonl", lines)])
    assert run.format == "verl" and run.steps == [1, 2]
    assert [r["reward_mean"] for r in run.records] == [1.5, 2.5]
    assert run.mapped.used["mismatch_k3"] == "rollout_corr/k3_kl"
    assert run.mapped.unknown == ()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "data": {"actor/entropy": 1}}\n{"step": 2, "metrics": {}}\n')
    with pytest.raises(LogError, match=r"bad.jsonl:2: .*verl"):
        load.load([str(bad)], "verl")


def test_openrlhf_step_records_with_the_train_prefix(tmp_path):
    lines = [{"train/global_step": s, "train/reward": 0.2 * s, "train/kl": 0.01,
              "train/response_length": 50.0, "train/policy_loss": 0.3, "train/actor_lr": 1e-6,
              "train/ppo_clip_ratio": 0.0} for s in (1, 2)]  # fmt: skip
    run = load.load([_write(tmp_path / "steps.jsonl", lines)], "openrlhf")
    assert run.steps == [1, 2] and run.mapped.unknown == ()
    assert [r["reward_mean"] for r in run.records] == pytest.approx([0.2, 0.4])
    assert run.records[0]["lr"] == 1e-6


def test_openrlhf_rollout_records_are_aggregated_a_step(tmp_path):
    rows = [  # step 1: two groups of two rollouts; step 2: one group
        {"step": 1, "prompt_id": 0, "reward": 1.0, "response_length": 10, "tool_call_count": 2,
         "tool_error_count": 1, "repetition_ratio": 0.1},
        {"step": 1, "prompt_id": 0, "reward": 1.0, "response_length": 20, "tool_call_count": 2,
         "tool_error_count": 0, "repetition_ratio": 0.3},
        {"step": 1, "prompt_id": 1, "reward": 0.0, "response_length": 30, "tool_call_count": 0,
         "tool_error_count": 0, "repetition_ratio": 0.2},
        {"step": 1, "prompt_id": 1, "reward": 1.0, "response_length": 40, "tool_call_count": 4,
         "tool_error_count": 3, "repetition_ratio": 0.2},
        {"step": 2, "prompt_id": 2, "reward": 0.0, "response_length": 5, "tool_call_count": 1,
         "tool_error_count": 0, "repetition_ratio": 0.0},
        {"step": 2, "prompt_id": 2, "reward": 0.5, "response_length": 7, "tool_call_count": 1,
         "tool_error_count": 0, "repetition_ratio": 0.0},
    ]  # fmt: skip
    run = load.load([_write(tmp_path / "rollouts.jsonl", rows)], "openrlhf")
    first, second = run.records
    assert first["reward_mean"] == 0.75 and first["reward_std"] == pytest.approx(math.sqrt(3) / 4)
    assert first["length_mean"] == 25.0 and first["repetition_ratio"] == pytest.approx(0.2)
    assert first["tool_error_rate"] == 0.5  # (1 + 0 + 0 + 3) / (2 + 2 + 0 + 4)
    assert first["tool_calls_mean"] == 2.0
    assert first["frac_zero_std_groups"] == 0.5  # group 0 all 1.0; group 1 mixed
    assert second["reward_std"] == 0.25 and second["frac_zero_std_groups"] == 0.0


def test_rftjax_metrics_jsonl(tmp_path):
    lines = [{"step": s, "reward_mean": 0.5, "kl_ref_k1": 0.01, "check_weights": 0.0,
              "flag/reward_mean": False, "loss": 0.2} for s in (1, 2, 3)]  # fmt: skip
    run = load.load([_write(tmp_path / "metrics.jsonl", lines)])
    assert run.format == "rftjax" and run.mapped.unknown == ()
    assert set(run.signals) == {"reward_mean", "kl_ref_k1", "check_weights"}


def test_tensorboard_scalars_written_by_tensorboardx(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    for s in range(1, 6):  # TRL's tensorboard reporting: its log names under train/
        writer.add_scalar("train/reward", 0.1 * s, s)
        writer.add_scalar("train/kl", 0.01 * s, s)
        writer.add_scalar("train/completions/mean_length", 7.0, s)
        writer.add_text("train/sample", "hello", s)
    writer.close()
    run = load.load([str(tmp_path / "tb")])
    assert run.source == "tensorboard" and run.format == "trl"
    assert run.steps == [1, 2, 3, 4, 5]
    assert [r["reward_mean"] for r in run.records] == pytest.approx([0.1 * s for s in range(1, 6)])
    assert [r["kl_ref_k1"] for r in run.records] == pytest.approx([0.01 * s for s in range(1, 6)])


def test_tensorboard_truncated_file_is_an_error(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("reward", 1.0, 1)
    writer.close()
    (path,) = readers.event_files(str(tmp_path))
    data = open(path, "rb").read()
    cut = tmp_path / "cut" / "events.out.tfevents.cut"
    cut.parent.mkdir()
    cut.write_bytes(data[:-3])
    with pytest.raises(LogError, match="cut short"):
        load.load([str(cut)], "tensorboard")


def test_clear_errors(tmp_path):
    with pytest.raises(LogError, match="no such file"):
        load.load([str(tmp_path / "absent.jsonl")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LogError, match="empty"):
        load.load([str(empty)], "trl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "reward": 0.1}\n\n{"step": 2, "reward": 0.2\n')
    with pytest.raises(LogError, match=r"bad.jsonl:3: malformed line"):
        load.load([str(bad)], "trl")
    listed = tmp_path / "list.jsonl"
    listed.write_text("[1, 2]\n")
    with pytest.raises(LogError, match=r"list.jsonl:1: a JSON list, expected an object"):
        load.load([str(listed)], "openrlhf")
    none = _write(tmp_path / "none.jsonl", [{"step": 1, "foo": 1.0}, {"step": 2, "bar": 2.0}])
    with pytest.raises(LogError, match="none of the metrics fm needs"):
        load.load([none], "trl")
    with pytest.raises(LogError, match="none of the metrics fm needs"):
        load.load([none])
    with pytest.raises(LogError, match="unknown format"):
        load.load([none], "wandb")
    lr_only = _write(tmp_path / "lr.jsonl", [{"step": 1, "learning_rate": 1e-5}])
    with pytest.raises(LogError, match="none of the logged statistics"):
        analyze.analyze([lr_only], "trl")


def test_sparse_signals_are_listed_not_monitored(tmp_path):
    entries = _trl_entries(steps=6)
    for e in entries[1:]:
        del e["kl"]  # kl at 1 of 6 steps
    entries[2]["reward"] = None  # TRL's "no sample scored": NaN, still counted as a gap
    run = load.load([_write(tmp_path / "log.jsonl", entries)], "trl")
    assert run.sparse == {"kl_ref_k1": 1}
    assert "kl_ref_k1" not in run.signals and "reward_mean" in run.signals
    assert math.isnan(run.records[2]["reward_mean"])


def test_every_table_maps_to_names_the_diagnoser_or_detector_knows():
    from fm import diagnose as dg

    known = set(dg.FEATURES) | {s.name for s in detect.default_signals()} | set(mappings._FM_STATS)
    for table in mappings.TABLES.values():
        assert set(table.signals) <= known, table.format
        for signal in table.notes:
            assert signal in table.signals, (table.format, signal)


def test_view_of_a_reward_only_log():
    v = views.view(["reward_mean"])
    assert set(v.visible) == {"RF1", "RF2", "RF3", "OD3", "CA1"}  # TE types need tool signals
    assert v.groups == (("RF1", "RF3", "OD3", "CA1"),)  # all read as "reward_mean down"
    assert v.twins("RF1") == ("RF3", "OD3", "CA1") and v.twins("RF2") == ()
    assert "PG1" in v.invisible and "TE1" in v.invisible
    tools = views.view(["reward_mean", "tool_error_rate"])
    assert "TE1" in tools.visible and "TE2" not in tools.visible  # TE2 needs tool_aborted_frac


def test_monitor_flags_equal_the_detectors_replay():
    """The monitor runs fm.detect's detector: its flags equal `detect.replay` over the same
    values (a spike at step 30 and a NaN at step 40 included)."""
    rng = np.random.default_rng(0)
    t = 50
    series = {
        "reward_mean": 0.5 + 0.01 * rng.standard_normal(t),
        "grad_norm": 1 + 0.05 * rng.standard_normal(t),
    }
    series["reward_mean"][29] = 5.0
    series["grad_norm"][39] = np.nan
    mon = monitor.Monitor(("reward_mean", "grad_norm", "lr"))
    flagged = []
    for i in range(t):
        events = mon.observe(i + 1, {k: float(v[i]) for k, v in series.items()})
        flagged.append(sorted(s for e in events if e["event"] == "alarm" for s in e["signals"]))
    outs, _ = detect.replay(mon.detector, {k: jnp.asarray(v) for k, v in series.items()})
    rows = np.asarray(outs.flags)
    expected = [sorted(n for n, f in zip(mon.watched, row, strict=True) if f) for row in rows]
    assert flagged == expected
    assert flagged[29] == ["reward_mean"] and flagged[39] == ["grad_norm"]
    assert mon.watched == ("reward_mean", "grad_norm")  # lr goes to the diagnoser only
    assert all(t in mon.view.visible for t, _ in mon.diagnoses[0]["ranking"])


def test_cli_writes_the_report_and_exits_by_outcome(tmp_path, capsys):
    rng = np.random.default_rng(1)
    entries = [{"step": s, "reward": 0.1 + 0.01 * rng.standard_normal() + (0.8 if s >= 30 else 0),
                "kl": 0.01, "entropy": 2.0 + 0.01 * rng.standard_normal(), "grad_norm": 1.0}
               for s in range(1, 41)]  # fmt: skip
    log = _write(tmp_path / "log.jsonl", entries)
    out = tmp_path / "out"
    assert analyze.main([log, "--format", "trl", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alarm_steps"][0] == 30 and summary["diagnoses"][0]["family"] == "reward"
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert events[0] == {**events[0], "step": 30, "event": "alarm", "signals": ["reward_mean"]}
    assert (
        "Cannot see **PG2**: none of mismatch_k3, is_ratio_max, is_ess"
        in (out / "report.md").read_text()
    )
    assert (out / "report.png").stat().st_size > 0
    clean = _write(tmp_path / "clean.jsonl", [{**e, "reward": 0.1} for e in entries])
    assert analyze.main([clean, "--out", str(tmp_path / "o2")]) == 0
    assert analyze.main([str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err


def test_analyze_imports_no_torch_nor_the_trainer(tmp_path):
    """fm.analyze reads TensorBoard files without importing torch (tensorboardX's package
    would), rftjax, faults or launch; tensorboardX's writer still works after it."""
    import subprocess
    import sys

    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for s in range(1, 4):
        writer.add_scalar("train/reward", 0.5, s)
    writer.close()
    code = (
        "import sys; from fm import analyze; from fm.logs import load; "
        f"run = load.load([{str(tmp_path)!r}]); assert len(run.records) == 3; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'rftjax', 'faults', 'launch', 'trl')]; assert not bad, bad; "
        "from tensorboardX import SummaryWriter"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_monitor_compiles_once_for_every_step_and_every_monitor():
    names = ("reward_mean", "entropy_mean", "lr")
    first = monitor.Monitor(names)
    for step in range(1, 6):
        first.observe(step, {"reward_mean": 0.1 * step, "entropy_mean": 2.0, "lr": 1e-5})
    second = monitor.Monitor(names)  # another run over the same signals
    second.observe(1, {"reward_mean": None, "entropy_mean": 2.0, "lr": 1e-5})
    assert second._update is first._update
    assert first._update._cache_size() == 1


def test_per_view_evaluation_sees_only_what_the_view_logs():
    """A PG1 run whose sampler/trainer mismatch (mismatch_k3) jumps at step 40, and its clean
    twin: the full and verl views (verl logs rollout_corr/k3_kl) detect it at once with a
    policy-generation diagnosis; TRL's table has no k3 mismatch statistic: missed."""
    from fm.faultbench import records as rec
    from fm.logs import evaluate

    rng = np.random.default_rng(0)
    t, onset = 60, 40
    steps: dict[str, list] = {"run_id": [], "step": []}
    for run in ("clean", "pg1"):
        mismatch = 1e-6 * np.abs(rng.standard_normal(t))
        if run == "pg1":
            mismatch[onset - 1 :] += 0.5
        columns = {
            "reward_mean": 0.5 + 0.01 * rng.standard_normal(t),
            "entropy_mean": 2.0 + 0.01 * rng.standard_normal(t),
            "mismatch_k3": mismatch,
        }
        steps["run_id"] += [run] * t
        steps["step"] += list(range(1, t + 1))
        for k, v in columns.items():
            steps.setdefault(k, []).extend(v)
    steps = {k: np.asarray(v) for k, v in steps.items()}
    manifest = {
        "run_id": np.array(["clean", "pg1"], object), "split": np.array(["eval"] * 2, object),
        "type": np.array(["none", "PG1"], object),
        "family": np.array(["none", "policy-generation"], object),
        "severity": np.array(["none", "severe"], object), "onset": np.array([-1, onset]),
    }  # fmt: skip
    records = rec.Records(manifest, steps, rec.run_slices(steps["run_id"]))
    labels = rec.labels(manifest, records.runs, "eval")
    for view, seen in (("full", True), ("verl", True), ("trl", False)):
        r = evaluate.evaluate_view(records, labels, view, window=20)
        d = r["detection"]
        assert d["recall"] == (1.0 if seen else 0.0), (view, d)
        assert d["clean_false_alarms"] == 0
        if seen:
            assert d["delay_median"] == 0
            assert r["diagnosis"]["family_macro"] == 1.0
        else:
            assert "PG1" not in r["visible_types"] and r["diagnosis"]["examples"] == 0
    assert "| trl | 2 | " in evaluate.markdown({"views": {"trl": evaluate.evaluate_view(
        records, labels, "trl", window=20)}})  # fmt: skip

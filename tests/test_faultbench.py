"""FaultBench: event-level scoring worked by hand, the baselines' rules on hand-made series,
campaign spec validation, the built-in campaigns' sizes, and `generate --spec pipeline` followed
by `evaluate` end to end."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import faults
from fm.faultbench import baselines, plots, records, schema, scoring
from rftjax import campaign
from rftjax.campaign import dataset as campaign_records
from rftjax.train.logs import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _alarms(steps, at):
    a = np.zeros(steps, bool)
    a[np.asarray(at, int) - 1] = True  # steps are 1-based
    return a


# Scoring ------------------------------------------------------------------------------------


def test_alarm_before_onset_is_a_false_alarm_and_the_first_alarm_in_the_window_detects():
    out = scoring.run_outcome(_alarms(30, [3, 12, 13]), onset=10, window=5)
    assert out == scoring.Outcome(detected=True, delay=2, false_alarms=1, clean_steps=0)


def test_window_is_half_open_an_alarm_at_onset_plus_w_is_too_late():
    # W = 5, onset 10: steps 10..14 detect; step 15 = onset + W neither detects nor is false.
    late = scoring.run_outcome(_alarms(30, [15, 20]), onset=10, window=5)
    assert late == scoring.Outcome(False, None, 0, 0)
    last = scoring.run_outcome(_alarms(30, [14]), onset=10, window=5)
    assert last.detected and last.delay == 4
    at_onset = scoring.run_outcome(_alarms(30, [10]), onset=10, window=5)
    assert at_onset.delay == 0


def test_every_alarm_step_of_a_clean_run_is_a_false_alarm():
    out = scoring.run_outcome(_alarms(20, [1, 5, 6]), onset=None, window=5)
    assert out == scoring.Outcome(False, None, 3, 20)


def _hand_set():
    L = scoring.RunLabel
    labels = [
        L("c1", "none", "none", "none", -1, 100),
        L("c2", "none", "none", "none", -1, 100),
        L("r1", "RF1", "reward", "subtle", 40, 100),
        L("r2", "RF3", "reward", "severe", 40, 100),
        L("p1", "PG1", "policy-generation", "severe", 60, 100),
        L("p2", "PG2", "policy-generation", "subtle", 60, 100),
    ]
    alarms = {
        "c1": _alarms(100, [50]),  # 1 clean false alarm
        "c2": _alarms(100, []),
        "r1": _alarms(100, [45]),  # delay 5
        "r2": _alarms(100, [10, 41]),  # 1 false alarm before onset, delay 1
        "p1": _alarms(100, [75]),  # after the window (60 + 10): missed, not false
        "p2": _alarms(100, [60]),  # delay 0
    }
    return labels, alarms


def test_scores_by_hand_overall_family_and_severity():
    labels, alarms = _hand_set()
    s = scoring.score(labels, alarms, window=10)
    o = s["overall"]
    # 4 events, 3 detected; false alarms: 1 clean + 1 before onset.
    assert (o["events"], o["detected"], o["clean_false_alarms"]) == (4, 3, 1)
    assert o["recall"] == 0.75 and o["precision"] == pytest.approx(3 / 5)
    assert o["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert o["false_alarms_per_1000_clean_steps"] == pytest.approx(1000 * 1 / 200)
    # Delays [5, 1, 0]: median 1; p90 interpolates between 1 and 5 at 0.8: 4.2.
    assert o["delay_median"] == 1 and o["delay_p90"] == pytest.approx(4.2)
    # Reward: 2 of 2 detected; its own false alarm 1 + half of the clean one (2 of 4 events).
    reward = s["by_family"]["reward"]
    assert reward["recall"] == 1.0 and reward["precision"] == pytest.approx(2 / 3.5)
    assert reward["delay_median"] == 3.0 and reward["false_alarms_before_onset"] == 1
    pg = s["by_family"]["policy-generation"]
    assert pg["recall"] == 0.5 and pg["precision"] == pytest.approx(1 / 1.5)
    assert pg["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert s["by_severity"]["subtle"]["precision"] == pytest.approx(2 / 2.5)
    assert s["by_severity"]["severe"]["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert s["by_type"]["PG1"]["detected"] == 0


def test_events_start_when_the_fault_first_acted_and_never_acted_runs_are_left_out():
    manifest = {
        "run_id": np.array(["c", "a", "b", "n"], object),
        "split": np.array(["eval"] * 4, object),
        "type": np.array(["none", "OD2", "CA1", "OD2"], object),
        "family": np.array(
            ["none", "optimization-dynamics", "credit-assignment", "optimization-dynamics"], object
        ),  # fmt: skip
        "severity": np.array(["none", "subtle", "subtle", "subtle"], object),
        "onset": np.array([-1, 5, 5, 5]),
        "first_acted": np.array([-1, 9, 5, -1]),
    }
    runs = {r: slice(10 * i, 10 * i + 10) for i, r in enumerate(["c", "a", "b", "n"])}
    labs = records.labels(manifest, runs)
    assert [(lab.run_id, lab.onset) for lab in labs] == [("c", -1), ("a", 9), ("b", 5)]
    # An alarm at step 6 in run a comes before its fault acted: a false alarm, not a detection.
    result = scoring.score(labs, {"c": _alarms(10, []), "a": _alarms(10, [6]),
                                  "b": _alarms(10, [5])}, window=3)  # fmt: skip
    assert (
        result["overall"]["detected"] == 1 and result["overall"]["false_alarms_before_onset"] == 1
    )
    del manifest["first_acted"]  # older manifests: events start at the onset
    assert [lab.onset for lab in records.labels(manifest, runs)] == [-1, 5, 5, 5]


def test_all_faulty_detector_on_the_hand_made_set():
    labels, _ = _hand_set()
    fit = baselines.get("all_faulty").fit([])
    s = scoring.score_detector(labels, lambda lab: fit({"step": np.arange(1, 101)}), window=10)
    o = s["overall"]
    # Every event detected at delay 0; false alarms: 2 × 100 clean + 2 × 39 + 2 × 59.
    assert o["recall"] == 1.0 and o["delay_median"] == 0
    assert o["precision"] == pytest.approx(4 / (4 + 200 + 78 + 118))
    assert o["f1"] == pytest.approx(2 * 0.01 / 1.01)
    assert o["false_alarms_per_1000_clean_steps"] == 1000.0


def test_score_names_a_run_with_missing_or_misshapen_alarms():
    labels, alarms = _hand_set()
    with pytest.raises(ValueError, match=r"run 'c1' have shape \(99,\); expected \(100,\)"):
        scoring.score(labels, {**alarms, "c1": np.zeros(99, bool)}, window=10)
    with pytest.raises(KeyError, match="r1"):
        scoring.score(labels, {k: v for k, v in alarms.items() if k != "r1"}, window=10)


# Baselines ----------------------------------------------------------------------------------


def test_rolling_zscore_flags_spikes_keeps_them_out_of_the_history_and_flags_nan():
    # History 1, 2, 1, 2, ...: mean 1.5, σ 0.5, so the threshold is 1.5 + 6 · 0.5 = 4.5.
    x = np.array([1.0, 2.0] * 10 + [5.0, 4.4, np.nan, -100.0])
    alarm = baselines.rolling_zscore(x, window=128, sigma=6.0, min_history=20)
    # 5.0 alarms; it stays out of the history, so 4.4 is judged against 4.5 again (no alarm);
    # NaN alarms; a drop never does (one-sided, like the skip-step rules).
    assert np.flatnonzero(alarm).tolist() == [20, 22]


def test_rolling_zscore_waits_for_its_history():
    x = np.array([1.0, 2.0] * 5 + [100.0])
    assert not baselines.rolling_zscore(x, min_history=20).any()
    assert baselines.rolling_zscore(x, min_history=10)[-1]


def test_loss_not_decreasing_checks_every_ten_steps():
    falling = np.arange(30.0, 0.0, -1.0)
    assert not baselines.loss_not_decreasing(falling).any()
    flat = np.full(30, 2.0)
    assert np.flatnonzero(baselines.loss_not_decreasing(flat)).tolist() == [19, 29]  # steps 20, 30


def test_threshold_rules_and_fm_column():
    run = {
        "step": np.arange(1, 5),
        "loss": np.array([1.0, np.nan, 1.0, 1.0]),
        "grad_norm": np.array([1.0, 1.0, 500.0, 1e-9]),
        "reward_mean": np.zeros(4),
        "alarm": np.array([0.0, 0.0, 1.0, 0.0]),
    }
    fit = {n: baselines.get(n).fit([]) for n in ("rule_nan", "rules", "fm_recorded", "fm")}
    assert fit["rule_nan"](run).tolist() == [False, True, False, False]
    assert fit["rules"](run).tolist() == [False, True, True, True]
    assert fit["fm_recorded"](run).tolist() == [False, False, True, False]
    # fm replays fm.detect over the statistics the run recorded: grad_norm and reward_mean
    # here. Both are in warm-up for 20 steps; a non-finite value flags at once.
    assert fit["fm"](run).tolist() == [False, False, False, False]
    run["reward_mean"][1] = np.nan
    assert fit["fm"](run).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="none of fm.detect's signals"):
        fit["fm"]({"step": np.arange(1, 3), "loss": np.ones(2)})
    with pytest.raises(
        ValueError, match="unknown detector 'nope'; accepted: fm, fm_recorded, all_faulty"
    ):
        baselines.get("nope")


def test_fm_replay_and_backfill_compile_once_per_shape():
    rng = np.random.default_rng(0)
    runs = [{"step": np.arange(1, 31), "reward_mean": rng.random(30), "grad_norm": rng.random(30)}
            for _ in range(2)]  # fmt: skip
    signals, flags = baselines.replay_flags(runs[0])
    compiled = baselines._REPLAYS[signals]
    compiled_before = compiled._cache_size()  # other tests may have used other lengths
    assert baselines.replay_flags(runs[1])[1].shape == flags.shape == (30, 2)
    assert compiled._cache_size() == compiled_before  # new values, same shape: no retrace
    fn = campaign_records._backfill_fn(4)
    for seed in (1, 2):
        rows = np.random.default_rng(seed).random((3, 3, 8)).astype(np.float32)
        fn(*rows)
    assert fn._cache_size() == 1


def test_standardizer_drops_columns_that_are_not_features():
    run = {"step": np.arange(1, 4), "alarm": np.zeros(3), "score/x": np.zeros(3),
           "eval_accuracy": np.full(3, np.nan), "grad_norm": np.array([1.0, 2.0, 3.0])}  # fmt: skip
    std = baselines.standardizer([run])
    assert std.names == ("grad_norm",)
    z, bad = std({**run, "grad_norm": np.array([2.0, np.inf, 2.0])})
    assert z[0, 0] == 0.0 and bad.tolist() == [False, True, False]


# Campaign specs -----------------------------------------------------------------------------


def _spec(**extra):
    spec = {"base": {"steps": 100}, "runs": [{"seed": 0, "type": "RF1"}]}
    spec.update(extra)
    return spec


@pytest.mark.parametrize(
    "spec, message",
    [
        (_spec(runz=[]), r"spec: unknown key\(s\) \['runz'\]; accepted: name, description"),
        (_spec(base={"stepz": 5}), r"base: unknown key\(s\) \['stepz'\]; accepted: .*\btask\b"),
        (_spec(runs=[{"seed": 0, "type": "XX9"}]), "runs.0. .seed 0, XX9.: unknown fault type"),
        (
            _spec(runs=[{"seed": 0, "type": "RF1", "onset": 500}]),
            r"runs\[0\] \(seed 0, RF1\): --fault_onset=500 is after the last step \(100\)",
        ),
        (
            _spec(runs=[{"seed": 0, "type": "RF1", "severity": "huge"}]),
            r"runs\[0\] \(seed 0, RF1\): fault_severity='huge' is not supported; accepted: "
            "subtle, moderate, severe",
        ),
        (
            _spec(runs=[{"seed": 0, "type": "RF1", "variant": "sideways"}]),
            "RF1 has no variant 'sideways'; accepted: flip, noise",
        ),
        (_spec(runs=[{"type": "RF1"}]), r"runs\[0\]: 'seed' is required"),
        (_spec(runs=[{"seed": 0, "type": "RF1", "when": 3}]), r"runs\[0\]: unknown key"),
        (_spec(grid={"types": ["RF1"]}), r"grid\[0\]: 'seeds' is required"),
        (_spec(grid={"seeds": [0], "colour": 1}), r"grid\[0\]: unknown key\(s\) \['colour'\]"),
        (_spec(splits={"train": [0], "eval": [0]}), "seed 0 is in both splits"),
        (_spec(splits={"train": [1]}), r"runs\[0\]: seed 0 is in no split"),
        (_spec(base={"knobs": {"lrr": 1}}), r"unknown knob\(s\) \['lrr'\]; accepted: lr,"),
        (_spec(runs=[]), "the spec has no runs"),
        (
            _spec(runs=[{"seed": 0, "type": "RF1"}, {"seed": 0, "type": "RF1"}]),
            "run s0/RF1-moderate-o34 is listed twice",
        ),
    ],
)
def test_spec_errors_say_what_was_wrong_and_what_is_accepted(spec, message):
    with pytest.raises(ValueError, match=message):
        campaign.resolve(spec)


def test_grid_crosses_or_deals_and_twins_follow_seed_and_overrides():
    spec = {
        "base": {"steps": 60},
        "splits": {"train": [0, 1], "eval": [7]},
        "grid": [
            {"types": ["RF1", "CA1"], "severities": ["severe"], "onsets": [11, 31],
             "seeds": "train", "deal": 2},
            {"types": ["OD1"], "magnitudes": [4.0], "seeds": [7], "durations": [5],
             "overrides": {"algo": "ppo"}},
        ],
    }  # fmt: skip
    c = campaign.resolve(spec)
    names = [r.name for r in c.runs]
    prefix = campaign.twin_name(7, '{"algo": "ppo"}').split("/")[0]
    assert names == [
        "s0/clean",
        "s1/clean",
        f"{prefix}/s7/clean",
        "s0/RF1-severe-o11",
        "s0/RF1-severe-o31",
        "s1/CA1-severe-o11",
        "s1/CA1-severe-o31",
        f"{prefix}/s7/OD1-m4-o21-d5",  # default onset: a third of 60 steps, + 1
    ]
    assert [r.split for r in c.runs] == ["train", "train", "eval"] + ["train"] * 4 + ["eval"]
    sizes = campaign.plan(c)
    assert sizes["clean_steps"] == 180 and sizes["faulty_steps"] == 50 + 30 + 50 + 30 + 5


def test_standard_campaign_sizes_splits_and_balance():
    c = campaign.resolve(campaign.builtin_spec("standard"))
    sizes = campaign.plan(c)
    assert sizes["runs"] >= 800
    assert sizes["clean_steps"] >= sizes["faulty_steps"]
    seeds = {split: {r.seed for r in c.runs if r.split == split} for split in ("train", "eval")}
    assert seeds["train"] and seeds["eval"] and not seeds["train"] & seeds["eval"]
    cells = {(r.fault["fault"], r.fault["fault_severity"]) for r in c.runs if not r.clean}
    assert cells == {(t, s) for t in faults.SPECS for s in faults.SEVERITIES}
    onsets = {r.fault["fault_onset"] for r in c.runs if not r.clean}
    assert len(onsets) >= 4
    faulted_per_seed = {}
    for r in c.runs:
        faulted_per_seed[r.seed] = faulted_per_seed.get(r.seed, 0) + (not r.clean)
    tool_seeds = {r.seed for r in c.runs if '"task": "calc"' in r.config}
    assert max(n for s, n in faulted_per_seed.items() if s not in tool_seeds) == 2
    assert max(n for s, n in faulted_per_seed.items() if s in tool_seeds) == 4
    # Every onset comes after a checkpoint of the twin to fork from, and the evaluation's
    # window of 50 steps from onset fits in the run.
    base = campaign.base_config("x", c.base)
    for r in c.runs:
        if not r.clean:
            cfg = campaign.apply_overrides(base, json.loads(r.config) if r.config else {})
            assert cfg.checkpoint_every < r.fault["fault_onset"] <= cfg.steps - 49


def test_builtin_specs_are_data_that_still_fits_the_catalog():
    # The built-ins are JSON files shipped with the package; what they baked in must still hold
    # for today's catalog and tasks.
    from rftjax.tasks import response_slots

    for name in campaign.BUILTINS:
        c = campaign.resolve(campaign.builtin_spec(name))
        assert c.runs, name
    heldout = campaign.resolve(campaign.builtin_spec("heldout"))
    assert {r.fault["fault"] for r in heldout.runs if not r.clean} == set(faults.SPECS)
    slots = {json.loads(r.config).get("max_new_tokens") for r in heldout.runs if r.config}
    assert slots == {response_slots("calc")}  # the tool task's bound, as baked in
    with pytest.raises(ValueError, match="built-ins: standard, smoke"):
        campaign.builtin_spec("nope")


def test_tool_types_run_on_the_tool_task_and_are_refused_elsewhere():
    c = campaign.resolve(campaign.builtin_spec("standard"))
    for r in c.runs:
        is_tool = r.fault.get("fault") in campaign.TOOL_TYPES
        assert ('"task": "calc"' in r.config) == is_tool or r.clean
    tool_twins = {r.seed for r in c.runs if r.clean and "calc" in r.config}
    tool_runs = {r.seed for r in c.runs if r.fault.get("fault") in campaign.TOOL_TYPES}
    assert tool_runs == tool_twins  # every tool run has a clean twin on the tool task
    spec = {"splits": {"train": [0]}, "runs": [{"seed": 0, "type": "TE1"}]}
    with pytest.raises(ValueError, match="TE1 acts on tool calls: it needs a task with tools"):
        campaign.resolve(spec)
    # "all" on a task without tools leaves the tool types out.
    grid = {"splits": {"train": [0]}, "grid": [{"types": "all", "seeds": "train"}]}
    types = {r.fault.get("fault") for r in campaign.resolve(grid).runs if not r.clean}
    assert types == set(faults.SPECS) - set(campaign.TOOL_TYPES)


# Records ------------------------------------------------------------------------------------


def test_table_writer_fills_missing_metrics_with_nan_and_reads_back(tmp_path):
    path = str(tmp_path / "steps.parquet")
    w = records.TableWriter(path, "steps", {"loss": "float64"})
    row = dict(run_id=["a"], split=["eval"], type=["none"], family=["none"], severity=["none"],
               seed=[3], step=[1], fault_active=[0])  # fmt: skip
    w.write({**row, "loss": [0.5]})
    w.write({**row, "step": [2]})
    assert not os.path.exists(path)  # appears only when complete
    w.close()
    table = records.read(path)
    assert table["step"].tolist() == [1, 2] and np.isnan(table["loss"][1])
    assert records.columns_of(path) == [*schema.names("steps"), "loss"]


def test_run_slices_need_grouped_rows():
    assert records.run_slices(np.array(["a", "a", "b"])) == {"a": slice(0, 2), "b": slice(2, 3)}
    with pytest.raises(ValueError, match="not contiguous"):
        records.run_slices(np.array(["a", "b", "a"]))


# End to end ---------------------------------------------------------------------------------


def _faultbench(*args):
    cmd = [sys.executable, "-m", "launch.faultbench", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_generate_pipeline_then_evaluate(tmp_path):
    out = tmp_path / "pipeline"
    proc = _faultbench("generate", "--spec=pipeline", f"--out={out}", "--workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipeline check, not a benchmark" in proc.stdout.splitlines()[0]
    assert not (out / ".generate.lock").exists()  # removed when generate is done
    c = campaign.resolve(campaign.builtin_spec("pipeline"))
    base = campaign.base_config(str(out), c.base)
    per_step = base.rl.prompts_per_step * base.rl.group_size
    manifest = records.read(str(out / "manifest.parquet"))
    steps = records.read(str(out / "steps.parquet"))
    trajectories = records.read(str(out / "trajectories.parquet"))
    # Row counts from the run configs: 7 runs × 12 steps × 16 completions.
    assert sorted(manifest["run_id"]) == sorted(r.name for r in c.runs)
    assert len(steps["step"]) == len(c.runs) * base.steps == 84
    assert len(trajectories["step"]) == 84 * per_step
    assert int(steps["fault_active"].sum()) == campaign.plan(c)["faulty_steps"] == 24
    row = {r: i for i, r in enumerate(manifest["run_id"])}["s1/CA1-moderate-o10"]
    assert (manifest["family"][row], manifest["split"][row], manifest["onset"][row]) == (
        "credit-assignment",
        "eval",
        10,
    )
    assert manifest["twin"][row] == "s1/clean" and manifest["magnitude"][row] == 0.3
    assert manifest["first_acted"][row] == 10  # CA1 acts on every active step
    # Against the clean twin: a clip-ε change with one update per step computes what the twin
    # does, bit for bit (inert). At this size every reward is 0, so flipping advantages
    # changes nothing either; the sampler's log-prob errors of PG1 do (accuracy is 0 in
    # every run, so nothing is harmful).
    harm_of = dict(zip(manifest["run_id"], manifest["harm"], strict=True))
    assert harm_of == {
        "s0/clean": "none", "s1/clean": "none", "s0/CA1-severe-o7": "inert",
        "s0/PG1-severe-o4-d3": "harmless", "s1/CA1-moderate-o10": "inert",
        "s1/PG1-m5-o7": "harmless", "s1/OD4-m0.01-clip-o7": "inert",
    }  # fmt: skip
    assert "alarm" in steps and "score/grad_norm" in steps and "reward_mean" in steps
    # The detector replayed over the recorded statistics is the in-step one, bit for bit.
    fm_replay, fm_recorded = (baselines.get(n).fit([]) for n in ("fm", "fm_recorded"))
    for run_id in manifest["run_id"]:
        rows = {k: v[steps["run_id"] == run_id] for k, v in steps.items()}
        assert fm_replay(rows).tolist() == fm_recorded(rows).tolist()
    # Statistics recomputed for older records (no in-step value) equal the in-step ones.
    run_dir = out / "s1" / "CA1-moderate-o10"
    rows = read_jsonl(str(run_dir / "metrics.jsonl"))
    in_step = {k: [r[k] for r in rows] for k in campaign_records.BACKFILLED}
    for r in rows:
        for k in campaign_records.BACKFILLED:
            del r[k]
    campaign_records._backfill(rows, read_jsonl(str(run_dir / "trajectories.jsonl")))
    assert [r["check_adv_flip"] for r in rows] == in_step["check_adv_flip"]
    np.testing.assert_allclose(
        [r["reward_shadow_gap"] for r in rows], in_step["reward_shadow_gap"], atol=1e-7
    )
    # A forked run's records before onset are its clean twin's.
    data = records.load(str(out))
    forked = data.steps["reward_mean"][data.runs["s1/CA1-moderate-o10"]][:9]
    twin = data.steps["reward_mean"][data.runs["s1/clean"]][:9]
    np.testing.assert_array_equal(forked, twin)
    assert set(trajectories["prompt_id"][trajectories["run_id"] == "s0/clean"]) == set(range(48))
    card = (out / "README.md").read_text()
    assert "| trajectories.parquet (completions) | 1344 |" in card and "`prompt_id`" in card

    again = _faultbench("generate", "--spec=pipeline", f"--out={out}", "--workers=1")
    assert again.returncode == 0 and "7 of 7 runs already finished; 0 to go" in again.stdout
    assert len(records.read(str(out / "steps.parquet"))["step"]) == 84

    report = tmp_path / "report"
    proc = _faultbench("evaluate", f"--data={out}", f"--out={report}", "--window=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Everything in the folder --out; each detector's scores printed once (in the table).
    assert sorted(os.listdir(report)) == ["plots", "report.json", "report.md", "summary.png"]
    assert "fm: scored" in proc.stdout and "fm: F1" not in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    assert "Campaign `pipeline`: the tests' pipeline check, not a benchmark" in proc.stdout
    result = json.loads((report / "report.json").read_text())
    # The inert runs of the eval split (CA1, OD4) are not scored: clean 12 steps, and PG1
    # with onset 7 (6 steps before).
    assert {k: result["data"][k] for k in ("runs", "faulted_runs", "clean_runs", "steps")} == {
        "runs": 2, "faulted_runs": 1, "clean_runs": 1, "steps": 24}  # fmt: skip
    assert result["data"]["harm"] == {"inert": 2, "harmless": 1, "harmful": 0, "unknown": 0}
    all_faulty = result["detectors"]["all_faulty"]
    assert all_faulty["overall"]["recall"] == 1.0
    assert all_faulty["overall"]["precision"] == pytest.approx(1 / (1 + 12 + 6))
    assert all_faulty["by_harm"]["harmless"]["overall"]["detected"] == 1
    assert all_faulty["by_harm"]["harmful"]["overall"]["events"] == 0
    expected = {"fm", "all_faulty", "rules", "zscore"}
    try:
        import sklearn  # noqa: F401

        expected |= {"isolation_forest", "lof"}
    except ImportError:
        assert any("scikit-learn" in n or "sklearn" in n for n in result["notes"])
    assert expected <= set(result["detectors"])
    assert "| all_faulty |" in (report / "report.md").read_text()
    # Signals around onset for every fault type in the records (inert ones too: not scored).
    assert sorted(result["plots"]) == ["plots/CA1.png", "plots/OD4.png", "plots/PG1.png"]
    # fm on log-level views of the same records (what TRL's logs carry, and everything).
    views = tmp_path / "views"
    proc = _faultbench("evaluate", f"--data={out}", f"--out={views}", "--window=5",
                       "--detector=fm", "--view=trl,full")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_view = json.loads((views / "views.json").read_text())
    assert list(by_view["views"]) == ["trl", "full"] and by_view["runs"] == result["data"]["runs"]
    assert len(by_view["views"]["trl"]["signals"]) < len(by_view["views"]["full"]["signals"])
    assert "| trl |" in proc.stdout and "| full |" in proc.stdout


@pytest.mark.slow
def test_smoke_runs_start_from_one_warm_up_that_answers(tmp_path):
    """`--spec smoke`, the users' pipeline check (about 2 minutes): every run starts from the
    same warm-up, above zero held-out accuracy; the clean twins still answer at the end."""
    out = tmp_path / "smoke"
    proc = _faultbench("generate", "--spec=smoke", f"--out={out}", "--workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = records.read(str(out / "manifest.parquet"))
    initial = set(manifest["eval_accuracy_initial"])
    assert len(initial) == 1 and min(initial) > 0, initial  # one shared warm-up, learned
    finals = dict(zip(manifest["run_id"], manifest["eval_accuracy_final"], strict=True))
    assert finals["s0/clean"] > 0 and finals["s1/clean"] > 0


def test_generate_refuses_an_unknown_spec(tmp_path):
    proc = _faultbench("generate", "--spec=nonesuch", f"--out={tmp_path}")
    assert proc.returncode == 2
    builtins = "standard, smoke, heldout, heldout-remedy, pipeline, conditions, conditions-faults"
    assert f"neither a built-in ({builtins}) nor a file" in proc.stderr


def test_learned_baselines_flag_steps_far_from_the_training_clean_steps():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (the test extra has it)")
    rng = np.random.default_rng(0)
    train = [
        {"step": np.arange(1, 201), "grad_norm": rng.normal(8, 1, 200),
         "reward_mean": rng.normal(0.5, 0.05, 200)}
        for _ in range(3)
    ]  # fmt: skip
    run = {
        "step": np.arange(1, 6),
        "grad_norm": np.array([8.0, 8.5, 80.0, 7.5, np.nan]),
        "reward_mean": np.full(5, 0.5),
    }
    lof = baselines.get("lof").fit(train)(run)
    assert lof.tolist() == [False, False, True, False, True]
    # An isolation tree cannot isolate a point beyond the training range faster than the
    # training extremes, so a spike in one statistic scores no higher than those (a known
    # limit of IsolationForest); central points pass and non-finite ones alarm.
    forest = baselines.get("isolation_forest").fit(train)(run)
    assert forest[[0, 1, 3]].tolist() == [False, False, False] and forest[4]


def test_nan_mean_is_nan_where_a_column_has_no_value_without_a_warning():
    rows = np.array([[1.0, np.nan, np.nan], [3.0, 4.0, np.nan]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = plots.nan_mean(rows)
    np.testing.assert_array_equal(got, [2.0, 4.0, np.nan])


def test_the_summary_figure_shows_each_detectors_scores_on_one_page(tmp_path):
    pytest.importorskip("matplotlib")
    scores = lambda f1, recall: {  # noqa: E731
        "overall": {"f1": f1, "precision": f1, "recall": recall, "delay_median": 2.0,
                    "false_alarms_per_1000_clean_steps": 5.0},
        "by_family": {"reward": {"f1": f1}, "credit-assignment": {"f1": None}},
        "by_type": {"RF1": {"recall": recall}},
    }  # fmt: skip
    report = {
        "window": 5,
        "split": "eval",
        "data": {"runs": 4, "faulted_runs": 3, "clean_runs": 1, "steps": 48},
        "detectors": {"fm": scores(0.75, 0.5), "zscore": scores(0.25, 1.0)},
        "notes": ["a note"],
        "campaign": {"name": "smoke", "description": "a pipeline check, not a benchmark"},
    }
    path = plots.summary_figure(report, str(tmp_path / "summary.png"))
    assert os.path.getsize(path) > 0
    fig = plots.summary(report)
    bars, family, types, alarms = fig.axes
    assert [t.get_text() for t in bars.get_yticklabels()] == ["fm", "zscore"]
    f1_bars = [p.get_width() for p in bars.patches[:2]]  # the first series drawn: F1
    assert f1_bars == [0.75, 0.25]
    # Families in taxonomy order; a missing score is written as a dash.
    assert [t.get_text() for t in family.get_xticklabels()] == ["reward", "credit-assignment"]
    assert [t.get_text() for t in family.texts] == ["0.75", "–", "0.25", "–"]
    assert [t.get_text() for t in types.texts] == ["0.50", "1.00"]
    assert "smoke" in fig._suptitle.get_text() and "pipeline check" in fig._suptitle.get_text()
    assert any("Note: a note" in t.get_text() for t in fig.texts)

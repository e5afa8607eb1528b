"""The learned diagnoser: features, training on FaultBench-shaped records, the JSON artifact."""

import json

import numpy as np
import pytest

from fm import diagnose as dg
from fm import taxonomy
from fm.faultbench import diagnosis as fd
from fm.faultbench import records as rec

SIGNATURE = {"TE1": "tool_error_rate", "CA2": "adv_group_mean_max_abs", "RF2": "repetition_ratio"}


def _records(n_runs: int, split: str, seed: int) -> rec.Records:
    """Runs of 40 steps; from onset 25 the run's type moves its signature statistic."""
    rng = np.random.default_rng(seed)
    manifest = {k: [] for k in ("run_id", "type", "family", "severity", "onset", "split",
                                "config", "variant")}  # fmt: skip
    steps: dict[str, list] = {"run_id": [], "step": [], "alarm": [], "flag/x": []}
    for name in dg.FEATURES:
        steps[name] = []
    for r in range(n_runs):
        for type_id, signal in SIGNATURE.items():
            run_id = f"{split}{r}/{type_id}"
            # Odd runs under another condition; the run length is not a condition.
            config = json.dumps({"steps": 40, **({"group_size": 4} if r % 2 else {})})
            for k, v in zip(manifest, (run_id, type_id, taxonomy.get(type_id).family,
                                       "moderate", 25, split, config, f"v{r % 2}"),
                            strict=True):  # fmt: skip
                manifest[k].append(v)
            for step in range(1, 41):
                steps["run_id"].append(run_id)
                steps["step"].append(step)
                steps["alarm"].append(float(step == 26))
                steps["flag/x"].append(0.0)
                for name in dg.FEATURES:
                    base = 0.1 * (1 + 0.05 * rng.standard_normal())
                    base *= name not in dg.INVARIANTS  # counts that are 0 in a healthy run
                    moved = name == signal and step >= 25
                    steps[name].append(base + (0.5 * (1 + r % 3) if moved else 0.0))
    manifest = {k: np.asarray(v) for k, v in manifest.items()}
    steps = {k: np.asarray(v) for k, v in steps.items()}
    return rec.Records(manifest, steps, rec.run_slices(steps["run_id"]))


def test_examples_are_taken_at_the_first_alarm_in_the_window():
    data = fd.examples(_records(2, "train", 0), split="train", window=10, replay=False)
    assert len(data) == 6 and {ex.type for ex in data} == set(SIGNATURE)
    ex = data[0]
    assert ex.window[ex.alarm_index]["alarm"] == 1.0
    # Alarm at step 26 (index 25): fewer than BEFORE steps of baseline exist before it.
    assert ex.alarm_index == 25 and len(ex.window) == 25 + fd.AFTER + 1
    assert fd.examples(_records(2, "train", 0), split="eval", window=10, replay=False) == []
    # An alarm outside [onset, onset + window) is not an example.
    assert fd.examples(_records(2, "train", 0), split="train", window=1, replay=False) == []


def test_examples_carry_their_runs_condition_and_variant():
    data = fd.examples(_records(2, "train", 0), split="train", window=10, replay=False)
    got = {(ex.run_id.split("/")[0], ex.condition, ex.variant) for ex in data}
    assert got == {("train0", "{}", "v0"), ("train1", '{"group_size":4}', "v1")}


def test_a_condition_is_the_config_less_its_length_cadence_and_initial_weights():
    from fm.faultbench import schema

    config = '{"steps": 300, "eval_every": 300, "init_seed": 0, "knobs": {"lr": 0.0003}}'
    assert schema.condition(config) == '{"knobs":{"lr":0.0003}}'
    assert schema.condition('{"log_every": 10, "checkpoint_every": 5}') == "{}"
    assert schema.condition("") == "{}"
    assert schema.condition('{"task": "sort", "algo": "ppo"}') == '{"algo":"ppo","task":"sort"}'


def _signature_example(rng, type_id, condition, variant, size=0.5):
    """A window whose last AFTER + 1 steps move `type_id`'s signature statistic."""
    window = []
    for i in range(20 + fd.AFTER + 1):
        r = {n: 0.1 * (1 + 0.05 * rng.standard_normal()) * (n not in dg.INVARIANTS)
             for n in dg.FEATURES}  # fmt: skip
        r[SIGNATURE[type_id]] += size * (i >= 20)
        window.append(r)
    run_id = f"{condition}/{type_id}-{variant}-{size}"
    return fd.Example(run_id, type_id, "moderate", window, 20, (), condition, variant)


def test_held_out_conditions_and_variants_are_scored_on_models_that_never_saw_them():
    rng = np.random.default_rng(3)
    data = [_signature_example(rng, t, c, v, size)
            for c in ("A", "B", "C")
            for t, v in (("TE1", "error"), ("TE1", "empty"), ("CA2", "scale"))
            for size in (0.4, 0.8)]  # fmt: skip
    data += [_signature_example(rng, "RF2", "A", v) for v in ("length", "empty")]  # A only
    cond = fd.held_out(data, lambda ex: ex.condition)
    # RF2 exists in condition A alone: no model trained without A knows it.
    assert cond["groups"] == 3 and cond["type_only_in_its_group"] == 2
    assert cond["examples"] == 18 and set(cond["per_group"]) == {"A", "B", "C"}
    assert cond["per_type_top1"] == {"CA2": 1.0, "TE1": 1.0}  # signatures tell them apart
    assert all(g["examples"] == 6 for g in cond["per_group"].values())
    # What an unsure threshold would do, over the held-out diagnoses.
    assert [r["threshold"] for r in cond["unsure"]] == list(fd.UNSURE_THRESHOLDS)
    variants = fd.generalization(data)["leave_one_variant_out"]
    # CA2 has one variant: held out, no model knows CA2; TE1 and RF2 have two each.
    assert variants["type_only_in_its_group"] == 6
    assert variants["examples"] == 14 and set(variants["per_type_top1"]) == {"TE1", "RF2"}
    assert variants["per_type_top1"]["TE1"] == 1.0


def test_calibration_by_condition_holds_out_one_condition_a_fold():
    rng = np.random.default_rng(4)
    data = [_signature_example(rng, t, c, "v", size)
            for c in ("A", "B", "C") for t in ("TE1", "CA2") for size in (0.3, 0.6)]  # fmt: skip
    data[0] = data[0]._replace(type="CA2")  # a TE1 window labelled CA2: not separable
    data[7] = data[7]._replace(type="TE1")
    assert fd.by_condition(data) is not None and fd.by_condition(data[:4]) is None  # A only
    by_run = fd.train(data)
    by_cond = fd.train(data, calibrate_by=fd.by_condition(data))
    # The same fit; only the temperature's held-out logits differ.
    np.testing.assert_array_equal(by_run.coef, by_cond.coef)
    assert by_cond.temperature != by_run.temperature
    # Its temperature is the one fitted on the three leave-one-condition-out models' logits.
    x = np.stack([dg.features(ex.window, ex.alarm_index) for ex in data])
    y = [ex.type for ex in data]
    logits = []
    for c in ("A", "B", "C"):
        held = np.array([e.condition == c for e in data])
        part = dg.fit(x[~held], [t for t, h in zip(y, held, strict=True) if not h])
        logits.append(part.logits(x[held]))
    logits = np.concatenate(logits)
    order = [i for c in ("A", "B", "C") for i, e in enumerate(data) if e.condition == c]
    labels = np.array([by_cond.classes.index(y[i]) for i in order])
    assert by_cond.temperature == pytest.approx(dg.fit_temperature(logits, labels))
    with pytest.raises(ValueError, match="one group"):
        fd.train(data[:4], calibrate_by=lambda ex: ex.condition)


def test_examples_from_the_replayed_detector_start_where_the_statistic_jumps():
    # The signature statistics jump at step 25, a step before the recorded alarm: fm.detect
    # replayed over the statistics alarms on the jump itself and names the flagged signal.
    data = fd.examples(_records(1, "train", 0), split="train", window=10)
    by_type = {ex.type: ex for ex in data}
    te1 = by_type["TE1"]
    assert te1.alarm_index == 24 and "tool_error_rate" in te1.flagged
    assert te1.window[te1.alarm_index]["alarm"] == 0.0  # not the recorded column's step


def test_features_read_each_statistic_shift_and_invariants():
    records = [{name: 0.1 * (name not in dg.INVARIANTS) for name in dg.FEATURES}] * 6
    records = [dict(r) for r in records] + [{**records[0]} for _ in range(4)]
    for r in records[6:]:
        r["tool_error_rate"] = 0.6
        r["nonfinite_grads"] = 3.0
    x = dg.features(records, 6)
    col = {name: x[i] for i, name in enumerate(dg.FEATURES)}
    # 0.1 → 0.6 against the floor 0.02 (a flat baseline): z = 25, squashed: 50·tanh(0.5),
    # on the signed log scale log(1 + 50·tanh(0.5)).
    assert col["tool_error_rate"] == pytest.approx(np.log1p(50 * np.tanh(0.5)))
    assert col["nonfinite_grads"] == pytest.approx(np.log1p(50 * np.tanh(3 / 5)))
    assert col["reward_mean"] == 0.0
    assert np.all(np.abs(x) <= np.log1p(50))
    # A fall is the mirror of a rise: 0.1 → -0.4 is z = -25.
    for r in records[6:]:
        r["tool_error_rate"] = -0.4
    fall = dg.features(records, 6)[dg.FEATURES.index("tool_error_rate")]
    assert fall == pytest.approx(-np.log1p(50 * np.tanh(0.5)))


def test_a_model_trained_on_train_runs_names_held_out_runs_and_round_trips(tmp_path):
    model = fd.train(fd.examples(_records(4, "train", 0), split="train", replay=False))
    held_out = fd.examples(_records(2, "eval", 1), split="eval", replay=False)
    score = fd.accuracy(dg.Learned(model), held_out)
    assert score["examples"] == 6 and score["top1_macro"] == 1.0
    path = tmp_path / "model.json"
    dg.save_model(model, str(path))
    again = dg.load_model(str(path))
    ex = held_out[0]
    a = dg.Learned(model)(ex.window, ex.alarm_index)
    b = dg.Learned(again)(ex.window, ex.alarm_index)
    assert again.temperature == model.temperature != 1.0  # fitted out of fold, saved
    assert a.ranking == b.ranking and a.top == ex.type
    assert len(a.ranking) == len(taxonomy.CATALOG)
    assert sum(p for _, p in a.ranking) == pytest.approx(1.0)
    # Restricted to the types a trainer can have: renormalized over them.
    others = [t for t in SIGNATURE if t != ex.type]
    c = dg.Learned(model)(ex.window, ex.alarm_index, types=others)
    assert [t for t, _ in c.ranking] == sorted(others, key=lambda t: -dict(a.ranking)[t])
    assert sum(p for _, p in c.ranking) == pytest.approx(1.0) and c.top in others
    # A model of another version or feature set is refused with its reason.
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        dg.load_model(str(path))
    path.write_text(json.dumps({**record, "features": ["x"]}))
    with pytest.raises(ValueError, match="other features"):
        dg.load_model(str(path))


def test_the_shipped_model_loads_and_diagnoses():
    model = dg.load_model()
    assert set(model.classes) <= {t.id for t in taxonomy.CATALOG} and len(model.classes) >= 14
    assert model.info["accuracy"]["learned/eval"]["examples"] > 0
    records = [{name: 0.1 * (name not in dg.INVARIANTS) for name in dg.FEATURES}] * 10
    records = [dict(r) for r in records]
    for r in records[6:]:
        r["nonfinite_grads"], r["grad_norm"] = 5.0, float("nan")
    assert dg.Learned(model)(records, 6).top == "OD2"


def test_calibration_error_is_the_binned_gap_between_confidence_and_accuracy():
    # Bin [0.9, 1.0]: confidences 0.95, 0.95, 1.0 with 2 of 3 right -> |2/3 - 0.9667|;
    # bin [0.5, 0.6): 0.5 right -> |1 - 0.5|. Weighted by 3/4 and 1/4.
    conf, right = [0.95, 0.95, 1.0, 0.5], [True, False, True, True]
    want = 0.75 * abs(2 / 3 - (0.95 + 0.95 + 1.0) / 3) + 0.25 * 0.5
    assert fd.calibration_error(conf, right) == pytest.approx(want)
    assert fd.calibration_error([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0)


def test_temperature_scaling_recovers_the_temperature_labels_were_drawn_at():
    # Labels drawn from softmax(logits / 2.5): the fitted temperature is 2.5 within sampling
    # error, and it leaves every ranking as it was.
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(20000, 5))
    p = np.exp(logits / 2.5)
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    assert dg.fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    assert dg.fit_temperature(logits * 2.5, labels) == pytest.approx(6.25, rel=0.05)


def test_train_on_scores_held_out_conditions_when_the_training_runs_span_several(
    tmp_path, monkeypatch
):
    # Two campaign folders: the first's train split holds two conditions (odd runs at group
    # size 4), the second only an eval split (other seeds).
    folders = {"first": _records(4, "train", 0), "second": _records(2, "eval", 1)}
    monkeypatch.setattr(fd.rec, "load", lambda d: folders[d])
    out = tmp_path / "model.json"
    info, lines = fd.train_on(list(folders), str(out), window=10)
    # The detector is replayed over the records: CA2's move (z 10 at most against its floor)
    # stays below its threshold, so TE1 and RF2 give the examples, a run each.
    assert info["examples"] == {"train": 8, "eval": 4, "eval:second": 4}
    model = dg.load_model(str(out))
    assert model.info == json.loads(json.dumps(info))  # what was returned is what was saved
    held = info["generalization"]["leave_one_condition_out"]
    # Both types exist under both conditions: all 8 examples scored by a model that never
    # saw their condition, and the signatures tell the types apart.
    assert held["groups"] == 2 and held["examples"] == 8 and held["top1_macro"] == 1.0
    assert set(held["per_group"]) == {"{}", '{"group_size":4}'}
    assert info["accuracy"]["learned/eval"]["top1_macro"] == 1.0
    assert any("train, leave-one-condition-out" in row for row in lines)
    # One condition only (the even runs): no held-out-condition scores, calibrated by run.
    folders["first"] = _records(1, "train", 0)
    info, lines = fd.train_on(["first"], str(out), window=10)
    assert "generalization" not in info and not any("leave-one" in row for row in lines)
    # Its two examples are one run each of a type the other fold never saw: no out-of-fold
    # logit can be scored, so the temperature stays 1 (it was a fit on nothing before).
    assert dg.load_model(str(out)).temperature == 1.0

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
    manifest = {k: [] for k in ("run_id", "type", "family", "severity", "onset", "split")}
    steps: dict[str, list] = {"run_id": [], "step": [], "alarm": [], "flag/x": []}
    for name in dg.FEATURES:
        steps[name] = []
    for r in range(n_runs):
        for type_id, signal in SIGNATURE.items():
            run_id = f"{split}{r}/{type_id}"
            for k, v in zip(manifest, (run_id, type_id, taxonomy.get(type_id).family,
                                       "moderate", 25, split), strict=True):  # fmt: skip
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
    # 0.1 → 0.6 against the floor 0.02 (a flat baseline): z = 25, squashed: 50·tanh(0.5).
    assert col["tool_error_rate"] == pytest.approx(50 * np.tanh(0.5))
    assert col["nonfinite_grads"] == pytest.approx(50 * np.tanh(3 / 5))
    assert col["reward_mean"] == 0.0
    assert np.all(np.abs(x) <= 50)


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

"""The learned diagnoser per log-level view (fm.logs.learned): what it reads, what it ranks,
how it is cross-validated, and how fm.analyze picks it or falls back to the rules."""

import json

import numpy as np
import pytest

from fm import analyze, taxonomy
from fm import diagnose as dg
from fm.faultbench import diagnosis as fd
from fm.logs import learned, views

# Types a TRL log shows, each moving one statistic TRL logs; CA2 moves one it does not log.
MOVES = {"RF2": "reward_mean", "OD2": "grad_norm", "PG3": "entropy_mean",
         "CA2": "adv_group_mean_max_abs"}  # fmt: skip
BEFORE, AFTER = 20, 3


def _window(rng, moved: str, size: float = 1.0) -> list[dict[str, float]]:
    """BEFORE baseline steps of every statistic near 1, then AFTER steps with `moved` up."""
    out = []
    for i in range(BEFORE + AFTER):
        r = {n: 0.0 if n in dg.INVARIANTS else 1 + 0.01 * rng.standard_normal()
             for n in dg.FEATURES}  # fmt: skip
        if i >= BEFORE:
            r[moved] += size
        out.append(r)
    return out


def _examples(seeds=(0, 1, 2), types=MOVES):
    rng = np.random.default_rng(0)
    return [
        fd.Example(
            f"s{seed}/{t}", t, "severe", _window(rng, MOVES[t], 0.5 + 0.5 * seed), BEFORE, ()
        )  # fmt: skip
        for seed in seeds
        for t in types
    ]


def _trl_view():
    return views.view(learned.features("trl"))


def test_a_view_model_reads_only_its_view_and_ranks_only_visible_types():
    view = _trl_view()
    assert "CA2" not in view.visible and {"RF2", "OD2", "PG3"} <= set(view.visible)
    model = learned.fit(_examples(), "trl", view.visible, {})
    assert model.features == learned.features("trl")
    assert "adv_group_mean_max_abs" not in model.features and "reward_mean" in model.features
    assert set(model.classes) == {"RF2", "OD2", "PG3"}  # CA2's examples are not trained on
    assert model.info["examples"] == {"OD2": 3, "PG3": 3, "RF2": 3}
    diagnose = dg.Learned(model)
    rng = np.random.default_rng(5)
    for t in ("RF2", "OD2", "PG3"):
        d = diagnose(_window(rng, MOVES[t]), BEFORE, types=view.visible)
        assert d.top == t
        assert {u for u, _ in d.ranking} == set(view.visible)  # CA2 never ranked
        assert sum(p for _, p in d.ranking) == pytest.approx(1.0)


def _od2_with_an_invisible_companion():
    """The examples, OD2's with adv_group_mean_max_abs (not in TRL's table) moving too."""
    data = _examples()
    for ex in data:
        if ex.type == "OD2":
            for r in ex.window[BEFORE:]:
                r["adv_group_mean_max_abs"] += 2.0
    return data


def test_a_statistic_outside_the_view_does_not_change_the_diagnosis():
    data = _od2_with_an_invisible_companion()
    model = learned.fit(data, "trl", _trl_view().visible, {})
    diagnose = dg.Learned(model)
    window = _window(np.random.default_rng(7), "reward_mean")
    base = diagnose(window, BEFORE).ranking
    # adv_group_mean_max_abs (not in TRL's table) jumps a thousandfold: the same diagnosis.
    outside = [{**r, "adv_group_mean_max_abs": 1e3} if i >= BEFORE else r
               for i, r in enumerate(window)]  # fmt: skip
    assert diagnose(outside, BEFORE).ranking == base
    # grad_norm (in the table) jumping does change it.
    inside = [{**r, "grad_norm": 5.0} if i >= BEFORE else r for i, r in enumerate(window)]
    assert diagnose(inside, BEFORE).ranking != base
    # The same learner reading every in-step statistic does move with it.
    everything = dg.Learned(fd.train([ex for ex in data if ex.type != "CA2"]))
    assert everything(outside, BEFORE).ranking != everything(window, BEFORE).ranking


def test_leave_one_seed_out_cannot_name_a_type_seen_in_one_seed_only():
    """RF2 and OD2 in three seeds each are told apart held out; PG3 in seed 0 only is never
    in its fold's training data, so its held-out example is always wrong."""
    data = [ex for ex in _examples() if ex.type in ("RF2", "OD2")]
    data += [ex for ex in _examples(seeds=(0,)) if ex.type == "PG3"]
    seed_of = {ex.run_id: int(ex.run_id[1]) for ex in data}
    cv = learned.cross_validate(data, seed_of, "trl", _trl_view().visible)
    got = cv["learned"]
    assert got["examples"] == 7 and got["per_type_top1"] == {"OD2": 1.0, "PG3": 0.0, "RF2": 1.0}
    assert got["top1_macro"] == pytest.approx(2 / 3)
    assert cv["rules"]["examples"] == 7 and cv["folds"] == "leave one seed out (3 seeds)"


def _trl_log(tmp_path):
    rng = np.random.default_rng(1)
    entries = [{"step": s, "reward": 0.5 + 0.01 * rng.standard_normal() + (0.8 if s >= 30 else 0),
                "kl": 0.01, "entropy": 2.0 + 0.01 * rng.standard_normal(),
                "grad_norm": 1.0 + 0.01 * rng.standard_normal()}
               for s in range(1, 41)]  # fmt: skip
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(path)


def _ship(folder, learned_top1: float):
    cv = {"learned": {"examples": 9, "top1_macro": learned_top1, "family_macro": 1.0},
          "rules": {"examples": 9, "top1_macro": 0.5, "family_macro": 1.0}}  # fmt: skip
    model = learned.fit(_examples(), "trl", _trl_view().visible, {"cross_validation": cv})
    dg.save_model(model, learned.path("trl", str(folder)))


def test_analyze_picks_the_trl_model_and_falls_back_to_the_rules(tmp_path, monkeypatch):
    log = _trl_log(tmp_path)
    monkeypatch.setattr(learned, "ARTIFACTS", str(tmp_path / "none"))  # no artifact
    s = analyze.analyze([log], "trl").summary
    assert s["diagnoser"]["diagnoser"] == "rules" and "no artifact" in s["diagnoser"]["why"]
    monkeypatch.setattr(learned, "ARTIFACTS", str(tmp_path))
    _ship(tmp_path, learned_top1=0.9)
    a = analyze.analyze([log], "trl")
    assert a.summary["diagnoser"]["diagnoser"] == "learned"
    (d,) = [e for e in a.events if e["event"] == "diagnosis"]
    assert d["diagnoser"] == "learned" and d["alarm_step"] == 30 and d["top"] == "RF2"
    assert taxonomy.get(d["top"]).id in a.summary["view"]["visible"]
    assert analyze.analyze([log], "trl", diagnoser="rules").summary["diagnoser"]["diagnoser"] == (
        "rules"
    )
    # Held out worse than the rules: "auto" keeps the rules, "learned" still uses it.
    _ship(tmp_path, learned_top1=0.1)
    choice = analyze.analyze([log], "trl").summary["diagnoser"]
    assert choice["diagnoser"] == "rules" and "top1_macro 0.10 < rules 0.50" in choice["why"]
    assert learned.pick("trl", "learned").name == "learned"
    # A log of no known trainer's view (rftjax's statistics, or tensorboard tags): the rules.
    assert learned.pick("rftjax", "learned").name == "rules"
    assert learned.pick(None, "learned").name == "rules"


def test_the_shipped_view_models_load_with_their_views_features_and_scores():
    for view in ("trl", "verl", "openrlhf"):
        choice = learned.pick(view, "learned")
        assert choice.name == "learned", choice.why
        info = choice.model.info
        assert choice.model.features == learned.features(view) and info["view"] == view
        assert set(choice.model.classes) <= set(info["visible_types"])
        assert info["cross_validation"]["learned"]["examples"] > 0

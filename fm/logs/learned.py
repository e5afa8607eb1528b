"""The learned diagnoser per log-level view: fm's learned diagnoser fed only what a trainer logs.

The learner is `fm.diagnose`'s (a multinomial logistic model over each statistic's robust
shift since the alarm, `fm.faultbench.diagnosis.train`); a view's model reads only the
statistics of `fm.diagnose.FEATURES` that the trainer's table (`fm.logs.mappings`) carries,
and is trained only on fault types the view can see (`fm.logs.views`). Its examples are the
windows a `fm.logs.monitor.Monitor` over the view's signals diagnoses, replayed over
FaultBench records (`fm.logs.evaluate`), so training and use see the same alarm and window.

Artifacts: `fm/artifacts/diagnoser_<view>.json` (`fit`, `fm.logs.evaluate.train`; `python -m
launch.faultbench train-diagnoser --view trl,verl,openrlhf --data DIR --out fm/artifacts`),
with the campaign and their leave-one-seed-out scores against the rules in `info`.
`pick(view, prefer)` returns the model a monitor diagnoses with, or None (the rules) with the
reason: asked for the rules, no artifact for that trainer (tensorboard tags of no known
table, rftjax's own log), one trained on other features, or ("auto") one that held out worse
than the rules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from fm import diagnose as dg
from fm.logs import mappings

if TYPE_CHECKING:
    from fm.faultbench import diagnosis

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "artifacts")
VIEWS = ("full", "trl", "verl", "openrlhf")


class Choice(NamedTuple):
    """The diagnoser a monitor uses: a learned model, or the rules (model None) and why."""

    model: dg.Model | None
    name: str  # "learned" or "rules"
    artifact: str | None
    why: str

    def as_json(self) -> dict:
        return {"diagnoser": self.name, "artifact": self.artifact, "why": self.why}


def features(view: str) -> tuple[str, ...]:
    """The statistics a view's model reads: `fm.diagnose.FEATURES` its table carries."""
    if view == "full":
        return dg.FEATURES
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; accepted: {', '.join(VIEWS)}")
    carried = set(mappings.get(view).signals)
    return tuple(f for f in dg.FEATURES if f in carried)


def path(view: str, folder: str | None = None) -> str:
    """Where view `view`'s model is (`folder`, default the shipped `ARTIFACTS`)."""
    return os.path.join(folder or ARTIFACTS, f"diagnoser_{view}.json")


CHOICES = ("auto", "learned", "rules")


def pick(view: str | None, prefer: str = "auto", folder: str | None = None) -> Choice:
    """The diagnoser for logs of trainer `view`. `prefer`: "rules"; "learned" (its shipped
    model, else the rules); "auto": the learned model only where its held-out scores in
    `info` (cross-validation on the campaign it was trained on) are at least the rules' on
    the same events in top-1 and family accuracy, else the rules."""
    if prefer not in CHOICES:
        raise ValueError(f"unknown diagnoser choice {prefer!r}; accepted: {', '.join(CHOICES)}")
    if prefer == "rules":
        return Choice(None, "rules", None, "asked for the rules")
    if view not in VIEWS or view == "full":
        return Choice(None, "rules", None, f"no learned diagnoser for {view or 'these'} logs")
    where = path(view, folder)
    if not os.path.exists(where):
        return Choice(None, "rules", None, f"no artifact {where}")
    try:
        model = dg.load_model(where, features(view))
    except ValueError as e:
        return Choice(None, "rules", None, str(e))
    if prefer == "auto":
        worse = _worse_than_rules(model.info.get("cross_validation", {}))
        if worse:
            return Choice(None, "rules", where, f"the learned model held out worse: {worse}")
    return Choice(model, "learned", where, f"trained on {view}-view FaultBench records")


def _worse_than_rules(cv: dict) -> str:
    """Where the learned model's held-out scores fall below the rules' ("" if nowhere)."""
    mine, rules = cv.get("learned", {}), cv.get("rules", {})
    if not mine.get("examples"):
        return "no held-out scores"
    return ", ".join(
        f"{k} {mine[k]:.2f} < rules {rules[k]:.2f}"
        for k in ("top1_macro", "family_macro")
        if mine[k] < rules.get(k, 0.0)
    )


def cross_validate(
    data: Sequence[diagnosis.Example], seed_of: dict[str, int], view: str, visible: Sequence[str]
) -> dict:
    """Leave-one-seed-out top-1 / top-3 / family of the view's learned diagnoser (trained on
    the visible types' examples of the other seeds), and the rules' on every example (a
    type the view cannot see counts as wrong for both). An example whose other seeds hold no
    training example is not scored for the learned model: compare the two where their
    `examples` agree."""
    from fm.faultbench import diagnosis

    pairs = diagnosis.cross_validate(
        data, lambda ex: seed_of[ex.run_id], names=features(view), types=tuple(visible)
    )
    rules = [
        (ex, dg.diagnose(ex.window, ex.alarm_index, flagged=ex.flagged, types=visible))
        for ex in data
    ]
    seeds = len({seed_of[ex.run_id] for ex, _ in pairs})
    return {"folds": f"leave one seed out ({seeds} seeds)", "learned": diagnosis.score(pairs),
            "rules": diagnosis.score(rules)}  # fmt: skip


def fit(data: Sequence[diagnosis.Example], view: str, visible: Sequence[str], info: dict):
    """The view's model on every example of a visible type, with `info` recorded."""
    from fm.faultbench import diagnosis

    train = [ex for ex in data if ex.type in set(visible)]
    model = diagnosis.train(train, names=features(view))
    counts = {t: sum(ex.type == t for ex in train) for t in sorted({ex.type for ex in train})}
    return model._replace(info={**info, "view": view, "features": list(features(view)),
                                "visible_types": list(visible), "examples": counts})  # fmt: skip

"""Diagnosis on FaultBench records: examples at the detector's first alarm, training the learned
diagnoser, and top-k accuracy (macro over types) of any diagnoser."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from fm import diagnose as dg
from fm import remediate, taxonomy
from fm.faultbench import baselines, schema
from fm.faultbench import records as rec

BEFORE, AFTER = 32, 2  # steps of baseline before the alarm, of evidence after it
UNSURE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # what `unsure_table` tries


class Example(NamedTuple):
    run_id: str
    type: str
    severity: str
    window: list[dict[str, float]]  # step records from BEFORE steps before the alarm
    alarm_index: int  # the alarm's index in `window`
    flagged: tuple[str, ...]
    condition: str = "{}"  # the run's training condition (`schema.condition`)
    variant: str = ""  # the fault's variant


def _record(columns: dict[str, np.ndarray], i: int, names: Sequence[str]) -> dict[str, float]:
    return {n: float(columns[n][i]) for n in names if n in columns}


def examples(
    records: rec.Records, *, split: str | None, window: int = 50, replay: bool = True
) -> list[Example]:
    """One example per faulted run of `split` whose detector alarmed in [onset, onset +
    window): the records around that first alarm. The detector is fm.detect's default one
    replayed over the recorded statistics (as the trainer now runs it), or with
    `replay=False` the alarms and flags the trainer recorded."""
    recorded_flags = [c for c in records.steps if c.startswith("flag/")]
    names = [*dg.FEATURES, "alarm", *recorded_flags]
    manifest = records.manifest
    row_of = {str(r): i for i, r in enumerate(manifest["run_id"])}
    out = []
    for lab in rec.labels(records.manifest, records.runs, split):
        if lab.type == schema.CLEAN:
            continue
        rows = records.runs[lab.run_id]
        steps = records.steps["step"][rows]
        if replay:
            signals, flags = baselines.replay_flags({k: v[rows] for k, v in records.steps.items()})
            signal_names = [s.name for s in signals]
            alarm = flags.any(axis=-1)
        else:
            flags = np.stack([records.steps[f][rows] > 0 for f in recorded_flags], axis=-1)
            signal_names = [f.split("/", 1)[1] for f in recorded_flags]
            alarm = records.steps["alarm"][rows] > 0
        hit = np.flatnonzero(alarm & (steps >= lab.onset) & (steps < lab.onset + window))
        if hit.size == 0:
            continue
        i = int(hit[0])
        lo, hi = max(0, i - BEFORE), min(len(steps), i + AFTER + 1)
        cols = {n: records.steps[n][rows] for n in names if n in records.steps}
        win = [_record(cols, j, names) for j in range(lo, hi)]
        flagged = tuple(n for n, f in zip(signal_names, flags[i], strict=True) if f)
        if i - lo == 0:  # an alarm on the first step: no baseline
            continue
        m = row_of[lab.run_id]
        condition = schema.condition(str(manifest["config"][m])) if "config" in manifest else "{}"
        variant = str(manifest["variant"][m]) if "variant" in manifest else ""
        out.append(
            Example(lab.run_id, lab.type, lab.severity, win, i - lo, flagged, condition, variant)
        )
    return out


def calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10):
    """Expected calibration error of top-1 confidences: Σ_b (n_b / N) · |accuracy_b −
    mean confidence_b| over `bins` equal-width confidence bins (a confidence of 1 falls in the
    last). 0 when the confidences are calibrated."""
    conf = np.asarray(confidence, np.float64)
    right = np.asarray(correct, np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return float(
        sum(
            np.sum(which == b) / conf.size * abs(right[which == b].mean() - conf[which == b].mean())
            for b in range(bins)
            if np.any(which == b)
        )
    )


def accuracy(diagnoser: Callable[..., dg.Diagnosis], data: Sequence[Example]) -> dict:
    """Top-1, top-3 and family accuracy, macro over types (and micro), with per-type counts;
    the mean top-1 confidence and its expected calibration error (micro)."""
    return score([(ex, diagnoser(ex.window, ex.alarm_index, flagged=ex.flagged)) for ex in data])


def score(diagnosed: Sequence[tuple[Example, dg.Diagnosis]]) -> dict:
    """`accuracy` of given (example, its diagnosis) pairs: the diagnoses may come from
    several models (cross-validation folds)."""
    per: dict[str, list[tuple[bool, bool, bool]]] = {}
    confidence = []
    for ex, d in diagnosed:
        family = taxonomy.get(ex.type).family
        per.setdefault(ex.type, []).append(
            (d.top == ex.type, ex.type in d.top_k(3), d.family == family)
        )
        confidence.append((d.ranking[0][1], d.top == ex.type))
    if not per:
        return {"examples": 0}
    macro = np.mean([np.mean(v, axis=0) for v in per.values()], axis=0)
    micro = np.mean([x for v in per.values() for x in v], axis=0)
    return {
        "examples": int(sum(len(v) for v in per.values())),
        "types": len(per),
        "top1_macro": float(macro[0]),
        "top3_macro": float(macro[1]),
        "family_macro": float(macro[2]),
        "top1_micro": float(micro[0]),
        "per_type_top1": {t: float(np.mean([x[0] for x in v])) for t, v in sorted(per.items())},
        "top1_confidence_mean": float(np.mean([c for c, _ in confidence])),
        "calibration_error": calibration_error(*zip(*confidence, strict=True)),
    }


def unsure_table(
    diagnoser: Callable[..., dg.Diagnosis],
    data: Sequence[Example],
    thresholds: Sequence[float] = UNSURE_THRESHOLDS,
) -> list[dict]:
    """What an unsure threshold (`fm.remediate.unsure`) would do on `data`: per threshold, the
    share of diagnoses below it, top-1 accuracy (micro) of those at or above it and of those
    below it, and how often the candidates an unsure halt names (`fm.remediate.candidates`)
    hold the true type. A useful threshold leaves few diagnoses unsure, those it leaves are
    mostly wrong, and their candidates hold the truth."""
    diagnoses = [(ex, diagnoser(ex.window, ex.alarm_index, flagged=ex.flagged)) for ex in data]
    return unsure_rows(diagnoses, thresholds)


def unsure_rows(
    diagnosed: Sequence[tuple[Example, dg.Diagnosis]],
    thresholds: Sequence[float] = UNSURE_THRESHOLDS,
) -> list[dict]:
    """`unsure_table` of given (example, its diagnosis) pairs (e.g. held-out folds')."""
    rows = []
    diagnoses = [(ex.type, d) for ex, d in diagnosed]
    for t in thresholds:
        below = [(y, d) for y, d in diagnoses if remediate.unsure(d, t)]
        sure = [(y, d) for y, d in diagnoses if not remediate.unsure(d, t)]
        rows.append(
            {
                "threshold": t,
                "unsure_share": len(below) / len(diagnoses) if diagnoses else None,
                "top1_sure": float(np.mean([d.top == y for y, d in sure])) if sure else None,
                "top1_unsure": float(np.mean([d.top == y for y, d in below])) if below else None,
                "candidates_hold_truth": (
                    float(np.mean([y in remediate.candidates(d) for y, d in below]))
                    if below
                    else None
                ),
            }
        )
    return rows


def by_condition(data: Sequence[Example]) -> Callable[[Example], object] | None:
    """`train`'s calibration groups for `data`: its training conditions when it has several
    (confidence calibrated for a condition the model never saw), else None (folds by run)."""
    return (lambda ex: ex.condition) if len({ex.condition for ex in data}) > 1 else None


def train(
    data: Sequence[Example],
    *,
    folds: int = 5,
    calibrate_by: Callable[[Example], object] | None = None,
    names: Sequence[str] = dg.FEATURES,
    **fit_options,
) -> dg.Model:
    """The learned diagnoser fit on `data`, its temperature fitted on out-of-fold logits
    (`folds` folds by run, so no run's example calibrates a model that saw it; 1: none; with
    `calibrate_by`, one fold a group: e.g. leave one training condition out). `names`: the
    statistics it reads (default: every one fm computes in-step; a log-level view's model
    reads those its trainer logs)."""
    if not data:
        raise ValueError("no training examples: no faulted run alarmed within the window")
    x = np.stack([dg.features(ex.window, ex.alarm_index, names) for ex in data])
    labels = [ex.type for ex in data]
    fit_options["names"] = names
    model = dg.fit(x, labels, **fit_options)
    if folds < 2:
        return model
    if calibrate_by is None:
        runs = sorted({ex.run_id for ex in data})
        fold_of = {r: i % folds for i, r in enumerate(runs)}
        fold = np.array([fold_of[ex.run_id] for ex in data])
    else:
        keys = [str(calibrate_by(ex)) for ex in data]
        groups = sorted(set(keys))
        if len(groups) < 2:
            raise ValueError(f"calibrate_by gives one group ({groups}): no held-out fold")
        fold = np.array([groups.index(k) for k in keys])
    logits = np.full((len(data), len(model.classes)), -np.inf)
    for k in range(int(fold.max()) + 1):
        held = fold == k
        part = dg.fit(x[~held], [t for t, h in zip(labels, held, strict=True) if not h],
                      **fit_options)  # fmt: skip
        cols = [model.classes.index(c) for c in part.classes]
        logits[np.ix_(held, cols)] = part.logits(x[held])
    # A class a fold never saw keeps -inf (probability 0) for that fold's examples; examples
    # whose own class is missing from their fold's model cannot be scored and are left out.
    y = np.array([model.classes.index(t) for t in labels])
    ok = np.isfinite(logits[np.arange(len(y)), y])
    if not ok.any():  # no held-out example a fold could score: nothing to calibrate on
        return model
    return model._replace(temperature=dg.fit_temperature(logits[ok], y[ok]))


def cross_validate(
    data: Sequence[Example],
    group_of: Callable[[Example], object],
    *,
    names: Sequence[str] = dg.FEATURES,
    types: Sequence[str] | None = None,
    **train_options,
) -> list[tuple[Example, dg.Diagnosis]]:
    """Leave-one-group-out diagnoses: each example diagnosed by the learned diagnoser trained
    (`train`, reading `names`) on the examples of `types` (default: all) of every other group
    (`group_of`: e.g. the run's seed), ranking `types`. A group whose rest holds no such
    example is left out. Score the pairs with `score`."""
    out = []
    for group in sorted({group_of(ex) for ex in data}, key=str):
        rest = [ex for ex in data
                if group_of(ex) != group and (types is None or ex.type in types)]  # fmt: skip
        if not rest:
            continue
        options = {"calibrate_by": by_condition(rest), **train_options}
        learned = dg.Learned(train(rest, names=names, **options))
        out += [(ex, learned(ex.window, ex.alarm_index, flagged=ex.flagged, types=types))
                for ex in data if group_of(ex) == group]  # fmt: skip
    return out


def held_out(
    data: Sequence[Example], group_of: Callable[[Example], object], **train_options
) -> dict:
    """Leave-one-group-out scores of the learned diagnoser (`cross_validate`): over every
    example whose type some other group holds (`score`), per group, and how many examples
    could not be scored because only their own group holds their type."""
    groups_of: dict[str, set] = {}
    for ex in data:
        groups_of.setdefault(ex.type, set()).add(group_of(ex))
    scorable = [ex for ex in data if len(groups_of[ex.type]) > 1]
    pairs = cross_validate(scorable, group_of, **train_options)
    per_group: dict[str, list] = {}
    for ex, d in pairs:
        per_group.setdefault(str(group_of(ex)), []).append((ex, d))
    return {
        **score(pairs),
        "groups": len({group_of(ex) for ex in data}),
        "type_only_in_its_group": len(data) - len(scorable),
        "per_group": {g: score(v) for g, v in sorted(per_group.items())},
        "unsure": unsure_rows(pairs),
    }


def generalization(data: Sequence[Example], **train_options) -> dict:
    """How the learned diagnoser holds off its training data: leave-one-condition-out
    (train on every other training condition, diagnose the held-out one) and
    leave-one-variant-out (each type's variant diagnosed by a model that never saw it;
    types with one variant cannot be scored). Calibration error is over the held-out
    diagnoses, so it measures confidence on conditions (variants) the model never saw."""
    return {
        "leave_one_condition_out": held_out(data, lambda ex: ex.condition, **train_options),
        "leave_one_variant_out": held_out(
            data, lambda ex: f"{ex.type}/{ex.variant}", **train_options
        ),
    }


def train_on(folders: Sequence[str], out: str, *, window: int = 50) -> tuple[dict, list[str]]:
    """`launch.faultbench train-diagnoser`: fits the learned diagnoser on the train split's
    faulted runs of `folders` (FaultBench record folders), scores it and the rules on the eval
    split (each folder's too, with several) and the train split, and writes the model with its
    data and scores in `info` to `out`. Returns (info, the score table as Markdown lines)."""
    import os

    loaded = [(d, rec.load(d)) for d in folders if d]
    # Eval examples per folder too: a campaign with no train split (heldout) is all held out.
    per_folder = {
        (d, name): examples(r, split=name, window=window)
        for d, r in loaded
        for name in ("train", "eval")
    }
    split = {name: [ex for (_, n), v in per_folder.items() if n == name for ex in v]
             for name in ("train", "eval")}  # fmt: skip
    if len(loaded) > 1:
        split.update({f"eval:{os.path.basename(os.path.normpath(d))}": v
                      for (d, n), v in per_folder.items() if n == "eval" and v})  # fmt: skip
    conditions = by_condition(split["train"])  # None: the training runs share one condition
    model = train(split["train"], calibrate_by=conditions)
    learned = dg.Learned(model)
    scores = {
        (who, name): accuracy(fn, split[name])
        for who, fn in (("learned", learned), ("rules", dg.diagnose))
        for name in split
    }
    info = {
        "data": [os.path.abspath(d) for d, _ in loaded],
        "window": window,
        "examples": {k: len(v) for k, v in split.items()},
        "accuracy": {f"{who}/{name}": v for (who, name), v in scores.items()},
        # What fm.remediate's unsure threshold would do on the held-out examples.
        "unsure": unsure_table(learned, split["eval"]),
    }
    if conditions is not None:
        info["generalization"] = generalization(split["train"])
    dg.save_model(model._replace(info=info), out)
    rows = [(who, name, v) for (who, name), v in scores.items()]
    rows += [("learned", f"train, {name.replace('_', '-')}", v)
             for name, v in info.get("generalization", {}).items()]  # fmt: skip
    lines = [
        "| diagnoser | split | top-1 (macro) | top-3 (macro) | family (macro) | top-1 (micro) "
        "| confidence (mean) | calibration error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {who} | {name} | {v['top1_macro']:.3f} | {v['top3_macro']:.3f} | "
        f"{v['family_macro']:.3f} | {v['top1_micro']:.3f} | "
        f"{v['top1_confidence_mean']:.3f} | {v['calibration_error']:.3f} |"
        for who, name, v in rows
        if v.get("examples")
    ]
    return info, lines

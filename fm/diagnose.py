"""Diagnosis (host side): from the statistics around an alarm, which fault type is it?

`diagnose` scores every taxonomy type by how far its signature signals (`fm.taxonomy`: each
type's `fm.stats` keys and the direction its fault moves them) moved from the run's own recent
past, the way a person reads the curves: "importance ratio max 1.9 against 1.0 before (+90σ),
KL to the reference flat: sampler / trainer mismatch". It returns every type ranked, with a
confidence, its family, and the evidence in words.

The inputs are plain records (one dict of statistics a step, as a trainer logs them), so any
trainer that computes `fm.stats` can use it. `Learned` is the second diagnoser, with the same
inputs and outputs: a multinomial logistic model over the same shifts of every statistic the
taxonomy names, trained on FaultBench records (`fit`; `launch.faultbench train-diagnoser`) and
shipped as a small JSON artifact read with numpy alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fm import detect, taxonomy

# Statistics that must be 0 in a healthy run: a non-zero value is decisive evidence.
INVARIANTS = {
    "nonfinite_grads": "OD2",
    "nonfinite_params": "OD3",
    "check_mask_length": "CA3",
    "check_adv_sign": "CA1",
    "check_weights": "OD3",
    "check_reference": "OD3",
    "check_coefficients": "OD4",
}


class Evidence(NamedTuple):
    signal: str
    before: float  # median over the steps before the alarm
    after: float  # mean over the steps from the alarm on
    z: float  # (after - before) / robust scale
    text: str


class Diagnosis(NamedTuple):
    """Every type ranked: `ranking[0]` is the best guess."""

    ranking: tuple[tuple[str, float], ...]  # (type id, confidence), confidences sum to 1
    family: str
    family_confidence: float
    evidence: tuple[Evidence, ...]  # for the best guess, strongest first

    @property
    def top(self) -> str:
        return self.ranking[0][0]

    def top_k(self, k: int) -> tuple[str, ...]:
        return tuple(t for t, _ in self.ranking[:k])

    def summary(self) -> str:
        name = taxonomy.get(self.top).name
        words = "; ".join(e.text for e in self.evidence[:3]) or "no signal moved"
        return f"{self.top} ({name}, {self.ranking[0][1]:.0%}): {words}"


def _floors() -> dict[str, float]:
    return {s.name: s.floor for s in detect.default_signals()}


def _series(records: Sequence[Mapping[str, float]], name: str) -> np.ndarray:
    return np.array([float(r.get(name, math.nan)) for r in records], np.float64)


def shift(before: np.ndarray, after: np.ndarray, floor: float = 0.0) -> tuple[float, float, float]:
    """(median before, mean after, z): the move of `after` against the robust spread of
    `before` (1.4826 × MAD, at least `floor` and 1e-8). A non-finite `after` is z = ±inf."""
    before = before[np.isfinite(before)]
    if before.size == 0 or after.size == 0:
        return math.nan, math.nan, 0.0
    center = float(np.median(before))
    scale = max(1.4826 * float(np.median(np.abs(before - center))), floor, 1e-8)
    if not np.all(np.isfinite(after)):
        return center, math.inf, math.inf
    mean = float(np.mean(after))
    return center, mean, (mean - center) / scale


def _support(z: float, direction: str) -> float:
    """How much a move of z supports a signal expected to go `direction` ("+", "-", "~")."""
    if not math.isfinite(z):
        return 50.0
    if direction == "+":
        return max(z, 0.0)
    if direction == "-":
        return max(-z, 0.0)
    return abs(z)


def _squash(s: float, cap: float = 50.0) -> float:
    """Diminishing returns past a few σ, so that one huge move does not drown the rest."""
    return cap * math.tanh(s / cap) if s > 0 else 0.0


def diagnose(
    records: Sequence[Mapping[str, float]],
    alarm_index: int,
    *,
    flagged: Sequence[str] = (),
    temperature: float = 2.0,
    types: Sequence[str] | None = None,
) -> Diagnosis:
    """Ranks the taxonomy's types for an alarm.

    Args:
      records: consecutive step records (statistics by name), oldest first.
      alarm_index: index in `records` of the first alarm step; the records before it are the
        baseline, those from it on the evidence.
      flagged: signals the detector flagged (they add weight to the types that name them).
      temperature: softmax temperature turning scores into confidences.
      types: type ids to rank (default: all of the taxonomy).

    Returns:
      A `Diagnosis`.
    """
    if not 0 < alarm_index < len(records):
        raise ValueError(
            f"alarm_index must leave baseline and evidence steps: got {alarm_index} of "
            f"{len(records)} records"
        )
    before, after = records[:alarm_index], records[alarm_index:]
    floors = _floors()
    flagged = set(flagged)
    ids = list(types) if types is not None else [t.id for t in taxonomy.CATALOG]
    scores, evidence = {}, {}
    cache: dict[str, tuple[float, float, float]] = {}
    for type_id in ids:
        entry = taxonomy.get(type_id)
        found = []
        for key, direction in entry.signals:
            if key not in cache:
                b, a = _series(before, key), _series(after, key)
                cache[key] = shift(b, a, floors.get(key, 0.0)) if np.isfinite(b).any() else None
            moved = cache[key]
            if moved is None:
                continue
            center, mean, z = moved
            support = _squash(_support(z, direction)) + (2.0 if key in flagged else 0.0)
            found.append((support, Evidence(key, center, mean, z, _words(key, center, mean, z))))
        if not found:
            scores[type_id] = 0.0
            evidence[type_id] = ()
            continue
        # The best-supported signal counts most; the others corroborate.
        supports = sorted((s for s, _ in found), reverse=True)
        rest = float(np.mean(supports[1:])) if len(supports) > 1 else 0.0
        scores[type_id] = supports[0] + 0.5 * rest
        evidence[type_id] = tuple(e for _, e in sorted(found, key=lambda p: -p[0]))
    for name, type_id in INVARIANTS.items():
        if type_id in scores:
            values = _series(after, name)  # NaN: not logged
            if np.any(values[np.isfinite(values)] > 0):
                scores[type_id] += 100.0
    ranked = sorted(ids, key=lambda t: -scores[t])
    logits = np.array([scores[t] for t in ranked]) / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    by_family: dict[str, float] = {}
    for t, p in zip(ranked, probs, strict=True):
        family = taxonomy.get(t).family
        by_family[family] = by_family.get(family, 0.0) + float(p)
    family = taxonomy.get(ranked[0]).family
    return Diagnosis(
        ranking=tuple((t, float(p)) for t, p in zip(ranked, probs, strict=True)),
        family=family,
        family_confidence=by_family[family],
        evidence=evidence[ranked[0]],
    )


def _words(name: str, before: float, after: float, z: float) -> str:
    if name in INVARIANTS and after > 0:
        return f"{name} {after:.3g} (must be 0)"
    if not math.isfinite(after):
        return f"{name} non-finite (was {before:.3g})"
    if abs(z) < 2:
        return f"{name} flat at {after:.3g}"
    arrow = "up" if z > 0 else "down"
    return f"{name} {arrow}: {after:.3g} against {before:.3g} before ({z:+.1f}σ)"


# -- the learned diagnoser ---------------------------------------------------------------------

MODEL_VERSION = 2  # 2: features on a signed log scale (1: the squashed z)
DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "artifacts", "diagnoser.json")
# Every statistic the taxonomy names, plus its invariants: the learned model's inputs.
FEATURES: tuple[str, ...] = tuple(
    sorted({name for t in taxonomy.CATALOG for name, _ in t.signals} | set(INVARIANTS))
)


def features(
    records: Sequence[Mapping[str, float]], alarm_index: int, names: Sequence[str] = FEATURES
) -> np.ndarray:
    """f64[len(names)]: each statistic's shift since the alarm (robust z against the steps
    before it, with the detector's floors), squashed to ±50, on a signed log scale
    (sign(z)·log(1 + |z|), within ±3.93); 0 for a statistic not logged. The log makes a shift
    count by its order of size: one fault moves a statistic by z 5 under one condition (a
    learning rate, a group size) and by z 50 under another, and the model should not read
    that factor as another fault. `names`: the statistics to read (default `FEATURES`; a
    log-level view reads its subset)."""
    floors = _floors()
    before, after = records[:alarm_index], records[alarm_index:]
    out = np.zeros(len(names))
    for j, name in enumerate(names):
        b, a = _series(before, name), _series(after, name)
        if not np.isfinite(b).any() and not np.isfinite(a).any():
            continue
        if name in INVARIANTS:  # counts that must be 0: their size is the evidence
            a = a[np.isfinite(a)]
            out[j] = 50.0 * math.tanh(float(np.max(a, initial=0.0)) / 5.0)
            continue
        z = shift(b, a, floors.get(name, 0.0))[2] if np.isfinite(b).any() else 0.0
        out[j] = 50.0 * math.tanh(z / 50.0) if math.isfinite(z) else 50.0 * np.sign(z)
    return np.sign(out) * np.log1p(np.abs(out))


class Model(NamedTuple):
    """A multinomial logistic model over standardized `features`."""

    version: int
    features: tuple[str, ...]
    classes: tuple[str, ...]  # type ids
    mean: np.ndarray  # [F]
    scale: np.ndarray  # [F]
    coef: np.ndarray  # [C, F]
    intercept: np.ndarray  # [C]
    info: dict  # how it was trained (data, split, sizes, accuracy)
    temperature: float = 1.0  # logits / temperature: fitted so confidences are calibrated

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits [..., C] of features x [..., F], before the temperature."""
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        logits = self.logits(x) / self.temperature
        p = np.exp(logits - logits.max())
        return p / p.sum()


def save_model(model: Model, path: str) -> None:
    """Writes `model` as JSON: feature names, classes, standardization (mean, scale [F]),
    coefficients [C, F], intercepts [C], temperature and training info."""
    record = {
        "version": model.version,
        "features": list(model.features),
        "classes": list(model.classes),
        "mean": model.mean.tolist(),
        "scale": model.scale.tolist(),
        "coef": model.coef.tolist(),
        "intercept": model.intercept.tolist(),
        "temperature": model.temperature,
        "info": model.info,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def load_model(path: str = DEFAULT_MODEL, features: Sequence[str] = FEATURES) -> Model:
    """Reads a model written by `save_model`; refuses another version or another feature set
    than `features` (default `FEATURES`; a per-view model's are its view's)."""
    with open(path, encoding="utf-8") as f:
        r = json.load(f)
    if r.get("version") != MODEL_VERSION:
        raise ValueError(f"{path}: diagnoser version {r.get('version')}, need {MODEL_VERSION}")
    if tuple(r["features"]) != tuple(features):
        raise ValueError(
            f"{path}: trained on other features ({len(r['features'])}) than the "
            f"{len(features)} expected: {', '.join(features)}"
        )
    arr = lambda k: np.asarray(r[k], np.float64)
    return Model(
        r["version"], tuple(r["features"]), tuple(r["classes"]), arr("mean"), arr("scale"),
        arr("coef"), arr("intercept"), r.get("info", {}), float(r.get("temperature", 1.0)),
    )  # fmt: skip


def fit(
    x: np.ndarray,
    labels: Sequence[str],
    *,
    l2: float = 1e-2,
    steps: int = 3000,
    lr: float = 0.5,
    info: dict | None = None,
    names: Sequence[str] = FEATURES,
) -> Model:
    """Multinomial logistic regression by full-batch gradient descent (deterministic, numpy
    only): x [N, F] from `features(..., names)`, labels [N] type ids."""
    if x.shape[1:] != (len(names),):
        raise ValueError(f"x has {x.shape[1:]} features a row; `names` has {len(names)}")
    classes = tuple(sorted(set(labels)))
    y = np.array([classes.index(t) for t in labels])
    mean = x.mean(0)
    # Features are log-scaled z-scores: a spread below 1 across examples (a factor e in z) is
    # noise, not to be amplified.
    scale = np.maximum(x.std(0), 1.0)
    xs = (x - mean) / scale
    onehot = np.eye(len(classes))[y]
    coef = np.zeros((len(classes), x.shape[1]))
    intercept = np.zeros(len(classes))
    for _ in range(steps):
        logits = xs @ coef.T + intercept
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        err = (p - onehot) / len(y)
        coef -= lr * (err.T @ xs + l2 * coef)
        intercept -= lr * err.sum(0)
    return Model(MODEL_VERSION, tuple(names), classes, mean, scale, coef, intercept, info or {})


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimizes the negative log-likelihood of softmax(logits / T)
    for integer `labels` [N] (logits [N, C] of examples the model was not fit on): temperature
    scaling, which changes confidences and never the ranking. A grid over 0.05–20 (log
    spaced), refined once around its best point."""

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float(-log_p[np.arange(len(labels)), labels].mean())

    grid = np.geomspace(0.05, 20.0, 121)
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = np.geomspace(best / 1.06, best * 1.06, 41)
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


class Learned:
    """The learned diagnoser: `Learned(model)(records, alarm_index, flagged=...)` returns a
    `Diagnosis` like `diagnose` (types the model never saw get confidence 0; the evidence is
    the rules' for the chosen type). A broken hard invariant (non-finite gradients or weights,
    mask/length, advantage sign) is decisive here as in the rules: their diagnosis is returned."""

    def __init__(self, model: Model | None = None) -> None:
        self.model = model or load_model()

    def __call__(
        self,
        records: Sequence[Mapping[str, float]],
        alarm_index: int,
        *,
        flagged: Sequence[str] = (),
        types: Sequence[str] | None = None,
    ) -> Diagnosis:
        """`types`: the fault types this trainer can have (default: all); the model's
        probabilities are renormalized over them."""
        after = records[alarm_index:]
        for name in INVARIANTS:
            values = _series(after, name)
            if np.any(values[np.isfinite(values)] > 0):
                return diagnose(records, alarm_index, flagged=flagged, types=types)
        p = self.model.probabilities(features(records, alarm_index, self.model.features))
        ids = [t.id for t in taxonomy.CATALOG] if types is None else list(types)
        conf = {t: c for t, c in zip(self.model.classes, p.tolist(), strict=True) if t in ids}
        total = sum(conf.values())
        conf = {t: c / total for t, c in conf.items()} if total > 0 else conf
        ranked = sorted(ids, key=lambda t: -conf.get(t, 0.0))
        by_family: dict[str, float] = {}
        for t in ranked:
            family = taxonomy.get(t).family
            by_family[family] = by_family.get(family, 0.0) + conf.get(t, 0.0)
        top = ranked[0]
        evidence = diagnose(records, alarm_index, flagged=flagged, types=[top]).evidence
        return Diagnosis(
            ranking=tuple((t, conf.get(t, 0.0)) for t in ranked),
            family=taxonomy.get(top).family,
            family_confidence=by_family[taxonomy.get(top).family],
            evidence=evidence,
        )

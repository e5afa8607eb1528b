"""Diagnosis (host side): from the statistics around an alarm, which fault type is it?

`diagnose` scores every taxonomy type by how far its signature signals (`fm.taxonomy`: each
type's `fm.stats` keys and the direction its fault moves them) moved from the run's own recent
past, the way a person reads the curves: "importance ratio max 1.9 against 1.0 before (+90σ),
KL to the reference flat: sampler / trainer mismatch". It returns every type ranked, with a
confidence, its family, and the evidence in words.

The inputs are plain records (one dict of statistics a step, as a trainer logs them), so any
trainer that computes `fm.stats` can use it. A learned diagnoser can take the same inputs.
"""

from __future__ import annotations

import math
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
    if not math.isfinite(after):
        return f"{name} non-finite (was {before:.3g})"
    if abs(z) < 2:
        return f"{name} flat at {after:.3g}"
    arrow = "up" if z > 0 else "down"
    return f"{name} {arrow}: {after:.3g} against {before:.3g} before ({z:+.1f}σ)"

"""fm's detector and diagnoser on a trainer's logged metrics, one step at a time, on the host.

`Monitor` is what `fm.analyze` replays over a finished log and what an online integration (the
TRL callback) calls at each logging step: the same `fm.detect` detector as in a JAX train step
(its default signals, restricted to those the log carries, and its default configuration),
jitted once and fed the logged values; then, `evidence_steps` after an alarm, a diagnoser over
the records around it, ranking only the fault types the log can show (`fm.logs.views`): the
learned diagnoser of the trainer's view (`fm.logs.learned`) where one is shipped, else the rules
of `fm.diagnose`. Each diagnosis event names the diagnoser that made it.

An episode starts at an alarm while none is open and ends after `quiet` steps without one; each
episode gets one diagnosis. Events are dicts with `step` and `event` ("alarm", "diagnosis"),
in the shape `fm.report` draws.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from fm import detect, taxonomy
from fm import diagnose as dg
from fm.logs import learned, views


class Case(NamedTuple):
    """What one diagnosis was made from (the `fm.diagnose` inputs)."""

    alarm_step: int
    records: list[dict[str, float]]  # the step records around the alarm, oldest first
    index: int  # the alarm's index in `records`
    flagged: tuple[str, ...]  # the signals the detector flagged at the alarm


def detector_signals(available: Sequence[str]) -> tuple[detect.Signal, ...]:
    """The detector's default signals that `available` (fm statistic names) holds."""
    have = set(available)
    return tuple(s for s in detect.default_signals() if s.name in have)


@functools.lru_cache(maxsize=32)
def compiled(signals: tuple[detect.Signal, ...], config: detect.DetectConfig):
    """(detector, its jitted `update`), shared by every monitor over the same signals and
    configuration: one compile for all the runs of a campaign or the steps of a log."""
    det = detect.detector(signals, config)
    return det, jax.jit(det.update)


class Monitor:
    """Online detection and diagnosis over logged step metrics (fm statistic names)."""

    def __init__(
        self,
        signals: Sequence[str],
        *,
        config: detect.DetectConfig | None = None,
        evidence_steps: int = 2,
        quiet: int = 10,
        history: int = 64,
        trainer: str | None = None,
        diagnoser: str = "auto",
    ) -> None:
        """`signals`: the fm statistics the log carries at every step (the detector watches
        those of its defaults among them; all of them go to the diagnoser). `trainer`: whose
        log it is (a view of `fm.logs.learned`); `diagnoser`: "auto", "learned" or "rules"
        (`fm.logs.learned.pick`: the rules where no learned model is shipped for `trainer`)."""
        watched = detector_signals(signals)
        if not watched:
            names = ", ".join(s.name for s in detect.default_signals())
            raise ValueError(
                f"none of the logged statistics {sorted(signals)} is a detector signal; fm "
                f"needs at least one of: {names}"
            )
        self.signals = tuple(signals)
        self.detector, self._update = compiled(watched, config or detect.DetectConfig())
        self._read = tuple(n for n in detect.statistics_read(watched) if n in self.signals)
        self.view = views.view(signals)
        self.state = self.detector.init()
        self.evidence_steps = evidence_steps
        self.quiet = quiet
        self.history = history
        self.records: list[dict[str, float]] = []
        self.episode: dict[str, Any] | None = None  # alarm_step, flagged, last_alarm, diagnosed
        self.alarms = 0
        self.diagnoses: list[dict[str, Any]] = []
        self.cases: list[Case] = []
        self.choice = learned.pick(trainer, diagnoser)
        self._learned = dg.Learned(self.choice.model) if self.choice.model else None

    @property
    def watched(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.detector.signals)

    def observe(self, step: int, values: Mapping[str, float | None]) -> list[dict[str, Any]]:
        """Feeds one step's values (by fm statistic name; a missing or None value is NaN, which
        the detector flags as non-finite) and returns the events of that step."""
        record = {name: _float(values.get(name)) for name in self.signals}
        x = {name: np.float32(record[name]) for name in self._read}
        out, self.state = self._update(x, self.state)
        self.records = [*self.records[-(self.history - 1) :], {"step": step, **record}]
        events = []
        if bool(out.alarm):
            flags = np.asarray(out.flags)
            scores = np.asarray(out.scores)
            flagged = [n for n, f in zip(self.watched, flags, strict=True) if f]
            self.alarms += 1
            events.append({
                "step": step, "event": "alarm", "signals": flagged,
                "scores": {n: round(float(scores[self.watched.index(n)]), 3) for n in flagged},
                "values": {n: record[n] for n in flagged},
            })  # fmt: skip
            if self.episode is None:
                self.episode = {"alarm_step": step, "flagged": flagged, "diagnosed": False}
            self.episode["last_alarm"] = step
        ep = self.episode
        if ep is not None:
            if not ep["diagnosed"] and step >= ep["alarm_step"] + self.evidence_steps:
                events.append(self._diagnose(step))
            elif ep["diagnosed"] and step - ep["last_alarm"] >= self.quiet:
                self.episode = None
        return events

    def finish(self) -> list[dict[str, Any]]:
        """At the end of a log: the diagnosis of an episode still waiting for evidence."""
        ep = self.episode
        if ep is None or ep["diagnosed"] or not self.records:
            return []
        return [self._diagnose(self.records[-1]["step"])]

    def _diagnose(self, step: int) -> dict[str, Any]:
        ep = self.episode
        records = list(self.records)
        index = next(i for i, r in enumerate(records) if r["step"] >= ep["alarm_step"])
        if index == 0:  # an alarm with no baseline before it: the evidence is its own baseline
            records.insert(0, dict(records[0]))
            index = 1
        diagnoser = self._learned or dg.diagnose
        d = diagnoser(records, index, flagged=ep["flagged"], types=self.view.visible)
        ep["diagnosed"] = True
        self.cases.append(Case(ep["alarm_step"], records, index, tuple(ep["flagged"])))
        event = {
            "step": step,
            "event": "diagnosis",
            "alarm_step": ep["alarm_step"],
            "diagnoser": self.choice.name,
            "top": d.top,
            "name": taxonomy.get(d.top).name,
            "family": d.family,
            "family_confidence": round(d.family_confidence, 4),
            "ranking": [[t, round(p, 4)] for t, p in d.ranking[:3]],
            "evidence": [e.text for e in d.evidence[:3]],
            "indistinguishable_from": list(self.view.twins(d.top)),
            "summary": d.summary(),
        }
        self.diagnoses.append(event)
        return event


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)

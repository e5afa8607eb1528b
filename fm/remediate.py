"""Remediation (host side): from a diagnosis to actions, through a trainer's `Controller`.

The closed loop, one alarm episode at a time:

  alarm → wait `evidence_steps` → diagnose → attempt 1: roll back to the last healthy
  checkpoint before the alarm and apply the first remedy of the diagnosed type → verify for
  `verify_window` steps → recovered, or the alarm returns: the next attempt (further back,
  the next remedy) → after the plan is used up: halt with a report.

Remedies act only through knobs a user would also turn (`REMEDY_KNOBS`), remedy switches,
checkpoint restores, data skipping and optimizer-moment resets. What a trainer can do is its
controller's declared `Capabilities`; every controller can roll back, skip data and halt with a
report. A remedy the trainer cannot perform is never dropped silently: the diagnosis event lists
it under "unavailable" with the reason (`availability`). A checkpoint is healthy once
`healthy_window` steps after it passed without an alarm; the latest healthy ones are pinned
(never deleted while they are rollback targets).

An unsure diagnosis (top-1 confidence below `unsure_below`) gets no remedy chosen for its
guess: only what is safe for every type still in the running (a rollback), then a halt whose
report names the candidates.

`Controller` is what a trainer implements; rftjax has one, and another trainer can write its
own in a few lines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from fm import diagnose as dg
from fm import taxonomy


class RestoreError(Exception):
    """Raised by `Controller.restore` when that checkpoint cannot be used (e.g. it is
    corrupt); the remediator drops it from its targets and tries an earlier one."""


class Capabilities(NamedTuple):
    """What a trainer's controller declares it can do beyond what every controller does (roll
    back to a checkpoint, skip data, halt with a report).

    Attributes:
      knobs: numeric settings `set_knobs` accepts and `knobs()` reports (e.g. "lr",
        "lr_scale", "lr_cap", "grad_clip", "kl_coef", "is_cap", "temperature").
      switches: remedy switches, 0/1 settings named after the remedy they perform (e.g.
        "resync_sampler", "skip_nonfinite"); also set with `set_knobs`.
      reset_moments: whether `reset_moments()` resets the optimizer's moment estimates.
    """

    knobs: frozenset[str] = frozenset()
    switches: frozenset[str] = frozenset()
    reset_moments: bool = False


class Controller(Protocol):
    """The trainer's side of remediation. Steps are the trainer's step numbers."""

    def capabilities(self) -> Capabilities:
        """The knobs, switches and optional actions this trainer supports."""

    def restore(self, step: int) -> None:
        """Continue from the checkpoint of `step` (train state only; knobs stay as set).
        Raises `RestoreError` if that checkpoint cannot be used."""

    def knobs(self) -> Mapping[str, float]:
        """The current runtime knobs by name."""

    def set_knobs(self, **changes: float) -> None: ...

    def skip(self, n: int) -> None:
        """Skip the next `n` batches of data."""

    def reset_moments(self) -> None:
        """Reset the optimizer's moment estimates (only if `Capabilities.reset_moments`)."""

    def pin(self, step: int) -> None: ...

    def unpin(self, step: int) -> None: ...

    def halt(self, report: Mapping[str, Any]) -> None:
        """Stop training after this step, with `report` as the reason."""


def _halve(name: str, *, default: float) -> Callable[[Mapping, Mapping], dict[str, float]]:
    def change(now, initial):
        del initial
        value = float(now[name])
        return {name: value * 0.5 if value > 0 else default}

    return change


def _restore(*names: str, switch: str) -> Callable[[Mapping, Mapping], dict[str, float]]:
    """Sets `names` back to their values at the start of the run and, where the trainer has
    the `switch` knob, turns it on: the configured values then reach the computation even if a
    stage between the knob and its use (a sampler's defaults, a config parser) changes them."""

    def change(now, initial):
        out = {n: float(initial[n]) for n in names if n in initial}
        return {**out, switch: 1.0} if switch in now else out

    return change


_SAMPLER = ("temperature", "top_p", "top_k")
_COEFFICIENTS = ("kl_coef", "ent_coef", "eps_low", "eps_high")
# Remedy → knob changes from (current knobs, knobs at the start of the run).
REMEDY_KNOBS: dict[str, Callable[[Mapping, Mapping], dict[str, float]]] = {
    "lr_scale": lambda now, initial: {"lr_scale": float(now["lr_scale"]) * 0.5},
    # Cap the learning rate at what the schedule asked for at the start.
    "lr_cap": lambda now, initial: {
        "lr_cap": min(float(now["lr_cap"]), float(initial["lr"]) * float(initial["lr_scale"]))
    },
    "grad_clip": _halve("grad_clip", default=1.0),
    "raise_kl": lambda now, initial: {"kl_coef": max(2.0 * float(now["kl_coef"]), 0.02)},
    "truncated_is": lambda now, initial: {"is_cap": 2.0},
    "restore_sampler": _restore(*_SAMPLER, switch="restore_sampler"),
    "restore_coefficients": _restore(*_COEFFICIENTS, switch="restore_coefficients"),
}
# Remedies that mitigate a root cause they cannot remove: truncated importance sampling bounds
# what a sampler/trainer mismatch does to the update, but the mismatch stays; skipping
# non-finite steps keeps the weights finite, but the bad gradients keep coming. Once one is
# applied, alarms on these statistics, and on those flagged so far in the episode (the fault's
# signature), are accepted: verification and healthy checkpoints then look at everything else.
MITIGATES: dict[str, tuple[str, ...]] = {
    "truncated_is": ("mismatch_k3", "mismatch_max_abs", "is_ratio_max", "is_ess"),
    # Skipped steps still see their non-finite gradients; the weights stay finite.
    "skip_nonfinite": ("nonfinite_grads", "grad_norm", "update_param_ratio"),
    # The environment still fails calls, and the rollout statistics still count the samples
    # it failed (their errors, rewards, lengths); the learner no longer trains on them, so the
    # learner's own statistics (KL, entropy, gradients, advantages) must come back.
    "mask_unscorable": (
        "tool_error_rate",
        "tool_aborted_frac",
        "reward_mean",
        "reward_std",
        "length_mean",
        "clip_ratio",
        "frac_zero_std_groups",
    ),
}
# Remedies performed by the controller itself, not by knobs; every controller can do all but
# `reset_moments` (a declared capability).
CONTROLLER_REMEDIES = ("rollback", "skip_data", "reset_moments", "halt")
ALWAYS_AVAILABLE = ("rollback", "skip_data", "halt")
# Knob remedies: the knobs each reads or sets; alternatives where any one of them suffices.
_NEEDS_ALL = {
    "lr_scale": ("lr_scale",),
    "lr_cap": ("lr_cap", "lr", "lr_scale"),
    "grad_clip": ("grad_clip",),
    "raise_kl": ("kl_coef",),
    "truncated_is": ("is_cap",),
}
_NEEDS_ANY = {
    "restore_sampler": ("restore_sampler", *_SAMPLER),
    "restore_coefficients": ("restore_coefficients", *_COEFFICIENTS),
}


def availability(remedy: str, caps: Capabilities) -> str | None:
    """None if a trainer with `caps` can perform `remedy`, else why not (one sentence)."""
    settings = caps.knobs | caps.switches
    if remedy in ALWAYS_AVAILABLE:
        return None
    if remedy == "reset_moments":
        return None if caps.reset_moments else "the trainer cannot reset optimizer moments"
    if remedy in _NEEDS_ALL:
        missing = [k for k in _NEEDS_ALL[remedy] if k not in settings]
        return f"the trainer has no knob {', '.join(missing)}" if missing else None
    if remedy in _NEEDS_ANY:
        if settings & set(_NEEDS_ANY[remedy]):
            return None
        return f"the trainer has none of the knobs {', '.join(_NEEDS_ANY[remedy])}"
    if remedy in taxonomy.REMEDIES:  # a remedy switch
        return None if remedy in caps.switches else f"the trainer has no switch {remedy}"
    raise ValueError(f"unknown remedy {remedy!r}; remedies: {', '.join(taxonomy.REMEDIES)}")


class Action(NamedTuple):
    remedy: str
    knobs: dict[str, float]  # knob changes (empty for controller remedies)


class Health:
    """Healthy-checkpoint bookkeeping: a saved checkpoint is healthy when the `window` steps
    after it passed with no alarm; the latest `keep` healthy ones are pinned."""

    def __init__(self, controller: Controller, *, window: int, keep: int = 2) -> None:
        self.controller, self.window, self.keep = controller, window, keep
        self.pending: list[int] = []
        self.healthy: list[int] = []

    def saved(self, step: int) -> None:
        if step not in self.pending and step not in self.healthy:
            self.pending.append(step)

    def observe(self, step: int, alarm: bool) -> list[int]:
        """Records a step; returns checkpoints that became healthy at it."""
        if alarm:  # every checkpoint still in its window is suspect
            self.pending = [c for c in self.pending if c + self.window < step]
        ready = [c for c in self.pending if step >= c + self.window]
        self.pending = [c for c in self.pending if c not in ready]
        for c in ready:
            self.healthy.append(c)
            self.controller.pin(c)
        self.healthy.sort()
        for c in self.healthy[: -self.keep]:
            self.controller.unpin(c)
        self.healthy = self.healthy[-self.keep :]
        return ready

    def rolled_back(self, step: int) -> None:
        """After a restore to `step`: later checkpoints are from the abandoned timeline."""
        self.pending = [c for c in self.pending if c <= step]
        for c in [c for c in self.healthy if c > step]:
            self.discard(c)

    def discard(self, step: int) -> None:
        """`step` is no rollback target any more (abandoned, or found corrupt)."""
        self.pending = [c for c in self.pending if c != step]
        if step in self.healthy:
            self.healthy.remove(step)
            self.controller.unpin(step)

    def target(self, before: int, skip: int = 0) -> int | None:
        """The latest healthy checkpoint before `before` (`skip` of them left out: go further
        back when a rollback did not help)."""
        candidates = [c for c in self.healthy if c < before]
        return candidates[-1 - skip] if len(candidates) > skip else None


def _considered(diagnosis: dg.Diagnosis) -> list[str]:
    """The types whose remedies a plan draws on: the best guess, and the runner-up when the
    guess is not confident."""
    ranked = [diagnosis.top]
    if diagnosis.ranking[0][1] < 0.5 and len(diagnosis.ranking) > 1:
        ranked.append(diagnosis.ranking[1][0])
    return ranked


def unavailable(diagnosis: dg.Diagnosis, caps: Capabilities) -> list[dict[str, str]]:
    """The remedies fm's plan would draw on for `diagnosis` that a trainer with `caps` cannot
    perform, each {"remedy", "type", "reason"} (empty when it can do them all)."""
    out, seen = [], set()
    for type_id in _considered(diagnosis):
        for remedy in taxonomy.get(type_id).remedies:
            reason = availability(remedy, caps)
            if reason is not None and remedy not in seen:
                seen.add(remedy)
                out.append({"remedy": remedy, "type": type_id, "reason": reason})
    return out


# Below this top-1 confidence a diagnosis is unsure: with calibrated confidences (the learned
# diagnoser's temperature is fitted for it) its best guess is then wrong more often than right,
# so a remedy chosen for that guess is a gamble.
UNSURE_BELOW = 0.5
# What an unsure plan may do: safe whatever the fault is (a rollback only restores a state the
# run already had and verified), before the halt that names the candidates.
SAFE_REMEDIES = ("rollback",)


def _check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the unsure threshold is a confidence in [0, 1], got {threshold}")
    return threshold


def unsure(diagnosis: dg.Diagnosis, threshold: float = UNSURE_BELOW) -> bool:
    """Whether the diagnosis's top-1 confidence is below `threshold` (in [0, 1]; 0: never)."""
    return diagnosis.ranking[0][1] < _check_threshold(threshold)


def candidates(diagnosis: dg.Diagnosis, *, mass: float = 0.9, most: int = 5) -> list[str]:
    """The types still in the running: the fewest top-ranked types whose confidences add up
    to `mass` (at most `most`, at least one)."""
    out, total = [], 0.0
    for type_id, p in diagnosis.ranking[:most]:
        out.append(type_id)
        total += p
        if total >= mass:
            break
    return out


def plan(
    diagnosis: dg.Diagnosis,
    *,
    supported: Callable[[str], bool],
    unsure_below: float = UNSURE_BELOW,
) -> list[str]:
    """Remedies to try in order for a diagnosis (each attempt also rolls back): the best
    guess's remedies, then the runner-up's when the guess is not confident; "halt" ends it.
    Remedies the trainer does not support are left out (`unavailable` says which and why).
    An `unsure` diagnosis (top-1 confidence below `unsure_below`) gets only the remedies safe
    for every candidate type (`SAFE_REMEDIES`: a rollback), then the halt."""
    if unsure(diagnosis, unsure_below):
        return [*(r for r in SAFE_REMEDIES if r == "rollback" or supported(r)), "halt"]
    ranked = _considered(diagnosis)
    steps: list[str] = []
    for type_id in ranked:
        for remedy in taxonomy.get(type_id).remedies:
            if remedy == "halt":
                return [*steps, "rollback", "halt"] if not steps else [*steps, "halt"]
            if remedy not in steps and (remedy == "rollback" or supported(remedy)):
                steps.append(remedy)
    if steps and steps[0] != "rollback":  # a plain rollback first: the fault may be transient
        steps.insert(0, "rollback")
    return [*steps, "halt"]


# A planner: (diagnosis, supported(remedy), alarm step) -> remedies to try in order, "halt"
# last. `plan` is fm's; the others are the baselines FaultBench compares it with.
Planner = Callable[[dg.Diagnosis, Callable[[str], bool], int], list[str]]


def fixed_plan(*remedies: str) -> Planner:
    """The same attempts whatever the diagnosis (each rolls back first), then halt. E.g.
    rollback + skip the data window (as PaLM did on loss spikes) or rollback + lr × 0.5 (as
    OPT did)."""

    def planner(diagnosis, supported, alarm_step):
        del diagnosis, alarm_step
        return [r for r in remedies if r == "rollback" or supported(r)] + ["halt"]

    return planner


def random_plan(seed: int, attempts: int = 3) -> Planner:
    """`attempts` remedies drawn at random from those the trainer supports, then halt: the
    baseline of a remediator that knows which knobs exist but not which fault it faces.
    Seeded by (seed, alarm step), so a resumed run draws the same."""

    def planner(diagnosis, supported, alarm_step):
        del diagnosis
        choices = [
            r for r in taxonomy.REMEDIES if r != "halt" and (r == "rollback" or supported(r))
        ]
        rng = np.random.default_rng([seed, alarm_step])
        return [str(r) for r in rng.choice(choices, size=attempts)] + ["halt"]

    return planner


PLANNERS = ("fm", "random", "rollback_skip", "rollback_lr")


def planner_for(name: str, *, seed: int = 0, unsure_below: float = UNSURE_BELOW) -> Planner:
    """fm's planner (unsure below `unsure_below`) or a baseline by name (`PLANNERS`)."""
    if name == "fm":
        return lambda d, supported, alarm_step: plan(
            d, supported=supported, unsure_below=unsure_below
        )
    if name == "random":
        return random_plan(seed)
    if name == "rollback_skip":
        return fixed_plan("skip_data", "skip_data", "skip_data")
    if name == "rollback_lr":
        return fixed_plan("lr_scale", "lr_scale", "lr_scale")
    raise ValueError(f"unknown remediation policy {name!r}; accepted: {', '.join(PLANNERS)}")


def _capabilities(controller: Controller) -> Capabilities:
    if not callable(getattr(controller, "capabilities", None)):
        raise TypeError(
            f"{type(controller).__name__} does not declare its capabilities: a Controller "
            "needs capabilities() -> fm.remediate.Capabilities (knobs, switches, reset_moments)"
        )
    caps = controller.capabilities()
    if not isinstance(caps, Capabilities):
        raise TypeError(f"capabilities() must return fm.remediate.Capabilities, got {caps!r}")
    missing = sorted((caps.knobs | caps.switches) - set(controller.knobs()))
    if missing:
        raise ValueError(f"declared knobs {missing} are missing from the controller's knobs()")
    return caps


class _Episode(NamedTuple):
    alarm_step: int
    diagnosis: dg.Diagnosis | None = None
    plan: tuple[str, ...] = ()
    attempt: int = -1
    verify_until: int = -1
    target: int | None = None


def _to_json(d: dg.Diagnosis | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {**d._asdict(), "evidence": [e._asdict() for e in d.evidence]}


def _from_json(d: Mapping[str, Any] | None) -> dg.Diagnosis | None:
    if d is None:
        return None
    return dg.Diagnosis(
        ranking=tuple((str(t), float(p)) for t, p in d["ranking"]),
        family=d["family"],
        family_confidence=float(d["family_confidence"]),
        evidence=tuple(dg.Evidence(**e) for e in d["evidence"]),
    )


class Remediator:
    """The closed loop. Call `saved(step)` after each checkpoint and `observe(...)` after each
    step; it acts through the controller and returns the events of that step (dicts with an
    "event" key: diagnosis, action, verification, halt)."""

    def __init__(
        self,
        controller: Controller,
        *,
        diagnoser: Callable[..., dg.Diagnosis] = dg.diagnose,
        verify_window: int = 20,
        healthy_window: int = 20,
        evidence_steps: int = 2,
        history: int = 64,
        skip_batches: int = 0,
        planner: Planner | None = None,
        unsure_below: float = UNSURE_BELOW,
    ) -> None:
        """`planner`: diagnosis → remedies (default: fm's `plan`; `planner_for` names the
        baselines). `unsure_below`: the top-1 confidence below which a diagnosis is unsure
        (`unsure`): fm's plan then only rolls back and halts naming the candidates, and the
        diagnosis event says `unsure` whatever the planner."""
        self.unsure_below = _check_threshold(unsure_below)
        self.controller = controller
        self.diagnoser = diagnoser
        self.planner = planner or planner_for("fm", unsure_below=unsure_below)
        self.verify_window = verify_window
        self.evidence_steps = evidence_steps
        self.history_len = history
        self.skip_batches = skip_batches
        self.health = Health(controller, window=healthy_window)
        self.capabilities = _capabilities(controller)
        self.initial_knobs = dict(controller.knobs())
        self.records: list[dict[str, float]] = []
        self.episode: _Episode | None = None
        self.halted = False
        self._flagged: list[str] = []
        self.accepted: set[str] = set()  # signals a mitigation left abnormal on purpose
        self._seen: set[str] = set()  # signals flagged so far in the current episode

    def saved(self, step: int) -> None:
        self.health.saved(step)

    def state_dict(self) -> dict[str, Any]:
        """What the remediator holds, as JSON (saved with each checkpoint): a run resumed from
        it goes on as if it had not stopped."""
        ep = self.episode
        return {
            "records": self.records,
            "halted": self.halted,
            "flagged": self._flagged,
            "accepted": sorted(self.accepted),
            "seen": sorted(self._seen),
            "initial_knobs": self.initial_knobs,
            "pending": self.health.pending,
            "healthy": self.health.healthy,
            "episode": None
            if ep is None
            else {**ep._asdict(), "diagnosis": _to_json(ep.diagnosis)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.halted = bool(state["halted"])
        self._flagged = list(state["flagged"])
        self.accepted = set(state.get("accepted", ()))
        self._seen = set(state.get("seen", ()))
        self.initial_knobs = dict(state["initial_knobs"])
        self.health.pending = [int(c) for c in state["pending"]]
        self.health.healthy = [int(c) for c in state["healthy"]]
        ep = state["episode"]
        self.episode = None
        if ep is not None:
            self.episode = _Episode(
                **{**ep, "plan": tuple(ep["plan"]), "diagnosis": _from_json(ep["diagnosis"])}
            )

    def supported(self, remedy: str) -> bool:
        """Whether the controller's declared capabilities allow `remedy`."""
        return availability(remedy, self.capabilities) is None

    def observe(
        self, step: int, stats: Mapping[str, float], alarm: bool, flagged: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        if self.halted:
            return []
        if alarm and flagged and set(flagged) <= self.accepted:
            alarm = False  # only what an applied mitigation leaves abnormal
        if alarm and self.episode is not None:
            self._seen |= set(flagged)
        self.records = [r for r in self.records if r["step"] < step]  # after a rollback
        self.records.append({"step": step, **stats})
        self.records = self.records[-self.history_len :]
        ep = self.episode
        if ep is not None and ep.diagnosis is not None:  # verifying an attempt
            self.health.observe(step, alarm)
            if alarm:
                returned = self._event(step, "verification", outcome="alarm_returned")
                return [returned, *self._next(step)]
            if step >= ep.verify_until:
                self.episode = None
                return [self._event(step, "verification", outcome="recovered")]
            return []
        self.health.observe(step, alarm)
        if ep is None and alarm:
            self.episode = ep = _Episode(alarm_step=step)
            self._flagged = list(flagged)
            self._seen = set(flagged)
        if ep is None or step < ep.alarm_step + self.evidence_steps:
            return []
        return self._diagnose(step)

    # -- internals -----------------------------------------------------------------------

    def _event(self, step: int, event: str, **fields: Any) -> dict[str, Any]:
        return {"step": step, "event": event, **fields}

    def _diagnose(self, step: int) -> list[dict[str, Any]]:
        ep = self.episode
        index = next(i for i, r in enumerate(self.records) if r["step"] >= ep.alarm_step)
        if index == 0:  # no baseline yet (an alarm in the first steps): evidence only
            self.records.insert(0, dict(self.records[0]))
            index = 1
        d = self.diagnoser(self.records, index, flagged=self._flagged)
        steps = tuple(self.planner(d, self.supported, ep.alarm_step))
        self.episode = ep._replace(diagnosis=d, plan=steps)
        doubt = unsure(d, self.unsure_below)
        missing = [] if doubt else unavailable(d, self.capabilities)
        event = self._event(
            step,
            "diagnosis",
            alarm_step=ep.alarm_step,
            top=d.top,
            family=d.family,
            ranking=[[t, round(p, 4)] for t, p in d.ranking[:3]],
            evidence=[e.text for e in d.evidence[:3]],
            plan=list(steps),
            unsure=doubt,
            **({"candidates": candidates(d)} if doubt else {}),
            **({"unavailable": missing} if missing else {}),
        )
        return [event, *self._next(step)]

    def _next(self, step: int) -> list[dict[str, Any]]:
        """The next attempt of the plan, or the halt."""
        ep = self.episode
        attempt = ep.attempt + 1
        remedy = ep.plan[attempt] if attempt < len(ep.plan) else "halt"
        if remedy == "halt":
            return self._halt(step, "the plan is used up" if attempt else "not remediable")
        events: list[dict[str, Any]] = []
        while True:
            target = self.health.target(ep.alarm_step, skip=max(attempt - 1, 0))
            if target is None:
                return [*events, *self._halt(step, "no healthy checkpoint before the alarm")]
            try:
                self.controller.restore(target)
                break
            except RestoreError as e:  # never roll back onto a corrupt checkpoint
                self.health.discard(target)
                events.append(self._event(step, "restore_failed", checkpoint=target, reason=str(e)))
        self.health.rolled_back(target)
        self.records = [r for r in self.records if r["step"] <= target]
        actions = [Action("rollback", {})]
        if remedy not in ("rollback",):
            actions.append(self._apply(remedy))
        if self.skip_batches:
            self.controller.skip(self.skip_batches)
        # Verified once the run is `verify_window` steps past the original alarm again.
        self.episode = ep._replace(
            attempt=attempt, verify_until=ep.alarm_step + self.verify_window, target=target
        )
        return [
            *events,
            self._event(
                step,
                "action",
                attempt=attempt + 1,
                restored_to=target,
                actions=[{"remedy": a.remedy, "knobs": a.knobs} for a in actions],
            ),
        ]

    def _apply(self, remedy: str) -> Action:
        if remedy == "skip_data":
            self.controller.skip(max(self.episode.alarm_step - (self.episode.target or 0), 1))
            return Action(remedy, {})
        if remedy == "reset_moments":
            self.controller.reset_moments()
            return Action(remedy, {})
        if remedy in MITIGATES:  # the fault's signature so far stays: accepted
            self.accepted |= {*MITIGATES[remedy], *self._seen}
        knobs = self.controller.knobs()
        settings = self.capabilities.knobs | self.capabilities.switches
        if remedy in REMEDY_KNOBS:
            changes = REMEDY_KNOBS[remedy](knobs, self.initial_knobs)
            changes = {k: v for k, v in changes.items() if k in settings}
        else:
            changes = {remedy: 1.0}
        self.controller.set_knobs(**changes)
        return Action(remedy, changes)

    def _halt(self, step: int, reason: str) -> list[dict[str, Any]]:
        ep = self.episode
        d = ep.diagnosis
        report = {
            "reason": reason,
            "alarm_step": ep.alarm_step,
            "diagnosis": d.top if d else None,
            "family": d.family if d else None,
            "summary": d.summary() if d else None,
            "attempts": ep.attempt + 1,
        }
        if d is not None and unsure(d, self.unsure_below):
            report["candidates"] = candidates(d)
            report["summary"] = (
                f"unsure (confidence {d.ranking[0][1]:.2f} < {self.unsure_below:g}): one of "
                f"{', '.join(report['candidates'])}; only a rollback was tried, no remedy "
                "specific to one of them"
            )
        self.controller.halt(report)
        self.halted = True
        return [self._event(step, "halt", **report)]

"""rftjax's side of fm's closed loop: the `fm.remediate.Controller` of a training run.

The loop owns the train state; the controller holds what remediation may change between steps
(state after a restore, knobs, the data offset, the fault's clock) and the loop reads them back
after every `Remediator.observe`. Restores keep the current knobs (the remedy is the change).

A fault is injected in the run's own time: its onset and duration count steps actually
executed, so a rollback does not undo a fault that has already begun (a persistent fault is
still there after the rollback; a transient one may be over). The loop moves the fault's onset
back by the steps a rollback replays (`FaultParams` are arrays: no recompilation).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fm import detect as fm_detect
from fm import diagnose as fm_diagnose
from fm import remediate, taxonomy
from rftjax import knobs as kn
from rftjax.checkpoint import Checkpointer, CorruptCheckpoint
from rftjax.config import RLConfig
from rftjax.train.step import TrainState, make_optimizer, seal_weights


class RunController:
    """Implements `fm.remediate.Controller` over a checkpointer and the loop's state."""

    def __init__(
        self, checkpointer: Checkpointer, rl: RLConfig, state: TrainState, knobs: kn.Knobs
    ) -> None:
        self.checkpointer = checkpointer
        self.rl = rl
        self.state = state
        self.knob_values = knobs
        self.data_offset = 0  # batches skipped so far
        self.replayed = 0  # steps re-executed after rollbacks (the fault's clock runs on)
        self.restored_to: int | None = None  # set by `restore`, cleared by the loop
        self.halt_report: dict[str, Any] | None = None
        self._shift: tuple[int, Any] | None = None

    # -- fm.remediate.Controller ----------------------------------------------------------

    def restore(self, step: int) -> None:
        """Restores `step` and deletes the checkpoints after it (the abandoned timeline: the
        replay writes its own). A corrupt step is set aside and raises
        `remediate.RestoreError`: the remediator then tries an earlier one."""
        template = jax.tree.map(jnp.zeros_like, self.state)
        try:
            self.state, _ = self.checkpointer.restore(step, template)
        except CorruptCheckpoint as e:
            self.checkpointer.quarantine(step)
            raise remediate.RestoreError(str(e)) from e
        self.checkpointer.delete_after(step)
        self.restored_to = step

    def capabilities(self) -> remediate.Capabilities:
        """Every knob and remedy switch of `rftjax.knobs`, and optimizer-moment resets."""
        switches = frozenset(kn.SWITCHES)
        return remediate.Capabilities(
            knobs=frozenset(kn.KNOB_NAMES) - switches, switches=switches, reset_moments=True
        )

    def knobs(self) -> dict[str, float]:
        return kn.knobs_to_dict(self.knob_values)

    def set_knobs(self, **changes: float) -> None:
        unknown = sorted(set(changes) - set(kn.KNOB_NAMES))
        if unknown:
            raise ValueError(f"unknown knobs {unknown}; knobs: {', '.join(kn.KNOB_NAMES)}")
        self.knob_values = kn.replace(self.knob_values, **changes)

    def skip(self, n: int) -> None:
        self.data_offset += int(n)

    def reset_moments(self) -> None:
        fresh = make_optimizer(self.rl).init(self.state.params)
        self.state = seal_weights(self.state._replace(opt_state=fresh))

    def pin(self, step: int) -> None:
        self.checkpointer.pin(step)

    def unpin(self, step: int) -> None:
        self.checkpointer.unpin(step)

    def halt(self, report: dict[str, Any]) -> None:
        self.halt_report = dict(report)

    # -- for the loop -----------------------------------------------------------------------

    def progress(self) -> dict[str, int]:
        """What a checkpoint must keep for a resumed run: the data offset and the fault's
        clock."""
        return {"data_offset": self.data_offset, "replayed": self.replayed}

    def resume(self, meta: dict[str, Any]) -> None:
        self.data_offset = int(meta.get("data_offset", 0))
        self.replayed = int(meta.get("replayed", 0))

    def take_restore(self, now: int) -> int | None:
        """The step restored to since the last call (None if none), counting the steps from it
        to `now` (the last step executed) as replayed."""
        step, self.restored_to = self.restored_to, None
        if step is not None:
            self.replayed += now - step
        return step

    def shifted(self, fparams):
        """The fault's parameters in run time: onset moved back by the replayed steps
        (computed once per rollback, so the hot loop makes no transfer)."""
        if fparams is None or not self.replayed:
            return fparams
        if self._shift is None or self._shift[0] != self.replayed:
            with jax.transfer_guard("allow"):
                onset = fparams.onset - jnp.asarray(self.replayed, fparams.onset.dtype)
            self._shift = (self.replayed, fparams._replace(onset=onset))
        return self._shift[1]


@functools.cache
def _learned() -> fm_diagnose.Learned:
    """The shipped learned diagnoser, read once per process."""
    return fm_diagnose.Learned()


class Manager:
    """`--fm=full`: the remediator over a `RunController`, fed the loop's step records."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        rl: RLConfig,
        state: TrainState,
        knobs: kn.Knobs,
        *,
        window: int = 20,
        policy: str = "fm",
        seed: int = 0,
        diagnoser: str = "learned",
        tools: bool = False,
    ) -> None:
        """`window`: steps without an alarm that make a checkpoint healthy and an attempt
        verified. `policy`: fm's planner or a baseline (`fm.remediate.planner_for`).
        `diagnoser`: "learned" (the model shipped with fm) or "rules". `tools`: whether the
        task calls tools (without them, tool-environment faults are not candidates)."""
        self.controller = RunController(checkpointer, rl, state, knobs)
        types = [t.id for t in taxonomy.CATALOG if tools or t.family != "tool-environment"]
        named = _learned() if diagnoser == "learned" else fm_diagnose.diagnose
        self.remediator = remediate.Remediator(
            self.controller,
            verify_window=window,
            healthy_window=window,
            planner=remediate.planner_for(policy, seed=seed),
            diagnoser=functools.partial(named, types=types),
        )

    def observe(self, step: int, values: dict[str, float]) -> list[dict[str, Any]]:
        """Events of this step (diagnosis, action, verification, halt)."""
        reading = fm_detect.Reading.from_record(values)
        stats = {k: v for k, v in values.items() if "/" not in k}
        return self.remediator.observe(step, stats, reading.alarm, reading.flagged)

    def saved(self, step: int) -> None:
        self.remediator.saved(step)

    def state_dict(self) -> dict[str, Any]:
        return self.remediator.state_dict()

    def resume(self, meta: dict[str, Any]) -> None:
        """Picks up where the checkpoint `meta` left: data offset, fault clock, history."""
        self.controller.resume(meta)
        if meta.get("remediator") is not None:
            self.remediator.load_state_dict(meta["remediator"])

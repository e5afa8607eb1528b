"""Preemption: SIGTERM or SIGINT ask the run to stop at the next step boundary.

The loop finishes the step in flight, saves a checkpoint of it, writes the summary and
returns; `--resume` then continues exactly there. A second SIGINT while the first is pending
interrupts at once (KeyboardInterrupt), as a user pressing Ctrl-C twice expects.

With several processes every one must stop at the same step (a save is collective), so the
decision is JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`),
which the coordination service raises on every process when one of them gets SIGTERM.
"""

from __future__ import annotations

import signal
import threading

# No heavy imports here: `catch_early` runs before jax is imported.

_early: list[int] = []  # signals caught by `catch_early` before a run began


def _note_early(signum, frame) -> None:
    del frame
    if _early and signum == signal.SIGINT:
        raise KeyboardInterrupt
    _early.append(signum)


def catch_early() -> None:
    """Records SIGTERM / SIGINT from the first line of an entry point on (imports of jax and
    compilation take seconds): the run that follows then stops at its first chance."""
    for sig in Preemption.SIGNALS:
        signal.signal(sig, _note_early)


class Preempted(Exception):
    """Raised when a stop was asked for before RL began: nothing to save; exit 0."""


class Preemption:
    """Context manager: installs the handlers (main thread only) and restores the previous
    ones on exit. `reached(step)` is the loop's question after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None  # the signal that asked to stop
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        import jax

        # Several processes: the coordination service's notifier handles SIGTERM (and SIGINT
        # keeps its default: one process cannot stop the others at a common step).
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            if _early:
                self.signal = _early[0]
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signal = signum
        from absl import logging

        logging.warning(
            "%s: finishing the current step, then saving a checkpoint and stopping "
            "(continue with --resume)",
            signal.Signals(signum).name,
        )

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def reached(self, step: int) -> bool:
        """True when the run must save and stop after `step` (the same on every process)."""
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = self.signal or signal.SIGTERM
                return True
            return False
        return self.requested

    def check(self, where: str) -> None:
        """Before RL begins (set-up, warm-up): raises `Preempted` if a stop was asked for."""
        if self.requested:
            raise Preempted(f"stopped by {signal.Signals(self.signal).name} during {where}")

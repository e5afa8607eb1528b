"""Orbax checkpoints of the train state plus JSON metadata (data cursor, knobs, config).

Keeps the last N steps plus any pinned steps (the remediator pins the last healthy one); pins
live in `pins.json` beside the steps so they survive restarts. Saves are Orbax's atomic,
asynchronous saves: a half-written step is never listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

_PINS = "pins.json"


@dataclasses.dataclass
class PinnedSteps:
    """Preservation policy: keep every step in `steps` (mutable at run time)."""

    steps: set[int] = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        del context
        return [c.step in self.steps for c in checkpoints]


class Checkpointer:
    """Save / restore `(state, meta)` pairs by step under `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._pins = PinnedSteps(set(self._read_pins()))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy([pp.LatestN(max_to_keep), self._pins]),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"), options=options
        )

    def _read_pins(self) -> list[int]:
        path = os.path.join(self.directory, _PINS)
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [int(s) for s in json.load(f)]

    def _write_pins(self) -> None:
        if jax.process_index() != 0:  # every process holds the pins; one writes the file
            return
        path = os.path.join(self.directory, _PINS)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sorted(self._pins.steps), f)
        os.replace(tmp, path)

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `step` (None: latest) into the structure, shapes and dtypes of `target`."""
        self.wait()
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise ValueError(
                f"no checkpoint for step {step} in {self.directory}; kept steps: {self.all_steps()}"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return out.state, out.meta

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of `step` alone (cheap: no arrays are read)."""
        self.wait()
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out.meta

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def pin(self, step: int) -> None:
        self._pins.steps.add(int(step))
        self._write_pins()

    def unpin(self, step: int) -> None:
        self._pins.steps.discard(int(step))
        self._write_pins()

    @property
    def pinned(self) -> list[int]:
        return sorted(self._pins.steps)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

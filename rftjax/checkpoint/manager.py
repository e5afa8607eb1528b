"""Orbax checkpoints of the train state plus JSON metadata (data cursor, knobs, config).

Keeps the last N steps plus any pinned steps (the remediator pins the last healthy one); pins
live in `pins.json` beside the steps so they survive restarts. Saves are Orbax's atomic,
asynchronous saves: a half-written step is never listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from fm import integrity

_PINS = "pins.json"


class CorruptCheckpoint(Exception):
    """A step that cannot be restored as it was saved: unreadable files, or arrays whose
    checksum differs from the one recorded at save time."""


def _words(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return integrity.checksum(x)


_checksums = jax.jit(lambda leaves: [_words(x) for x in leaves])


def checksums(tree: Any) -> dict[str, int]:
    """{leaf path: uint32 checksum} of a pytree of arrays (one compiled program per
    structure; the result is a few scalars)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
    from rftjax import parallel  # arrays of several processes are gathered

    values = parallel.fetch(_checksums(list(leaves)))
    return {jax.tree_util.keystr(p): int(np.asarray(v)) for p, v in zip(paths, values, strict=True)}


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
            self.directory, item_names=("state", "meta", "integrity"), options=options
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
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
                integrity=ocp.args.JsonSave({"checksums": checksums(state)}),
            ),
            force=force,
        )

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `step` (None: latest) into the structure, shapes and dtypes of `target`,
        and checks it against the checksums written with it. Raises `CorruptCheckpoint`."""
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
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        checked = os.path.isdir(os.path.join(self.directory, str(step), "integrity"))
        if checked:  # (steps written before checksums existed restore unchecked)
            items["integrity"] = ocp.args.JsonRestore()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt step
            raise CorruptCheckpoint(
                f"checkpoint step {step} in {self.directory} cannot be read: "
                f"{type(e).__name__}: {str(e)[:300]}"
            ) from e
        if checked:
            expected = out.integrity.get("checksums", {})
            got = checksums(out.state)
            bad = sorted(k for k in expected if got.get(k) != expected[k])
            if bad or set(got) != set(expected):
                what = ", ".join(bad[:3]) or "its list of arrays"
                raise CorruptCheckpoint(
                    f"checkpoint step {step} in {self.directory} does not match the checksums "
                    f"written with it ({len(bad)} array(s) differ: {what})"
                )
        return out.state, out.meta

    def restore_latest(
        self, target: Any, *, check=None
    ) -> tuple[int, Any, dict[str, Any], list[tuple[int, str]]]:
        """The newest step that restores intact: (step, state, meta, [(corrupt step, why)]).
        Corrupt steps are moved aside; `check(meta)` (e.g. the config matches) runs on each
        step's metadata before its arrays are read and may raise."""
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                if check is not None:
                    check(self.read_meta(step))
                state, meta = self.restore(step, target)
                return step, state, meta, skipped
            except CorruptCheckpoint as e:
                logging.error("%s; falling back to an earlier step", e)
                skipped.append((step, str(e)))
                self.quarantine(step)
        reasons = "; ".join(why for _, why in skipped)
        raise CorruptCheckpoint(f"no checkpoint in {self.directory} restores intact: {reasons}")

    def quarantine(self, step: int) -> str | None:
        """Moves a corrupt step to `<directory>.corrupt/<step>-<time>` (kept for inspection)
        and unpins it. Returns the new path (None on processes other than 0)."""
        self.wait()
        self.unpin(step)
        path = None
        if jax.process_index() == 0:
            aside = self.directory + ".corrupt"
            os.makedirs(aside, exist_ok=True)
            path = os.path.join(aside, f"{step}-{int(time.time() * 1000)}")
            shutil.move(os.path.join(self.directory, str(step)), path)
        self._manager.reload()
        return path

    def delete_after(self, step: int) -> None:
        """Deletes the steps after `step` (and their pins)."""
        self.wait()
        for later in [s for s in self.all_steps() if s > step]:
            self.unpin(later)
            self._manager.delete(later)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of `step` alone (cheap: no arrays are read)."""
        self.wait()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt step
            raise CorruptCheckpoint(
                f"checkpoint step {step} in {self.directory}: its metadata cannot be read: "
                f"{type(e).__name__}: {str(e)[:300]}"
            ) from e
        if not isinstance(out.meta, dict):
            raise CorruptCheckpoint(f"checkpoint step {step}: its metadata is not a JSON object")
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

"""Orbax checkpoints of the train state plus JSON metadata (data cursor, knobs, config).

Keeps the last N steps plus any pinned steps (the remediator pins the last healthy one); pins
live in `pins.json` beside the steps so they survive restarts. Saves are Orbax's atomic,
asynchronous saves: a half-written step is never listed. The size of every file of a finished
step is recorded in `files.json`, so that a step that cannot be read is explained in one
sentence (which file is missing or cut short) rather than by the storage layer's error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
_FILES = "files.json"  # {step: {path in the step folder: size in bytes}}


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


def damage(recorded: dict[str, int] | None, found: dict[str, int], error: Exception) -> str:
    """What is wrong with a step's files, in words: the files missing or whose size changed
    since the save (`recorded` against `found`, {path: bytes}), else (no record, or the same
    sizes: bytes changed in place) the read error's first line without the storage spec."""
    if recorded:
        missing = sorted(set(recorded) - set(found))
        resized = sorted(p for p in recorded if p in found and found[p] != recorded[p])
        parts = [f"file {p} is missing" for p in missing[:2]]
        parts += [
            f"file {p} is {'truncated' if found[p] < recorded[p] else 'longer than saved'} "
            f"({found[p]:,} of {recorded[p]:,} bytes)"
            for p in resized[:2]
        ]
        more = len(missing) + len(resized) - len(parts)
        if parts:
            return ", ".join(parts) + (f" (and {more} more)" if more > 0 else "")
    return f"it cannot be read ({_first_line(error)})"


def _first_line(error: BaseException) -> str:
    """The most specific line of an error chain: a storage status line ("OUT_OF_RANGE: ...",
    "DATA_LOSS: ...") if there is one, without the spec dumps that follow it."""
    lines = []
    while error is not None:
        lines += str(error).splitlines()
        error = error.__cause__ or error.__context__
    status = [m for m in (re.search(r"\b[A-Z_]{5,}: .*", ln) for ln in lines) if m]
    text = status[0].group(0) if status else (lines or ["unknown error"])[0].strip()
    return re.split(r" \[tensorstore_spec| See full TensorStore", text)[0][:300]


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
        self._unrecorded: set[int] = set()  # saved steps whose file sizes are not yet written

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
        self.wait()  # (Orbax waits for the previous save anyway) records its files
        self._unrecorded.add(int(step))
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
            raise CorruptCheckpoint(self._unreadable(step, e)) from e
        if checked:
            expected = out.integrity.get("checksums", {})
            got = checksums(out.state)
            bad = sorted(k for k in expected if got.get(k) != expected[k])
            if bad or set(got) != set(expected):
                what = ", ".join(bad[:3]) or "its list of arrays"
                raise CorruptCheckpoint(
                    f"checkpoint step {step} in {self.directory}: the array data in state/ "
                    f"does not match the checksums written with it ({len(bad)} array(s) "
                    f"differ: {what}; a flipped bit or a rewritten file)"
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
            except CorruptCheckpoint as e:
                aside = self.quarantine(step)
                skipped.append((step, f"{e} (moved to {aside})" if aside else str(e)))
                continue
            # One sentence a bad step: what is wrong with it, and what came instead.
            skipped = [(s, f"{why}; restored step {step} instead") for s, why in skipped]
            for _, why in skipped:
                logging.error("%s", why)
            return step, state, meta, skipped
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
            raise CorruptCheckpoint(self._unreadable(step, e)) from e
        if not isinstance(out.meta, dict):
            raise CorruptCheckpoint(f"checkpoint step {step}: its metadata is not a JSON object")
        return out.meta

    def _step_files(self, step: int) -> dict[str, int]:
        """{path relative to the step folder: size} of every file of `step` on disk."""
        root = os.path.join(self.directory, str(step))
        return {
            os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
            for d, _, names in os.walk(root)
            for f in names
        }

    def _recorded_files(self) -> dict[str, dict[str, int]]:
        path = os.path.join(self.directory, _FILES)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _record_files(self) -> None:
        """Writes the file sizes of the finished steps saved since the last call (process 0;
        steps no longer kept are dropped from the record)."""
        done, self._unrecorded = self._unrecorded, set()
        if jax.process_index() != 0:
            return
        kept = set(self.all_steps())
        record = {k: v for k, v in self._recorded_files().items() if int(k) in kept}
        record.update({str(s): self._step_files(s) for s in done if s in kept})
        path = os.path.join(self.directory, _FILES)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    def _unreadable(self, step: int, error: Exception) -> str:
        """One sentence for a step that failed to read: which file is missing or cut short
        (against the sizes recorded after its save), else the storage layer's first error
        line."""
        why = damage(self._recorded_files().get(str(step)), self._step_files(step), error)
        return f"checkpoint step {step} in {self.directory}: {why}"

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
        if self._unrecorded:
            self._record_files()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Run logs: `metrics.jsonl` (one JSON object a step), `events.jsonl` (alarms, diagnoses,
actions) and TensorBoard events. On resume, records after the restored step are dropped: they
came from steps that will be run again. A rollback's dropped steps (the abandoned branch) move
to `metrics_abandoned.jsonl`, each tagged with the rollback (`rollback_step`, `rolled_back_to`),
so that a report can draw what went wrong next to the timeline that was kept."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tensorboardX import SummaryWriter

from fm.report import ABANDONED, read_jsonl  # the trainer's logs and fm's report read them alike

__all__ = ["ABANDONED", "JsonlLog", "MetricsWriter", "read_jsonl", "write_jsonl"]


def write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    """Replaces `path` with `records`, atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def _truncate_jsonl(path: str, last_step: int) -> list[dict[str, Any]]:
    """Keeps records with step <= last_step (and drops a line cut short by a crash)."""
    if not os.path.exists(path):
        return []
    kept = [r for r in read_jsonl(path) if r.get("step", math.inf) <= last_step]
    write_jsonl(path, kept)
    return kept


class JsonlLog:
    """Append-only JSON-lines file; `records` holds what a resumed run kept and `count` the
    records in the file."""

    def __init__(self, path: str, *, resume_step: int = 0, keep: int | None = None):
        """A resumed log keeps the records of steps <= `resume_step`, or with `keep` its first
        `keep` records (a history written in time order, e.g. events across rollbacks)."""
        self.path = path
        self.records: list[dict[str, Any]] = []
        if keep is not None:
            self.records = read_jsonl(path)[:keep]
            write_jsonl(path, self.records)
        elif resume_step:
            self.records = _truncate_jsonl(path, resume_step)
        elif os.path.exists(path):
            os.remove(path)
        self.count = len(self.records)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.count += 1

    def cut(self, last_step: int) -> list[dict[str, Any]]:
        """Drops the records of steps after `last_step` (a rollback replays them); returns
        the dropped records."""
        self._file.close()
        dropped = [r for r in read_jsonl(self.path) if r.get("step", math.inf) > last_step]
        self.records = _truncate_jsonl(self.path, last_step)
        self.count = len(self.records)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        return dropped

    def close(self) -> None:
        self._file.close()


class MetricsWriter(JsonlLog):
    """metrics.jsonl plus the same scalars as TensorBoard events."""

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
        super().__init__(os.path.join(workdir, "metrics.jsonl"), resume_step=resume_step)
        # A resumed run keeps the branches abandoned so far (a replayed rollback writes its
        # branch again; readers keep the last copy of each step of a branch).
        self._abandoned = os.path.join(workdir, ABANDONED)
        if not resume_step and os.path.exists(self._abandoned):
            os.remove(self._abandoned)
        # purge_step drops TensorBoard events of steps that a resumed run writes again.
        self._tb = None
        if tensorboard:
            self._tb = SummaryWriter(
                os.path.join(workdir, "tensorboard"),
                purge_step=resume_step + 1 if resume_step else None,
            )

    def write_step(self, step: int, values: dict[str, Any]) -> None:
        self.write({"step": int(step), **values})
        if self._tb is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(name, value, step)

    def cut(self, last_step: int) -> list[dict[str, Any]]:
        """As `JsonlLog.cut`, and appends the dropped steps to metrics_abandoned.jsonl, tagged
        with the rollback: `rollback_step` (the last step of the branch, where the rollback
        was decided) and `rolled_back_to` (`last_step`)."""
        dropped = super().cut(last_step)
        if dropped:
            tag = {"rollback_step": max(int(r["step"]) for r in dropped)}
            tag["rolled_back_to"] = int(last_step)
            with open(self._abandoned, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({**r, **tag}) + "\n" for r in dropped)
        return dropped

    def close(self) -> None:
        super().close()
        if self._tb is not None:
            self._tb.close()

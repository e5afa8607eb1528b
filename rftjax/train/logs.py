"""Run logs: `metrics.jsonl` (one JSON object a step) and TensorBoard events."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tensorboardX import SummaryWriter


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drops records after `last_step` (written by a run that died after its last checkpoint)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if record.get("step", math.inf) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsWriter:
    """Appends step records; on resume keeps only records up to the restored step."""

    def __init__(self, workdir: str, *, resume_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if resume_step:
            _truncate_jsonl(self.path, resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": int(step), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()

"""Reading a trainer's log files into step records: `(step, {metric name: value})`.

Readers never guess silently: a missing file, an empty log, a malformed line (named by its
line number) or a record that is not an object is a `LogError` that says what was wrong and
what is accepted. Values are floats; `None` (TRL writes it when no sample could be scored)
stays `None`, meaning "not measured at this step"; text and other non-numbers are kept aside
and reported by name. A leading `train/` (how TRL's and OpenRLHF's TensorBoard and wandb
loggers prefix metric names) is removed.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import struct
import sys
import types
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

FORMATS = ("trl", "verl", "openrlhf", "tensorboard", "rftjax")
_PREFIX = "train/"
_STEP_NAMES = ("step", "global_step")


class LogError(ValueError):
    """A log fm cannot read, with what was wrong and what is accepted."""


class Records(NamedTuple):
    steps: list[int]  # ascending, unique
    metrics: list[dict[str, float | None]]  # one dict a step: numbers (NaN kept) or None
    text: tuple[str, ...]  # names whose values were not numbers (listed, not analysed)


def _number(value: Any) -> float | None | str:
    """A float, None (not measured) or "text" for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return "text"


def _strip(name: str) -> str:
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name


def records_from_dicts(
    dicts: Iterable[tuple[int | None, Mapping[str, Any]]], *, source: str
) -> Records:
    """Merges `(step or None, {name: value})` pairs into one record a step.

    A pair without a step takes its position (1-based). Several pairs of one step are merged
    (TRL writes the training and the evaluation entries of a step apart); a name given twice
    for one step keeps its first value.
    """
    by_step: dict[int, dict[str, float | None]] = {}
    text: set[str] = set()
    for position, (step, d) in enumerate(dicts, start=1):
        step = position if step is None else step
        merged = by_step.setdefault(step, {})
        for name, value in d.items():
            name = _strip(str(name))
            if name in _STEP_NAMES:
                continue
            x = _number(value)
            if x == "text":
                text.add(name)
            elif name not in merged:
                merged[name] = x
    if not by_step:
        raise LogError(f"{source}: no step records in it")
    steps = sorted(by_step)
    return Records(steps, [by_step[s] for s in steps], tuple(sorted(text)))


def _step_of(d: Mapping[str, Any], where: str) -> int | None:
    for key in _STEP_NAMES + tuple(_PREFIX + k for k in _STEP_NAMES):
        if key in d:
            value = d[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LogError(f"{where}: {key!r} must be a number, got {value!r}")
            if not math.isfinite(value) or value != int(value):
                raise LogError(f"{where}: {key!r} must be a whole number, got {value!r}")
            return int(value)
    return None


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise LogError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise LogError(f"{path}: the file is empty")


def read_json_lines(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a
    `LogError` naming its line number."""
    _check_file(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LogError(
                    f"{path}:{number}: malformed line ({e.msg} at column {e.colno}); each line "
                    "must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise LogError(
                    f"{path}:{number}: a JSON {type(obj).__name__}, expected an object "
                    "(metric names to values)"
                )
            out.append((number, obj))
    if not out:
        raise LogError(f"{path}: no records in it (only blank lines)")
    return out


def read_trl(path: str) -> Records:
    """TRL: a `trainer_state.json` (its `log_history`), or JSON lines of log entries."""
    if path.endswith(".json"):
        _check_file(path)
        with open(path, encoding="utf-8") as f:
            try:
                state = json.load(f)
            except json.JSONDecodeError as e:
                raise LogError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        history = state.get("log_history") if isinstance(state, dict) else None
        if not isinstance(history, list):
            raise LogError(f"{path}: expected TRL's trainer_state.json with a log_history list")
        if not history:
            raise LogError(f"{path}: log_history is empty")
        where = lambda i: f"{path}: log_history[{i}]"
        pairs = [(_step_of(d, where(i)), d) for i, d in enumerate(history) if isinstance(d, dict)]
        return records_from_dicts(pairs, source=path)
    lines = read_json_lines(path)
    return records_from_dicts(((_step_of(d, f"{path}:{n}"), d) for n, d in lines), source=path)


def read_verl(path: str) -> Records:
    """verl's file logger: JSON lines `{"step": N, "data": {name: value}}`."""
    pairs = []
    for number, d in read_json_lines(path):
        data = d.get("data")
        if not isinstance(data, dict):
            raise LogError(
                f'{path}:{number}: expected verl\'s {{"step": N, "data": {{...}}}}, got keys '
                f"{sorted(d)}"
            )
        pairs.append((_step_of(d, f"{path}:{number}"), data))
    return records_from_dicts(pairs, source=path)


def read_rftjax(path: str) -> Records:
    """rftjax's metrics.jsonl: one JSON object a step, with `step`."""
    lines = read_json_lines(path)
    return records_from_dicts(((_step_of(d, f"{path}:{n}"), d) for n, d in lines), source=path)


def aggregate_rollouts(rows: Sequence[tuple[int, Mapping[str, Any]]]) -> list[tuple[int, dict]]:
    """Per-rollout records -> one record a step: the mean of every number, plus
    `reward_std` (population std of the rewards), `tool_error_rate` (summed tool errors over
    summed tool calls) and, where rollouts carry a `group_id` or `prompt_id`,
    `frac_zero_std_groups` (the share of groups whose rewards all agree)."""
    by_step: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for step, row in rows:
        by_step[step].append(row)
    out = []
    for step in sorted(by_step):
        group = by_step[step]
        sums: dict[str, list[float]] = defaultdict(list)
        for row in group:
            for k, v in row.items():
                x = _number(v)
                if isinstance(x, float):
                    sums[_strip(k)].append(x)
        record: dict[str, Any] = {k: sum(v) / len(v) for k, v in sums.items()}
        rewards = sums.get("reward", [])
        if rewards and "reward_std" not in record:
            mean = sum(rewards) / len(rewards)
            record["reward_std"] = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
        if "tool_call_count" in sums and "tool_error_count" in sums:
            calls = sum(sums["tool_call_count"])
            record["tool_error_rate"] = sum(sums["tool_error_count"]) / calls if calls else 0.0
        key = next((k for k in ("group_id", "prompt_id") if k in group[0]), None)
        if key is not None and rewards:
            groups: dict[Any, set] = defaultdict(set)
            for row in group:
                groups[row.get(key)].add(row.get("reward"))
            record["frac_zero_std_groups"] = sum(len(v) == 1 for v in groups.values()) / len(groups)
        out.append((step, record))
    return out


def read_openrlhf(path: str) -> Records:
    """OpenRLHF: JSON lines of step records (its `train/...` status), or of per-rollout
    records (several lines a step: reward, response_length, advantage_mean, repetition_ratio,
    tool_call_count, tool_error_count, ...), which are aggregated a step."""
    lines = read_json_lines(path)
    rows = [(_step_of(d, f"{path}:{n}"), d) for n, d in lines]
    steps = [s for s, _ in rows]
    if None not in steps and len(set(steps)) < len(steps):
        return records_from_dicts(aggregate_rollouts(rows), source=path)
    return records_from_dicts(rows, source=path)


def event_files(path: str) -> list[str]:
    """TensorBoard event files: `path` itself, or those under the folder `path`."""
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "*tfevents*"), recursive=True))
        if not found:
            raise LogError(f"{path}: no TensorBoard event files (*tfevents*) in this folder")
        return found
    _check_file(path)
    return [path]


def _tfrecords(path: str) -> Iterable[bytes]:
    """The payloads of a TFRecord file: u64 length, u32 crc, payload, u32 crc (little end)."""
    with open(path, "rb") as f:
        data = f.read()
    offset, index = 0, 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise LogError(f"{path}: record {index} is cut short (truncated file?)")
        (length,) = struct.unpack_from("<Q", data, offset)
        end = offset + 12 + length + 4
        if end > len(data):
            raise LogError(f"{path}: record {index} is cut short (truncated file?)")
        yield data[offset + 12 : offset + 12 + length]
        offset, index = end, index + 1


def _event_pb2():
    """tensorboardX's `Event` protobuf module, without running `tensorboardX/__init__.py`
    (its writer imports torch when torch is installed, and fm imports no torch): the package
    is stood in for by a bare module for the length of the import, then taken out, so that a
    later `import tensorboardX` runs as usual and finds these proto modules cached."""
    if "tensorboardX" in sys.modules:
        from tensorboardX.proto import event_pb2

        return event_pb2
    spec = importlib.util.find_spec("tensorboardX")
    if spec is None or not spec.submodule_search_locations:
        raise LogError("reading TensorBoard files needs tensorboardX (pip install tensorboardX)")
    stand_in = types.ModuleType("tensorboardX")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["tensorboardX"] = stand_in
    try:
        from tensorboardX.proto import event_pb2
    finally:
        del sys.modules["tensorboardX"]
    return event_pb2


def read_tensorboard(path: str) -> Records:
    """Scalar summaries of TensorBoard event files (a file or a folder of them), by tag."""
    event_pb2 = _event_pb2()

    pairs = []
    for file in event_files(path):
        for index, payload in enumerate(_tfrecords(file)):
            event = event_pb2.Event()
            try:
                event.ParseFromString(payload)
            except Exception as e:  # protobuf's DecodeError
                raise LogError(f"{file}: record {index} is not a TensorBoard event: {e}") from None
            if not event.HasField("summary"):
                continue
            scalars = {}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag] = float(value.simple_value)
                elif value.HasField("tensor"):
                    numbers = list(value.tensor.float_val) or list(value.tensor.double_val)
                    if len(numbers) == 1:
                        scalars[value.tag] = float(numbers[0])
            if scalars:
                pairs.append((int(event.step), scalars))
    if not pairs:
        raise LogError(f"{path}: no scalar summaries in its TensorBoard event files")
    return records_from_dicts(pairs, source=path)


READERS = {
    "trl": read_trl,
    "verl": read_verl,
    "openrlhf": read_openrlhf,
    "tensorboard": read_tensorboard,
    "rftjax": read_rftjax,
}


def resolve_path(path: str) -> str:
    """A run folder -> its log file: TensorBoard events, the latest TRL checkpoint's
    trainer_state.json, or rftjax's metrics.jsonl; a file is returned as it is."""
    if not os.path.exists(path):
        raise LogError(f"{path}: no such file or folder")
    if not os.path.isdir(path):
        return path
    for name in ("trainer_state.json", "metrics.jsonl"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    states = glob.glob(os.path.join(path, "checkpoint-*", "trainer_state.json"))
    if states:
        return max(states, key=lambda p: int(p.split("checkpoint-")[-1].split(os.sep)[0]))
    if glob.glob(os.path.join(path, "**", "*tfevents*"), recursive=True):
        return path
    raise LogError(
        f"{path}: a folder with no log fm reads (trainer_state.json, checkpoint-*/, "
        "metrics.jsonl or TensorBoard *tfevents* files)"
    )


def sniff(path: str) -> str:
    """The format of a log file (or run folder) by its name and first record."""
    if os.path.isdir(path) or "tfevents" in os.path.basename(path):
        return "tensorboard"
    _check_file(path)
    if path.endswith(".json"):
        return "trl"
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return "unknown"
    if not isinstance(record, dict):
        return "unknown"
    if isinstance(record.get("data"), dict):
        return "verl"
    return "jsonl"

"""Tasks: prompt sources with rewards, and the ``make_task`` registry."""

from __future__ import annotations

from typing import Any

from rftjax.tasks.arith import ArithTask
from rftjax.tasks.base import Batch, Task, encode_answers, encode_prompts
from rftjax.tasks.calc import CalcTask
from rftjax.tasks.jsonl import FILE_FORMATS, JsonlTask
from rftjax.tasks.sort import SortTask
from rftjax.tasks.text import CHAT_TEMPLATE_MODES
from rftjax.tasks.tfds import TFDS_PREFIX, TfdsTask
from rftjax.tasks.verify import ANSWER_FORMATS
from rftjax.tokenizer import char_tokenizer, same_vocab

__all__ = [
    "ANSWER_FORMATS",
    "CHAT_TEMPLATE_MODES",
    "ArithTask",
    "Batch",
    "CalcTask",
    "JsonlTask",
    "SortTask",
    "TASK_NAMES",
    "Task",
    "TfdsTask",
    "encode_answers",
    "encode_prompts",
    "make_task",
]

JSONL_PREFIX = "jsonl:"
TASK_NAMES: tuple[str, ...] = (
    "arith",
    "sort",
    "calc",
    f"{JSONL_PREFIX}/path/to/file.jsonl",
    "parquet:/path/to/file_or_folder.parquet",
    f"{TFDS_PREFIX}NAME[/CONFIG][:SPLIT]",
)
_BUILT_IN = {"arith": ArithTask, "sort": SortTask, "calc": CalcTask}
_FILE_DEFAULTS = {
    "prompt_field": "prompt",
    "answer_field": "answer",
    "answer_format": "auto",
    "tfds_data_dir": None,
}


def make_task(
    name: str, *, seed: int, tokenizer=None, chat_template: str = "auto", **kwargs: Any
) -> Task:
    """Builds the task registered as ``name`` (one of ``TASK_NAMES``).

    ``kwargs`` go to the task constructor. Built-in tasks (arith, sort, calc) use the character
    tokenizer and refuse another one. File tasks, ``jsonl:PATH`` and ``parquet:PATH``, take
    ``tokenizer`` (default: the character tokenizer; a Hugging Face checkpoint's own tokenizer
    for a real model), ``chat_template`` (``auto`` applies the tokenizer's template if it has
    one, ``none``), ``prompt_field``, ``answer_field`` and ``answer_format`` (`JsonlTask`).
    ``tfds:NAME[/CONFIG][:SPLIT]`` reads a prepared TensorFlow Datasets dataset from
    ``tfds_data_dir`` (default ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``) with the same
    options (`TfdsTask`).

    Raises:
      ValueError: for an unknown name, listing the accepted names; for a built-in task given
        a tokenizer of another vocabulary, or file options.
    """
    file_format, _, path = name.partition(":")
    if f"{file_format}:" == TFDS_PREFIX and path:
        data_dir = kwargs.pop("tfds_data_dir", None)
        return TfdsTask(
            path,
            tokenizer=tokenizer or char_tokenizer(),
            seed=seed,
            data_dir=data_dir,
            chat_template=chat_template,
            **kwargs,
        )
    if file_format in FILE_FORMATS and kwargs.get("tfds_data_dir") is not None:
        raise ValueError(f"tfds_data_dir applies to tfds: tasks, not {name!r}")
    kwargs.pop("tfds_data_dir", None)
    if file_format in FILE_FORMATS and path:
        return JsonlTask(
            path,
            tokenizer=tokenizer or char_tokenizer(),
            seed=seed,
            file_format=file_format,
            chat_template=chat_template,
            **kwargs,
        )
    if name in _BUILT_IN:
        if tokenizer is not None and not same_vocab(tokenizer):
            raise ValueError(
                f"task {name!r} is written in the built-in character tokenizer; a model with "
                "its own tokenizer (a Hugging Face checkpoint) needs a file task: jsonl:PATH "
                "or parquet:PATH"
            )
        for key, default in _FILE_DEFAULTS.items():
            if kwargs.get(key, default) != default:
                raise ValueError(f"{key}={kwargs[key]!r} applies to file tasks, not {name!r}")
            kwargs.pop(key, None)
        return _BUILT_IN[name](seed=seed, tokenizer=tokenizer, **kwargs)
    raise ValueError(f"unknown task {name!r}; accepted names: {', '.join(TASK_NAMES)}")


def response_slots(name: str, *, tokenizer=None, **options: Any) -> int:
    """The response slots (max new tokens) a task needs by default: its
    `Task.max_new_tokens_hint` (a file task reads its data to find it). Every place that
    resolves "the task's own bound" asks here."""
    return make_task(name, seed=0, tokenizer=tokenizer, **options).max_new_tokens_hint

"""Tasks: prompt sources with rewards, and the ``make_task`` registry."""

from __future__ import annotations

from typing import Any

from rftjax.tasks.arith import ArithTask
from rftjax.tasks.base import Batch, Task, encode_answers, encode_prompts
from rftjax.tasks.jsonl import JsonlTask
from rftjax.tasks.sort import SortTask
from rftjax.tokenizer import char_tokenizer

__all__ = [
    "ArithTask",
    "Batch",
    "JsonlTask",
    "SortTask",
    "TASK_NAMES",
    "Task",
    "encode_answers",
    "encode_prompts",
    "make_task",
]

JSONL_PREFIX = "jsonl:"
TASK_NAMES: tuple[str, ...] = ("arith", "sort", f"{JSONL_PREFIX}/path/to/file.jsonl")


def make_task(name: str, *, seed: int, **kwargs: Any) -> Task:
    """Builds the task registered as ``name`` (one of ``TASK_NAMES``).

    ``kwargs`` go to the task constructor. Built-in tasks use the character tokenizer; a
    ``jsonl:`` task takes ``tokenizer=`` (default: the character tokenizer).

    Raises:
      ValueError: for an unknown name, listing the accepted names.
    """
    if name == "arith":
        return ArithTask(seed=seed, **kwargs)
    if name == "sort":
        return SortTask(seed=seed, **kwargs)
    if name.startswith(JSONL_PREFIX) and len(name) > len(JSONL_PREFIX):
        tokenizer = kwargs.pop("tokenizer", None) or char_tokenizer()
        return JsonlTask(name[len(JSONL_PREFIX) :], tokenizer=tokenizer, seed=seed, **kwargs)
    raise ValueError(f"unknown task {name!r}; accepted names: {', '.join(TASK_NAMES)}")

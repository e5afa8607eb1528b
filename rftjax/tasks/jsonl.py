"""Text tasks read from JSONL or Parquet rows of a prompt and a reference answer.

Field names are configurable (``prompt_field``, ``answer_field``: e.g. GSM8K's ``question`` /
``answer``, MATH's ``problem`` / ``solution``); answers are verified GSM8K-style (final number,
``#### 42``) or MATH-style (``\\boxed{...}``), chosen explicitly or detected from the data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rftjax.tasks import text
from rftjax.tasks.base import (
    DEFAULT_EVAL_SIZE,
    Batch,
    RewardDict,
    Task,
    check_step,
    freeze,
    tokenize,
)
from rftjax.tasks.parquet import read_parquet
from rftjax.tasks.verify import ANSWER_FORMATS, detect_answer_format, reward_for

FILE_FORMATS = ("jsonl", "parquet")


def read_jsonl(
    path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer"
) -> tuple[list[str], list[str]]:
    """Reads ``(prompts, answers)`` from a UTF-8 JSONL file: one JSON object a line (empty
    lines at the end of the file are allowed).

    Raises:
      ValueError: naming the file and line for bytes that are not UTF-8, an empty line
        between rows, malformed JSON, a non-object row, a missing field (with the fields
        present) or a field of the wrong type; or for a file with no rows.
    """
    path = Path(path)
    prompts, answers = [], []
    with path.open("rb") as f:
        raw_lines = f.read().split(b"\n")
    while raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()
    for lineno, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{where}: bytes that are not UTF-8 at column {e.start + 1} "
                f"({raw[e.start : e.start + 4]!r}); JSONL files must be UTF-8"
            ) from e
        if not line.strip():
            raise ValueError(f"{where}: empty line between rows (one JSON object a line)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for field in (prompt_field, answer_field):
            if field not in row:
                raise ValueError(f"{where}: missing field {field!r}; fields present: {sorted(row)}")
        prompt, answer = row[prompt_field], text.answer_text(row[answer_field])
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: field {prompt_field!r} must be a string")
        if answer is None:
            raise ValueError(f"{where}: field {answer_field!r} must be a string or number")
        prompts.append(prompt)
        answers.append(answer)
    if not prompts:
        raise ValueError(f"{path}: no rows (the file is empty)")
    return prompts, answers


def read_rows(
    path: str | Path, file_format: str, prompt_field: str, answer_field: str
) -> tuple[list[str], list[str]]:
    """``(prompts, answers)`` of a ``jsonl`` or ``parquet`` file (see the readers)."""
    if file_format == "jsonl":
        return read_jsonl(path, prompt_field, answer_field)
    if file_format == "parquet":
        return read_parquet(path, prompt_field, answer_field)
    raise ValueError(f"file_format={file_format!r}; accepted: {FILE_FORMATS}")


def split_rows(prompts: Sequence[str], eval_fraction: float, split_seed: int) -> np.ndarray:
    """bool ``[R]``: True for held-out rows.

    The split is over distinct prompt texts (duplicates land on the same side), a seeded
    permutation holds out ``round(eval_fraction * #distinct)`` of them, at least one, and
    at least one stays for training.
    """
    distinct = sorted(set(prompts))
    if len(distinct) < 2:
        raise ValueError("need at least 2 distinct prompts to split train/eval")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = min(max(1, round(eval_fraction * len(distinct))), len(distinct) - 1)
    order = np.random.default_rng(split_seed).permutation(len(distinct))
    heldout = {distinct[i] for i in order[:n_eval].tolist()}
    return np.array([p in heldout for p in prompts], bool)


class JsonlTask(Task):
    """Prompts and reference answers from a JSONL or Parquet file, scored on text.

    Prompts are rendered through the tokenizer's chat template (``chat_template="auto"``, when
    it has one) and start with BOS when the tokenizer has one (`rftjax.tasks.text`). The
    train/eval split is over the raw prompt texts. Training batches walk seeded per-epoch
    permutations of the training rows, so batch ``step`` covers stream positions
    ``[step * B, (step + 1) * B)``.

    Attributes:
      answer_format: ``"gsm8k"`` or ``"math"``, the verifier of `text_reward` (``"auto"``
        resolves by `detect_answer_format` over all reference answers).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer,
        seed: int,
        file_format: str = "jsonl",
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        answer_format: str = "auto",
        chat_template: str = "auto",
        eval_fraction: float = 0.1,
        split_seed: int = 0,
        eval_size: int = DEFAULT_EVAL_SIZE,
        prompt_len: int | None = None,
        answer_len: int | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format={answer_format!r}; accepted: {ANSWER_FORMATS}")
        prompts, answers = read_rows(path, file_format, prompt_field, answer_field)
        heldout = split_rows(prompts, eval_fraction, split_seed)
        self.name = f"{file_format}:{path}"
        self.path = Path(path)
        self._setup(
            prompts,
            answers,
            heldout,
            tokenizer=tokenizer,
            seed=seed,
            answer_format=answer_format,
            chat_template=chat_template,
            eval_size=eval_size,
            prompt_len=prompt_len,
            answer_len=answer_len,
            max_new_tokens=max_new_tokens,
        )

    def _setup(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        heldout: np.ndarray,
        *,
        tokenizer,
        seed: int,
        answer_format: str,
        chat_template: str,
        eval_size: int,
        prompt_len: int | None,
        answer_len: int | None,
        max_new_tokens: int,
    ) -> None:
        """Renders and sizes rows; ``heldout`` (bool ``[R]``) marks the evaluation rows."""
        self.tokenizer = tokenizer
        self.seed = seed
        if answer_format == "auto":
            answer_format = detect_answer_format(answers)
        self.answer_format = answer_format
        self._reward = reward_for(answer_format)
        rendered = text.render_prompts(tokenizer, prompts, chat_template)
        if prompt_len is None:
            prompt_len = max(len(ids) for ids in text.prompt_ids(tokenizer, rendered))
        if answer_len is None:
            answer_len = 1 + max(len(t) for t in tokenize(tokenizer, answers))  # + EOS
        self.prompt_len = prompt_len
        self.answer_len = answer_len
        self.max_new_tokens_hint = max_new_tokens
        self.jnp_reward = None
        self.train_prompts = [p for p, h in zip(rendered, heldout, strict=True) if not h]
        self.train_answers = [a for a, h in zip(answers, heldout, strict=True) if not h]
        eval_prompts = [p for p, h in zip(rendered, heldout, strict=True) if h][:eval_size]
        eval_answers = [a for a, h in zip(answers, heldout, strict=True) if h][:eval_size]
        self._eval = freeze(self._batch(eval_prompts, eval_answers))

    def _batch(self, prompts: Sequence[str], answers: Sequence[str]) -> Batch:
        return text.make_batch(self.tokenizer, prompts, answers, self.prompt_len, self.answer_len)

    def train_indices(self, step: int, batch_size: int) -> np.ndarray:
        """int64 ``[batch_size]`` training-row indices of batch ``step``."""
        n = len(self.train_prompts)
        pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
        epoch, offset = np.divmod(pos, n)
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epoch).tolist():
            perm = np.random.default_rng([self.seed, e]).permutation(n)
            out[epoch == e] = perm[offset[epoch == e]]
        return out

    def train_batch(self, step: int, batch_size: int) -> Batch:
        check_step(step, batch_size)
        idx = self.train_indices(step, batch_size).tolist()
        return self._batch(
            [self.train_prompts[i] for i in idx], [self.train_answers[i] for i in idx]
        )

    def eval_batch(self) -> Batch:
        return self._eval

    def text_reward(self, responses: Sequence[str], answers: Sequence[str]) -> RewardDict:
        return self._reward(responses, answers)

"""Text task read from a JSONL file of ``{"prompt": ..., "answer": ...}`` rows, scored on text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from rftjax.tasks.base import (
    DEFAULT_EVAL_SIZE,
    Batch,
    RewardDict,
    Task,
    check_step,
    freeze,
    make_batch,
    tokenize,
)
from rftjax.tasks.verify import gsm8k_reward


def _answer_text(value: object) -> str | None:
    """A string or (non-bool) number as text; None for any other JSON value."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def read_jsonl(
    path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer"
) -> tuple[list[str], list[str]]:
    """Reads ``(prompts, answers)`` from a JSONL file; blank lines are skipped.

    Raises:
      ValueError: naming the file and line for malformed JSON, a non-object row, a missing
        field (with the fields present) or a field of the wrong type; or for an empty file.
    """
    path = Path(path)
    prompts, answers = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for field in (prompt_field, answer_field):
                if field not in row:
                    raise ValueError(
                        f"{where}: missing field {field!r}; fields present: {sorted(row)}"
                    )
            prompt, answer = row[prompt_field], _answer_text(row[answer_field])
            if not isinstance(prompt, str):
                raise ValueError(f"{where}: field {prompt_field!r} must be a string")
            if answer is None:
                raise ValueError(f"{where}: field {answer_field!r} must be a string or number")
            prompts.append(prompt)
            answers.append(answer)
    if not prompts:
        raise ValueError(f"{path}: no rows (the file is empty)")
    return prompts, answers


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
    """Prompts and reference answers from a JSONL file, rewarded by ``gsm8k_reward``.

    Training batches walk seeded per-epoch permutations of the training rows, so batch
    ``step`` covers stream positions ``[step * B, (step + 1) * B)``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer: PreTrainedTokenizerFast,
        seed: int,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        eval_fraction: float = 0.1,
        split_seed: int = 0,
        eval_size: int = DEFAULT_EVAL_SIZE,
        prompt_len: int | None = None,
        answer_len: int | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        prompts, answers = read_jsonl(path, prompt_field, answer_field)
        heldout = split_rows(prompts, eval_fraction, split_seed)
        self.name = f"jsonl:{path}"
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.seed = seed
        if prompt_len is None:
            prompt_len = 1 + max(len(t) for t in tokenize(tokenizer, prompts))  # BOS + prompt
        if answer_len is None:
            answer_len = 1 + max(len(t) for t in tokenize(tokenizer, answers))  # answer + EOS
        self.prompt_len = prompt_len
        self.answer_len = answer_len
        self.max_new_tokens_hint = max_new_tokens
        self.jnp_reward = None
        self.train_prompts = [p for p, h in zip(prompts, heldout, strict=True) if not h]
        self.train_answers = [a for a, h in zip(answers, heldout, strict=True) if not h]
        eval_prompts = [p for p, h in zip(prompts, heldout, strict=True) if h][:eval_size]
        eval_answers = [a for a, h in zip(answers, heldout, strict=True) if h][:eval_size]
        self._eval = freeze(self._batch(eval_prompts, eval_answers))

    def _batch(self, prompts: Sequence[str], answers: Sequence[str]) -> Batch:
        return make_batch(
            self.tokenizer,
            prompts,
            answers,
            self.prompt_len,
            self.answer_len,
            truncate_answers=True,
        )

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
        return gsm8k_reward(responses, answers)

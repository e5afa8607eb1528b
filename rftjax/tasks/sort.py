"""Digit sorting task with partial credit: ``"sort:{s}="`` -> the digits of ``s`` ascending."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from transformers import PreTrainedTokenizerFast

from rftjax.tasks.arith import (
    align,
    digit_format,
    exact_match,
    resolve_char_tokenizer,
    text_token_scores,
)
from rftjax.tasks.base import (
    DEFAULT_EVAL_SIZE,
    Batch,
    RewardDict,
    Task,
    check_step,
    eval_keys,
    freeze,
    make_batch,
    sample_train_keys,
    train_rng,
)
from rftjax.tokenizer import PAD_ID

PREFIX = "sort:"


def position_match(response: jax.Array, answers: jax.Array) -> jax.Array:
    """f32 ``[B]``: fraction of the answer's non-pad positions (tokens + EOS) that the
    response (int ``[B, N]``, cut after EOS) matches at the same position."""
    resp, ans = align(response, answers)
    target = ans != PAD_ID
    hits = jnp.sum((resp == ans) & target, axis=1)
    return (hits / jnp.maximum(jnp.sum(target, axis=1), 1)).astype(jnp.float32)


def partial_credit_reward(response: jax.Array, answers: jax.Array) -> dict[str, jax.Array]:
    """``{reward, correct, format}`` f32 ``[B]``: reward is ``position_match``, correct is the
    exact match, format as in arith."""
    return {
        "reward": position_match(response, answers),
        "correct": exact_match(response, answers),
        "format": digit_format(response),
    }


class SortTask(Task):
    """Sort a string of ``length`` random digits; held out by hash of the digit string."""

    def __init__(
        self,
        *,
        seed: int,
        length: int = 5,
        eval_size: int = DEFAULT_EVAL_SIZE,
        tokenizer: PreTrainedTokenizerFast | None = None,
    ) -> None:
        if not 1 <= length <= 18:
            raise ValueError(f"length must be in [1, 18], got {length}")
        self.name = "sort"
        self.tokenizer = resolve_char_tokenizer(tokenizer)
        self.seed = seed
        self.length = length
        self.eval_size = eval_size
        self.prompt_len = 1 + len(PREFIX) + length + 1  # BOS, prefix, digits, "="
        self.answer_len = length + 1  # sorted digits, EOS
        self.max_new_tokens_hint = self.answer_len
        self.jnp_reward = partial_credit_reward
        self._eval: Batch | None = None

    def batch_from_keys(self, keys: np.ndarray) -> Batch:
        """The batch of int ``[B]`` keys, each the digit string read as a decimal number."""
        powers = 10 ** np.arange(self.length - 1, -1, -1, dtype=np.int64)
        digits = (keys.astype(np.int64)[:, None] // powers) % 10  # [B, length]
        chars = np.array(list("0123456789"))
        strings = ["".join(row) for row in chars[digits].tolist()]
        answers = ["".join(row) for row in chars[np.sort(digits, axis=1)].tolist()]
        prompts = [f"{PREFIX}{s}=" for s in strings]
        return make_batch(self.tokenizer, prompts, answers, self.prompt_len, self.answer_len)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        check_step(step, batch_size)
        keys = sample_train_keys(train_rng(self.seed, step), 10**self.length, batch_size)
        return self.batch_from_keys(keys)

    def eval_batch(self) -> Batch:
        if self._eval is None:
            keys = eval_keys(10**self.length, self.eval_size)
            self._eval = freeze(self.batch_from_keys(keys))
        return self._eval

    def text_reward(self, responses: Sequence[str], answers: Sequence[str]) -> RewardDict:
        resp, ans, correct, fmt = text_token_scores(self.tokenizer, responses, answers)
        hits = [
            sum(x == y for x, y in zip(r, a, strict=False)) for r, a in zip(resp, ans, strict=True)
        ]
        reward = np.array(hits, np.float32) / np.array([len(a) for a in ans], np.float32)
        return {"reward": reward, "correct": correct, "format": fmt}

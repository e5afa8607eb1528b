"""Integer arithmetic task (``"{a}+{b}="`` -> ``str(a + b)``) and exact-match token rewards.

The token rewards assume the character vocabulary of ``rftjax.tokenizer`` (fixed ids) and the
response convention of ``rftjax.tasks.base``. They are pure jax functions of
``(response int32[B, N], answers int32[B, A])`` and jit for any ``N`` and ``A``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from transformers import PreTrainedTokenizerFast

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
    tokenize,
    train_rng,
)
from rftjax.tokenizer import DIGIT_IDS, EOS_ID, PAD_ID, char_tokenizer, same_vocab

OPS = ("+", "*")


def resolve_char_tokenizer(tokenizer: PreTrainedTokenizerFast | None) -> PreTrainedTokenizerFast:
    """``tokenizer`` if it has the character vocabulary (a fresh one if None), else ValueError."""
    if tokenizer is None:
        return char_tokenizer()
    if not same_vocab(tokenizer):
        raise ValueError("built-in tasks need the character tokenizer (rftjax.tokenizer)")
    return tokenizer


def truncate_after_eos(response: jax.Array) -> jax.Array:
    """int ``[B, N]``: tokens after the first EOS replaced by pad (EOS itself kept)."""
    is_eos = (response == EOS_ID).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
    return jnp.where(eos_before > 0, PAD_ID, response)


def align(response: jax.Array, answers: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pads ``[B, N]`` responses (cut after EOS) and ``[B, A]`` answers to ``[B, max(N, A)]``."""
    width = max(response.shape[1], answers.shape[1])

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=PAD_ID)

    return pad(truncate_after_eos(response)), pad(answers.astype(response.dtype))


def digit_format(response: jax.Array) -> jax.Array:
    """f32 ``[B]``: 1 iff the response has an EOS preceded by one or more tokens, all digits."""
    if response.shape[1] == 0:
        return jnp.zeros(response.shape[:1], jnp.float32)
    is_eos = response == EOS_ID
    before_eos = jnp.cumsum(is_eos.astype(jnp.int32), axis=1) == 0
    is_digit = (response >= DIGIT_IDS[0]) & (response <= DIGIT_IDS[-1])
    ok = jnp.all(is_digit | ~before_eos, axis=1) & jnp.any(is_eos, axis=1) & before_eos[:, 0]
    return ok.astype(jnp.float32)


def exact_match(response: jax.Array, answers: jax.Array) -> jax.Array:
    """f32 ``[B]``: 1 iff the response is exactly the answer tokens + EOS (then only pad)."""
    resp, ans = align(response, answers)
    return jnp.all(resp == ans, axis=1).astype(jnp.float32)


def exact_match_reward(response: jax.Array, answers: jax.Array) -> dict[str, jax.Array]:
    """``{reward, correct, format}`` f32 ``[B]`` with ``reward = correct`` (exact match)."""
    correct = exact_match(response, answers)
    return {"reward": correct, "correct": correct, "format": digit_format(response)}


def text_token_scores(
    tokenizer: PreTrainedTokenizerFast, responses: Sequence[str], answers: Sequence[str]
) -> tuple[list[list[int]], list[list[int]], np.ndarray, np.ndarray]:
    """Host-side twin of the token rewards for EOS-terminated response texts.

    Each text is re-tokenized (special-token strings map back to their ids) and EOS is
    appended to responses and answers.

    Returns:
      ``(response_ids, answer_ids, correct f32[B], format f32[B])``.
    """
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    resp = [[*ids, EOS_ID] for ids in tokenize(tokenizer, responses)]
    ans = [[*ids, EOS_ID] for ids in tokenize(tokenizer, answers)]
    correct = np.array([r == a for r, a in zip(resp, ans, strict=True)], np.float32)
    digits = set(DIGIT_IDS)
    fmt = np.array([len(r) > 1 and all(t in digits for t in r[:-1]) for r in resp], np.float32)
    return resp, ans, correct, fmt


class ArithTask(Task):
    """``"{a}{op}{b}="`` with ``a, b`` uniform in ``[0, 10**digits)``; answer the result.

    A pair is held out iff its key ``a * 10**digits + b`` hashes into the eval bucket.
    """

    def __init__(
        self,
        *,
        seed: int,
        digits: int = 2,
        op: str = "+",
        eval_size: int = DEFAULT_EVAL_SIZE,
        tokenizer: PreTrainedTokenizerFast | None = None,
    ) -> None:
        if not 1 <= digits <= 9:
            raise ValueError(f"digits must be in [1, 9], got {digits}")
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        self.name = "arith"
        self.tokenizer = resolve_char_tokenizer(tokenizer)
        self.seed = seed
        self.digits = digits
        self.op = op
        self.eval_size = eval_size
        self.prompt_len = 2 * digits + 3  # BOS, a, op, b, "="
        self.answer_len = (digits + 1 if op == "+" else 2 * digits) + 1  # result, EOS
        self.max_new_tokens_hint = self.answer_len
        self.jnp_reward = exact_match_reward
        self._eval: Batch | None = None

    @property
    def space(self) -> int:
        """Number of distinct ``(a, b)`` pairs."""
        return 10 ** (2 * self.digits)

    def batch_from_keys(self, keys: np.ndarray) -> Batch:
        """The batch of int ``[B]`` pair keys ``a * 10**digits + b``."""
        a, b = np.divmod(keys.astype(np.int64), 10**self.digits)
        result = a + b if self.op == "+" else a * b
        prompts = [f"{x}{self.op}{y}=" for x, y in zip(a.tolist(), b.tolist(), strict=True)]
        answers = [str(r) for r in result.tolist()]
        return make_batch(self.tokenizer, prompts, answers, self.prompt_len, self.answer_len)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        check_step(step, batch_size)
        keys = sample_train_keys(train_rng(self.seed, step), self.space, batch_size)
        return self.batch_from_keys(keys)

    def eval_batch(self) -> Batch:
        if self._eval is None:
            self._eval = freeze(self.batch_from_keys(eval_keys(self.space, self.eval_size)))
        return self._eval

    def text_reward(self, responses: Sequence[str], answers: Sequence[str]) -> RewardDict:
        _, _, correct, fmt = text_token_scores(self.tokenizer, responses, answers)
        return {"reward": correct, "correct": correct, "format": fmt}

"""Task protocol: batches of prompts/answers, rewards, and the held-out split helpers.

Shapes: ``B`` batch, ``P`` prompt length, ``A`` answer length, ``N`` generated tokens.

Response convention (shared with the sampler): ``response`` is int32 ``[B, N]`` of generated
tokens; the EOS token is included when emitted; every token after the first EOS is pad; a
response that never emitted EOS fills all ``N`` positions (truncated).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from transformers import PreTrainedTokenizerFast

RewardDict = dict[str, np.ndarray]
JnpRewardFn = Callable[[jax.Array, jax.Array], dict[str, jax.Array]]
"""``(response int32[B, N], answers int32[B, A]) -> {reward, correct, format: f32[B]}``."""

REWARD_KEYS: tuple[str, ...] = ("reward", "correct", "format")
EVAL_BUCKETS = 10
"""One key in ``EVAL_BUCKETS`` (by hash) is held out for evaluation and never trained on."""
DEFAULT_EVAL_SIZE = 512
_ENUMERATE_LIMIT = 1 << 24


class Batch(NamedTuple):
    """A batch of prompts with their reference answers (numpy, host side).

    Attributes:
      prompts: int32 ``[B, P]``, left-padded with pad; each row is BOS then prompt tokens.
      prompt_mask: int32 ``[B, P]``, 1 on real tokens (incl. BOS), 0 on padding.
      answers: int32 ``[B, A]``, answer tokens then EOS, right-padded with pad.
      answer_text: the ``B`` answers as text.
    """

    prompts: np.ndarray
    prompt_mask: np.ndarray
    answers: np.ndarray
    answer_text: tuple[str, ...]


class Demo(NamedTuple):
    """Supervised demonstrations for the warm-up (numpy).

    Attributes:
      prompts, prompt_mask: as in `Batch`.
      targets: int32 ``[B, T]`` the response to imitate, right-padded with pad.
      target_mask: float32 ``[B, T]`` 1 on tokens the loss counts (0 on padding and on
        context the policy does not produce, such as tool observations).
    """

    prompts: np.ndarray
    prompt_mask: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int, int]:
    """Returns ``(pad_id, bos_id, eos_id)``, raising ValueError if the tokenizer lacks one."""
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if any(i is None for i in ids):
        raise ValueError(f"tokenizer needs pad, bos and eos tokens; got (pad, bos, eos)={ids}")
    return ids  # type: ignore[return-value]


def tokenize(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, with no special tokens added."""
    if not texts:
        return []
    return list(tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def encode_prompts(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], prompt_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes prompts as BOS + tokens, left-padded to ``prompt_len``.

    Returns:
      ``(prompts, prompt_mask)``, both int32 ``[len(texts), prompt_len]``.

    Raises:
      ValueError: naming the prompt, if BOS + its tokens exceed ``prompt_len``.
    """
    pad_id, bos_id, _ = _special_ids(tokenizer)
    prompts = np.full((len(texts), prompt_len), pad_id, np.int32)
    mask = np.zeros((len(texts), prompt_len), np.int32)
    for row, (text, ids) in enumerate(zip(texts, tokenize(tokenizer, texts), strict=True)):
        ids = [bos_id, *ids]
        if len(ids) > prompt_len:
            raise ValueError(
                f"prompt {text!r} needs {len(ids)} tokens (with BOS) > prompt_len={prompt_len}"
            )
        if ids:
            prompts[row, prompt_len - len(ids) :] = ids
            mask[row, prompt_len - len(ids) :] = 1
    return prompts, mask


def encode_answers(
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    answer_len: int,
    *,
    truncate: bool = False,
) -> np.ndarray:
    """Encodes answers as tokens + EOS, right-padded to ``answer_len``.

    Returns:
      int32 ``[len(texts), answer_len]``.

    Raises:
      ValueError: naming the answer, if it does not fit and ``truncate`` is False (with
        ``truncate`` the first ``answer_len`` tokens are kept, possibly dropping EOS).
    """
    pad_id, _, eos_id = _special_ids(tokenizer)
    answers = np.full((len(texts), answer_len), pad_id, np.int32)
    for row, (text, ids) in enumerate(zip(texts, tokenize(tokenizer, texts), strict=True)):
        ids = [*ids, eos_id]
        if len(ids) > answer_len and not truncate:
            raise ValueError(
                f"answer {text!r} needs {len(ids)} tokens (with EOS) > answer_len={answer_len}"
            )
        ids = ids[:answer_len]
        answers[row, : len(ids)] = ids
    return answers


def make_batch(
    tokenizer: PreTrainedTokenizerFast,
    prompt_texts: Sequence[str],
    answer_texts: Sequence[str],
    prompt_len: int,
    answer_len: int,
    *,
    truncate_answers: bool = False,
) -> Batch:
    """Encodes parallel prompt/answer texts into a ``Batch`` (``B = len(prompt_texts)``)."""
    if len(prompt_texts) != len(answer_texts):
        raise ValueError(f"{len(prompt_texts)} prompts but {len(answer_texts)} answers")
    prompts, mask = encode_prompts(tokenizer, prompt_texts, prompt_len)
    answers = encode_answers(tokenizer, answer_texts, answer_len, truncate=truncate_answers)
    return Batch(prompts, mask, answers, tuple(answer_texts))


def freeze(batch: Batch) -> Batch:
    """Marks the arrays of ``batch`` read-only (for batches that are cached and shared)."""
    for arr in (batch.prompts, batch.prompt_mask, batch.answers):
        arr.flags.writeable = False
    return batch


def decode_ids(tokenizer: PreTrainedTokenizerFast, response: np.ndarray) -> list[str]:
    """Decodes int ``[B, N]`` responses: text up to (excluding) the first EOS, pads dropped.
    Needs pad and EOS only (a tokenizer without BOS, such as Qwen2's, decodes too)."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise ValueError(f"tokenizer needs pad and eos tokens; got (pad, eos)=({pad_id}, {eos_id})")
    rows = []
    for row in np.asarray(response).tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        rows.append([t for t in row if t != pad_id])
    return list(tokenizer.batch_decode(rows, skip_special_tokens=False)) if rows else []


class Task(abc.ABC):
    """A source of prompts with a reward.

    Attributes:
      name: registry name of the task.
      tokenizer: tokenizer of prompts, answers and responses.
      seed: data seed; ``train_batch`` is a pure function of (seed, step, batch_size).
      prompt_len: static prompt width ``P``.
      answer_len: static answer width ``A``.
      max_new_tokens_hint: enough new tokens for any answer including EOS.
      jnp_reward: pure, jittable ``(response [B, N], answers [B, A]) -> {key: f32[B]}``, or
        None for tasks scored on text with ``text_reward``.
    """

    name: str
    tokenizer: PreTrainedTokenizerFast
    seed: int
    prompt_len: int
    answer_len: int
    max_new_tokens_hint: int
    jnp_reward: JnpRewardFn | None = None

    @abc.abstractmethod
    def train_batch(self, step: int, batch_size: int) -> Batch:
        """Training batch number ``step`` (``B = batch_size``); never contains eval prompts."""

    @abc.abstractmethod
    def eval_batch(self) -> Batch:
        """The fixed held-out batch; identical on every call."""

    @abc.abstractmethod
    def text_reward(self, responses: Sequence[str], answers: Sequence[str]) -> RewardDict:
        """Scores decoded responses: ``{reward, correct, format}``, each float32 ``[B]``."""

    tools = None  # a `rftjax.tools.ToolEnv` for tasks whose policy may call tools

    def tool_spec(self):
        """What the compiled sampler needs of `tools` (a `rftjax.tools.ToolSpec`), or None."""
        return self.tools.spec() if self.tools is not None else None

    def demo_batch(self, step: int, batch_size: int) -> Demo:
        """Warm-up demonstrations: by default training batch ``step`` with its answers."""
        b = self.train_batch(step, batch_size)
        pad = self.tokenizer.pad_token_id
        return Demo(b.prompts, b.prompt_mask, b.answers, (b.answers != pad).astype(np.float32))

    def decode_responses(self, response: np.ndarray) -> list[str]:
        """Texts of int ``[B, N]`` responses, up to (excluding) the first EOS, pads dropped."""
        return decode_ids(self.tokenizer, response)


def check_step(step: int, batch_size: int) -> None:
    """Raises ValueError for a negative step or a non-positive batch size."""
    if step < 0 or batch_size <= 0:
        raise ValueError(f"need step >= 0 and batch_size > 0, got {step=}, {batch_size=}")


def train_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of training batch ``step``: a pure function of ``(seed, step)``."""
    return np.random.default_rng([seed, step])


def _mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of uint64 keys (wrapping arithmetic), shape preserved."""
    z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def is_heldout(keys: np.ndarray) -> np.ndarray:
    """bool mask, same shape as the int ``keys``: True for keys reserved for evaluation.

    Fixed forever and independent of any seed, so no seed ever trains on an eval key.
    """
    return _mix64(np.asarray(keys)) % np.uint64(EVAL_BUCKETS) == 0


def sample_train_keys(rng: np.random.Generator, space: int, n: int) -> np.ndarray:
    """int64 ``[n]`` keys drawn uniformly from the non-held-out keys of ``range(space)``."""
    chunks, have = [], 0
    for _ in range(1000):
        if have >= n:
            return np.concatenate(chunks)[:n] if chunks else np.zeros(0, np.int64)
        cand = rng.integers(0, space, size=max(2 * (n - have), 16), dtype=np.int64)
        cand = cand[~is_heldout(cand)]
        chunks.append(cand)
        have += cand.size
    raise ValueError(f"key space of size {space} has (almost) no training keys")


def eval_keys(space: int, size: int) -> np.ndarray:
    """int64 ``[min(size, #held-out)]`` distinct held-out keys of ``range(space)``, fixed."""
    rng = np.random.default_rng(0)
    if space <= _ENUMERATE_LIMIT:
        keys = np.arange(space, dtype=np.int64)
        keys = keys[is_heldout(keys)]
        return keys[rng.permutation(keys.size)[:size]]
    keys = np.zeros(0, np.int64)
    while keys.size < size:
        cand = rng.integers(0, space, size=4 * size, dtype=np.int64)
        keys = np.concatenate([keys, cand[is_heldout(cand)]])
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]
    return keys[:size]

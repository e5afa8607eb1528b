"""Prompts and answers of text datasets under any Hugging Face tokenizer, with chat templates.

The built-in tasks' encoders (`rftjax.tasks.base`) assume a BOS token; real tokenizers differ:
Llama 3 has a BOS (and puts it into its chat template), Qwen2 has none. Here a prompt starts
with BOS exactly when the tokenizer has one and the (rendered) prompt does not already begin
with it; answers and decoding need only pad and EOS.

Shapes: ``B`` batch, ``P`` prompt length, ``A`` answer length, ``N`` generated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rftjax.tasks.base import Batch, tokenize

CHAT_TEMPLATE_MODES = ("auto", "none")


def answer_text(value: object) -> str | None:
    """A string or (non-bool) number as text; None for any other value."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def special_ids(tokenizer) -> tuple[int, int | None, int]:
    """``(pad_id, bos_id or None, eos_id)``; ValueError if pad or EOS is missing."""
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
        raise ValueError(f"tokenizer needs pad and eos tokens; got (pad, eos)=({pad}, {eos})")
    return pad, bos, eos


def render_prompts(tokenizer, prompts: Sequence[str], chat_template: str) -> list[str]:
    """Prompt texts as the model sees them.

    With ``chat_template="auto"`` and a tokenizer that has a chat template, each prompt becomes
    one user turn followed by the assistant's generation prompt (the template's text, special
    tokens included); with ``"none"`` or no template, prompts are returned unchanged.
    """
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template={chat_template!r}; accepted: {CHAT_TEMPLATE_MODES}")
    if chat_template == "none" or not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def prompt_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt: BOS (if the tokenizer has one and it is not there) + text."""
    _, bos, _ = special_ids(tokenizer)
    rows = tokenize(tokenizer, texts)
    if bos is None:
        return rows
    return [row if row[:1] == [bos] else [bos, *row] for row in rows]


def encode_prompts(
    tokenizer, texts: Sequence[str], prompt_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts (`prompt_ids`): ``(prompts, prompt_mask)``, int32 ``[B, P]``.

    Raises:
      ValueError: naming the prompt, if it needs more than ``prompt_len`` tokens.
    """
    pad, _, _ = special_ids(tokenizer)
    prompts = np.full((len(texts), prompt_len), pad, np.int32)
    mask = np.zeros((len(texts), prompt_len), np.int32)
    for row, (text, ids) in enumerate(zip(texts, prompt_ids(tokenizer, texts), strict=True)):
        if len(ids) > prompt_len:
            raise ValueError(f"prompt {text!r} needs {len(ids)} tokens > prompt_len={prompt_len}")
        if ids:
            prompts[row, prompt_len - len(ids) :] = ids
            mask[row, prompt_len - len(ids) :] = 1
    return prompts, mask


def encode_answers(tokenizer, texts: Sequence[str], answer_len: int) -> np.ndarray:
    """Answers as tokens + EOS, right-padded (or cut) to ``answer_len``: int32 ``[B, A]``."""
    pad, _, eos = special_ids(tokenizer)
    answers = np.full((len(texts), answer_len), pad, np.int32)
    for row, ids in enumerate(tokenize(tokenizer, texts)):
        ids = [*ids, eos][:answer_len]
        answers[row, : len(ids)] = ids
    return answers


def make_batch(
    tokenizer,
    prompt_texts: Sequence[str],
    answer_texts: Sequence[str],
    prompt_len: int,
    answer_len: int,
) -> Batch:
    """A `Batch` of rendered prompt texts and their reference answers (``B = len(prompts)``)."""
    if len(prompt_texts) != len(answer_texts):
        raise ValueError(f"{len(prompt_texts)} prompts but {len(answer_texts)} answers")
    prompts, mask = encode_prompts(tokenizer, prompt_texts, prompt_len)
    answers = encode_answers(tokenizer, answer_texts, answer_len)
    return Batch(prompts, mask, answers, tuple(answer_texts))

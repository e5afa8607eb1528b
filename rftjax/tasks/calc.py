"""Multiplication with a calculator tool: ``"37*58="`` -> ``"2146"``.

A small model cannot multiply two-digit numbers in its head, but it can learn to call the
calculator and copy its answer::

    <call>37*58</call><result>2146</result>2146<eos>

(observation tokens ``<result>2146</result>`` come from the environment). The reward is exact
match of what follows the last observation (the whole response without a call), EOS included.
The supervised warm-up shows the tool in only a fraction of its demonstrations (the rest
answer directly), so the warmed-up policy calls the tool on some prompts and RL has to
discover that calling pays.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from transformers import PreTrainedTokenizerFast

from rftjax.tasks.arith import ArithTask, align, text_token_scores
from rftjax.tasks.base import (
    DEFAULT_EVAL_SIZE,
    Demo,
    RewardDict,
    check_step,
    make_batch,
    sample_train_keys,
    tokenize,
    train_rng,
)
from rftjax.tokenizer import EOS_ID, PAD_ID
from rftjax.tools import ToolEnv, calculate
from rftjax.tools.calculator import ALPHABET

CALL_END_ID = 5
RESULT_END_ID = 7


def after_last_observation(response: jax.Array) -> jax.Array:
    """int ``[B, N]``: the tokens after the last ``</result>``, shifted to the front and padded
    (the whole response when there is none)."""
    n = response.shape[1]
    idx = jnp.arange(n)
    last = jnp.max(jnp.where(response == RESULT_END_ID, idx, -1), axis=1)  # [B]
    src = last[:, None] + 1 + idx[None, :]
    shifted = jnp.take_along_axis(response, jnp.minimum(src, n - 1), axis=1)
    return jnp.where(src < n, shifted, PAD_ID)


def tool_reward(response: jax.Array, answers: jax.Array) -> dict[str, jax.Array]:
    """``{reward, correct, format, tool_used}`` f32 ``[B]``: exact match (EOS included) of the
    final answer, whether it is digits then EOS, and whether the response called the tool."""
    final = after_last_observation(response)
    resp, ans = align(final, answers)
    correct = jnp.all(resp == ans, axis=1).astype(jnp.float32)
    is_eos = final == EOS_ID
    before = jnp.cumsum(is_eos.astype(jnp.int32), axis=1) == 0
    digits = (final >= 8) & (final <= 17)
    fmt = jnp.all(digits | ~before, axis=1) & jnp.any(is_eos, axis=1) & before[:, 0]
    used = jnp.any(response == CALL_END_ID, axis=1)
    return {
        "reward": correct,
        "correct": correct,
        "format": fmt.astype(jnp.float32),
        "tool_used": used.astype(jnp.float32),
    }


class CalcTask(ArithTask):
    """``"{a}*{b}="`` with ``a, b`` uniform in ``[0, 10**digits)`` and a calculator tool.

    Args:
      seed: data seed.
      digits: operand digits.
      eval_size: held-out prompts.
      tool_demo_fraction: share of warm-up demonstrations that use the tool.
      max_turns: tool calls per completion.
      timeout: seconds a tool call may take.
    """

    def __init__(
        self,
        *,
        seed: int,
        digits: int = 2,
        eval_size: int = DEFAULT_EVAL_SIZE,
        tool_demo_fraction: float = 0.25,
        max_turns: int = 2,
        timeout: float | None = 1.0,
        tokenizer: PreTrainedTokenizerFast | None = None,
    ) -> None:
        if not 1 <= digits <= 4:
            raise ValueError(f"digits must be in [1, 4], got {digits}")
        if not 0.0 <= tool_demo_fraction <= 1.0:
            raise ValueError(f"tool_demo_fraction must be in [0, 1], got {tool_demo_fraction}")
        super().__init__(seed=seed, digits=digits, op="*", eval_size=eval_size, tokenizer=tokenizer)
        self.name = "calc"
        self.tool_demo_fraction = tool_demo_fraction
        # Observation slots fit "<result>error: timeout</result>".
        self.tools = ToolEnv(
            {"calc": calculate},
            self.tokenizer,
            max_obs=16,
            max_turns=max_turns,
            timeout=timeout,
            alphabet=ALPHABET,
        )
        call = 2 * digits + 3  # <call> a * b </call>
        observation = 2 * digits + 2  # <result> product </result>
        self.max_new_tokens_hint = call + observation + self.answer_len + 4
        self.jnp_reward = tool_reward

    def _texts(self, keys: np.ndarray) -> tuple[list[str], list[str]]:
        a, b = np.divmod(keys.astype(np.int64), 10**self.digits)
        prompts = [f"{x}*{y}" for x, y in zip(a.tolist(), b.tolist(), strict=True)]
        return prompts, [str(x * y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]

    def demo_batch(self, step: int, batch_size: int) -> Demo:
        """Warm-up demonstrations: a `tool_demo_fraction` share calls the calculator (its
        observation tokens are context, masked out of the loss), the rest answer directly."""
        check_step(step, batch_size)
        rng = train_rng(self.seed, step)
        keys = sample_train_keys(rng, self.space, batch_size)
        exprs, answers = self._texts(keys)
        use = rng.random(batch_size) < self.tool_demo_fraction
        env = self.tools
        width = self.max_new_tokens_hint
        targets = np.full((batch_size, width), PAD_ID, np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        ids_expr, ids_ans = tokenize(self.tokenizer, exprs), tokenize(self.tokenizer, answers)
        for row in range(batch_size):
            parts = [([*ids_ans[row], EOS_ID], 1.0)]
            if use[row]:
                call = [env.call_start, *ids_expr[row], env.call_end]
                parts = [(call, 1.0), (env.observation(answers[row]), 0.0), *parts]
            ids = [t for seq, _ in parts for t in seq]
            targets[row, : len(ids)] = ids
            mask[row, : len(ids)] = [m for seq, m in parts for _ in seq]
        prompts = make_batch(
            self.tokenizer, [f"{e}=" for e in exprs], answers, self.prompt_len, self.answer_len
        )
        return Demo(prompts.prompts, prompts.prompt_mask, targets, mask)

    def text_reward(self, responses: Sequence[str], answers: Sequence[str]) -> RewardDict:
        finals = [r.rsplit("</result>", 1)[-1] for r in responses]
        _, _, correct, fmt = text_token_scores(self.tokenizer, finals, answers)
        used = np.array(["</call>" in r for r in responses], np.float32)
        return {"reward": correct, "correct": correct, "format": fmt, "tool_used": used}

"""Greedy evaluation on a task's held-out prompts."""

from __future__ import annotations

import jax
import numpy as np

from rftjax import parallel
from rftjax.tasks import Task
from rftjax.train import warmup as wu


class Evaluator:
    """Greedy accuracy on the task's held-out prompts."""

    def __init__(
        self, graphdef, task: Task, *, max_new_tokens: int, cache=None, cache_key=None
    ) -> None:
        """`cache` (a `setup.CompileCache`) and `cache_key` (the static configuration the graph
        comes from: model config, task kind, ...): evaluators with equal keys share one
        compiled decoder. None: no sharing."""
        tok = task.tokenizer
        self.task = task
        self.batch = task.eval_batch()

        def build():
            return wu.make_greedy(
                graphdef,
                max_new_tokens=max_new_tokens,
                eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id,
                tools=task.tool_spec(),
            )

        if cache is None or cache_key is None:
            self.greedy = build()
        else:
            self.greedy = cache.get(("greedy", *cache_key, max_new_tokens), build)
        self.reward = None
        if task.jnp_reward is not None:
            reward = lambda: jax.jit(task.jnp_reward)  # noqa: E731
            self.reward = (
                reward() if cache is None else cache.get(("reward", task.jnp_reward), reward)
            )

    def __call__(self, policy) -> dict[str, float]:
        response = self.greedy(policy, self.batch.prompts, self.batch.prompt_mask)
        if self.reward is not None:
            scores = parallel.fetch(self.reward(response, self.batch.answers))
        else:
            texts = self.task.decode_responses(parallel.fetch(response))
            scores = self.task.text_reward(texts, self.batch.answer_text)
        out = {
            "eval_accuracy": float(np.mean(scores["correct"])),
            "eval_reward": float(np.mean(scores["reward"])),
        }
        if "tool_used" in scores:  # how often the tool is called, overall and when right
            used, correct = np.asarray(scores["tool_used"]), np.asarray(scores["correct"])
            out["eval_tool_rate"] = float(np.mean(used))
            out["eval_tool_rate_correct"] = float(np.sum(used * correct) / max(correct.sum(), 1))
        return out

"""Supervised warm-up and greedy evaluation.

A random tiny model never earns reward, so the default pipeline first teaches the answer format
and some skill with teacher forcing on (prompt, answer + EOS) pairs, then hands over to RL.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rftjax.sampling import generate, response_logprobs, sampling_params


class SFTState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState


def sft_optimizer(lr: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *, pad_id: int):
    """Compiled teacher-forcing step: (state, prompts [B,P], prompt_mask, answers [B,A],
    target_mask [B,A] or None) -> (state, loss). Loss: mean negative log-likelihood of the
    answer tokens (EOS included) where `target_mask` is 1 (default: every non-pad token);
    every non-pad token is context either way (tool observations: context, not imitated)."""

    def loss_fn(params, prompts, prompt_mask, answers, target_mask):
        answer_mask = answers != pad_id
        weight = answer_mask if target_mask is None else target_mask
        logp, _, _ = response_logprobs(
            graphdef, params, prompts, prompt_mask, answers, answer_mask, jnp.ones(())
        )
        return -jnp.sum(logp * weight) / jnp.maximum(weight.sum(), 1)

    def step(state: SFTState, prompts, prompt_mask, answers, target_mask=None):
        loss, grads = jax.value_and_grad(loss_fn)(
            state.params, prompts, prompt_mask, answers, target_mask
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return SFTState(optax.apply_updates(state.params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


def make_greedy(
    graphdef: nnx.GraphDef, *, max_new_tokens: int, eos_id: int, pad_id: int, tools=None
):
    """Compiled greedy decoding: (params, prompts, prompt_mask) -> response int32 [B, N]
    (calling `tools`, a `rftjax.tools.ToolSpec`, when given)."""

    def run(params, prompts, prompt_mask):
        ro = generate(
            graphdef,
            params,
            prompts,
            prompt_mask,
            jax.random.PRNGKey(0),
            sampling_params(temperature=0.0),
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            pad_id=pad_id,
            tools=tools,
        )
        return ro.response

    return jax.jit(run)

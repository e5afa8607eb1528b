"""`step`: GRPO throughput of the configured step (completions/s, generated tokens/s, learner
tokens/s, and the rollout / learn split), its ratio to the established trainers' figure on this
machine class, and the speed-up of KV-cache decoding over full recompute."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import sampling
from rftjax.benchmarks import harness as h
from rftjax.config import TrainConfig
from rftjax.knobs import make_knobs
from rftjax.train.setup import to_prompt_batch
from rftjax.train.step import init_state

# Established JAX and PyTorch GRPO trainers on the reference config (2 layers, hidden 128, 4
# heads, MLP 512, 16 prompts x 8 completions, <= 4 new tokens, KL 0.04, one update per step)
# on the 2-core CPU machines this project is developed on.
REFERENCE_COMPLETIONS_PER_S = 1700.0


def run(cfg: TrainConfig, knob_values: dict, repeats: int) -> dict:
    """GRPO throughput of the configured fused step and its rollout / learn split."""
    setup = h.setup(cfg)
    task, rl, graphdef, params, _ = setup
    if task.jnp_reward is None:
        raise ValueError(f"--what=step needs a task with a compiled reward, not {cfg.task!r}")
    learner = h.learner(setup)
    knobs = make_knobs(**knob_values)
    batches = [to_prompt_batch(task.train_batch(i, rl.prompts_per_step)) for i in range(8)]
    holder = {"state": init_state(params, rl, cfg.seed), "i": 0}

    def step():
        holder["i"] += 1
        holder["state"], metrics = learner.step(holder["state"], batches[holder["i"] % 8], knobs)
        return metrics

    step_s = h.time_calls(step, repeats)
    metrics = jax.device_get(step())
    state = holder["state"]
    rollout_s = h.time_calls(lambda: learner.rollout(state, batches[0], knobs), repeats)
    ro = learner.rollout(state, batches[0], knobs)
    answers = jnp.repeat(batches[0].answers, rl.group_size, 0)
    rewards = {"reward": task.jnp_reward(ro.response, answers)["reward"]}
    copies = [jax.tree.map(jnp.copy, state) for _ in range(repeats + 1)]
    learn_s = h.time_calls(lambda: learner.learn(copies.pop(), ro, rewards, knobs)[1], repeats)
    b = rl.batch_size
    seq_len = ro.tokens.shape[1]
    return {
        "config": {
            "model": cfg.model,
            "overrides": cfg.model_overrides,
            "params": int(sum(np.prod(v.shape) for v in jax.tree.leaves(params))),
            "prompts_per_step": rl.prompts_per_step,
            "group_size": rl.group_size,
            "max_new_tokens": rl.max_new_tokens,
            "kl_coef": knob_values["kl_coef"],
            "updates_per_step": rl.updates_per_step,
        },
        "step_seconds": step_s,
        "rollout_seconds": rollout_s,
        "learn_seconds": learn_s,
        "completions_per_second": b / step_s,
        "generated_tokens_per_second": float(metrics["length_mean"]) * b / step_s,
        "learner_tokens_per_second": b * seq_len / step_s,
        "reference_completions_per_second": REFERENCE_COMPLETIONS_PER_S,
        "ratio_vs_reference": b / step_s / REFERENCE_COMPLETIONS_PER_S,
    }


def decode(cfg: TrainConfig, repeats: int, new_tokens: int) -> dict:
    """KV-cache decoding vs recomputing the full forward for every token, same draws."""
    task, _, graphdef, params, _ = h.setup(cfg)
    batch = to_prompt_batch(task.train_batch(0, cfg.rl.prompts_per_step))
    # eos_id=-1: never stop early, so both decoders produce exactly `new_tokens` tokens.
    kw = dict(
        group_size=cfg.rl.group_size,
        max_new_tokens=new_tokens,
        eos_id=-1,
        pad_id=task.tokenizer.pad_token_id,
    )
    sp = sampling.sampling_params(1.0)
    key = jax.random.PRNGKey(0)
    run = {
        name: jax.jit(functools.partial(fn, graphdef, **kw))
        for name, fn in (("cache", sampling.generate), ("recompute", sampling.generate_recompute))
    }
    out = {name: fn(params, batch.prompts, batch.prompt_mask, key, sp) for name, fn in run.items()}
    same = bool(np.array_equal(out["cache"].response, out["recompute"].response))
    reps = max(3, repeats // 10)
    secs = {
        name: h.time_calls(lambda f=fn: f(params, batch.prompts, batch.prompt_mask, key, sp), reps)
        for name, fn in run.items()
    }
    return {
        "new_tokens": new_tokens,
        "rows": cfg.rl.batch_size,
        "cache_seconds": secs["cache"],
        "recompute_seconds": secs["recompute"],
        "cache_speedup": secs["recompute"] / secs["cache"],
        "identical_tokens": same,
    }


def report(step: dict, decode_: dict) -> list[str]:
    ms = {k: step[f"{k}_seconds"] * 1e3 for k in ("step", "rollout", "learn")}
    return [
        f"step, {step['config']}",
        f"  step   {ms['step']:7.2f} ms  (rollout {ms['rollout']:.2f} ms, "
        f"learn {ms['learn']:.2f} ms)",
        f"  completions/s        {step['completions_per_second']:9.0f}",
        f"  generated tokens/s   {step['generated_tokens_per_second']:9.0f}",
        f"  learner tokens/s     {step['learner_tokens_per_second']:9.0f}",
        f"  ratio vs established trainers ({REFERENCE_COMPLETIONS_PER_S:.0f} completions/s): "
        f"{step['ratio_vs_reference']:.2f}x",
        f"decoding {decode_['rows']} rows x {decode_['new_tokens']} new tokens: KV cache "
        f"{decode_['cache_seconds'] * 1e3:.1f} ms, full recompute "
        f"{decode_['recompute_seconds'] * 1e3:.1f} ms -> {decode_['cache_speedup']:.2f}x "
        f"(identical tokens: {decode_['identical_tokens']})",
    ]

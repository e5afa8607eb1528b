"""`tools`: tool round-trips in the compiled sampler (a task with tools, e.g. --task=calc):
rollouts with the task's environment, with cached answers, and without tools; the cost of one
round-trip and of the callback alone."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import sampling
from rftjax.benchmarks import harness as h
from rftjax.config import TrainConfig
from rftjax.train.setup import to_prompt_batch


def _call_script(task, rows: int, n: int, *, close: bool, seed: int = 0):
    """A logits hook that makes every row write ``<call>a*b`` with operands of the task's full
    width at positions 0.. and then ``</call>`` (when `close`; every row at the same position,
    so one round-trip serves them all), and that bans ``</call>`` everywhere else; all other
    tokens are the model's."""
    rng = np.random.default_rng(seed)
    script = np.full((rows, n), -1, np.int32)
    env = task.tools
    low, high = 10 ** (task.digits - 1), 10**task.digits
    for r in range(rows):
        a, b = rng.integers(low, high, 2)
        ids = [env.call_start, *task.tokenizer(f"{a}*{b}")["input_ids"]]
        ids += [env.call_end] if close else [task.tokenizer("1")["input_ids"][0]]
        script[r, : len(ids)] = ids
    script = jnp.asarray(script)

    def hook(logits, i):
        col = jax.lax.dynamic_index_in_dim(script, i, axis=1, keepdims=False)
        forced = jnp.where(jax.nn.one_hot(col, logits.shape[-1]) > 0, 30.0, -30.0)
        free = logits.at[:, env.call_end].set(-jnp.inf)
        return jnp.where((col >= 0)[:, None], forced, free)

    return hook


def run(cfg: TrainConfig, repeats: int) -> dict:
    """Cost of a tool round-trip in the compiled sampler: the same rollout program (every row
    writes a call, then the model writes freely to the end of the buffer) where the calls are
    closed and served by the task's environment, closed and served from a cache (the callback
    without the tool work), or never closed (no round-trip). Calls alternate; medians."""
    task, rl, graphdef, params, _ = h.setup(cfg)
    if task.tools is None:
        raise ValueError(
            f"--what=tools needs a task with tools (e.g. --task=calc), not {cfg.task!r}"
        )
    env = task.tools
    batch = to_prompt_batch(task.train_batch(0, rl.prompts_per_step))
    rows, n = rl.batch_size, rl.max_new_tokens
    real = env.spec()
    served = {}

    def cached_serve(response, call_start, rows_, end):
        key = (int(end), np.asarray(rows_).tobytes())
        if key not in served:
            served[key] = env.serve(response, call_start, rows_, end)
        return served[key]

    cached = dataclasses.replace(real, serve=cached_serve)
    kw = dict(
        group_size=rl.group_size,
        max_new_tokens=n,
        eos_id=-1,  # never stop early: every variant decodes all n positions
        pad_id=task.tokenizer.pad_token_id,
    )
    fns = {
        name: jax.jit(
            functools.partial(
                sampling.generate,
                graphdef,
                tools=spec,
                logits_hook=_call_script(task, rows, n, close=close),
                **kw,
            )
        )
        for name, spec, close in (
            ("tools", real, True),
            ("cached", cached, True),
            ("none", real, False),
        )
    }
    sp = sampling.sampling_params(1.0)
    args = (params, batch.prompts, batch.prompt_mask, jax.random.PRNGKey(0), sp)
    trips = {}
    for name, fn in fns.items():
        before = env.round_trips
        ro = jax.block_until_ready(fn(*args))
        trips[name] = (env.round_trips - before, int(ro.tool_calls.sum()))
    times = {name: [] for name in fns}
    for i in range(repeats):
        order = list(fns) if i % 2 == 0 else list(fns)[::-1]
        for name in order:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](*args))
            times[name].append(time.perf_counter() - t0)
    sec = {name: float(np.median(t)) for name, t in times.items()}
    per_trip = max(trips["tools"][0], 1)
    return {
        "rows": rows,
        "new_tokens": n,
        "calls_per_rollout": trips["tools"][1],
        "round_trips_per_rollout": trips["tools"][0],
        "rollout_seconds": sec,
        "seconds_per_round_trip": (sec["tools"] - sec["none"]) / per_trip,
        "callback_seconds_per_round_trip": (sec["cached"] - sec["none"]) / per_trip,
        "ratio_tools_vs_none": sec["tools"] / sec["none"],
    }


def report(out: dict, repeats: int) -> list[str]:
    del repeats
    sec = out["rollout_seconds"]
    return [
        f"tool round-trips: {out['rows']} rows x {out['new_tokens']} slots, "
        f"{out['calls_per_rollout']} calls in {out['round_trips_per_rollout']} round-trips "
        "per rollout",
        f"  rollout with tools {sec['tools'] * 1e3:.2f} ms, cached answers "
        f"{sec['cached'] * 1e3:.2f} ms, no tools {sec['none'] * 1e3:.2f} ms "
        f"(ratio tools / none {out['ratio_tools_vs_none']:.3f})",
        f"  per round-trip: {out['seconds_per_round_trip'] * 1e3:.3f} ms, of which the "
        f"callback itself {out['callback_seconds_per_round_trip'] * 1e3:.3f} ms",
    ]

"""What every benchmark shares: set-up from a run's configuration, timing, alternation."""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import models
from rftjax.config import TrainConfig
from rftjax.tasks import Task, make_task
from rftjax.train.setup import build_model_config, to_prompt_batch
from rftjax.train.step import init_state, make_learner


def time_calls(fn, repeats: int) -> float:
    """Seconds per call of `fn()` (whose result is blocked on), after one warm-up call."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


class Setup(NamedTuple):
    task: Task
    rl: object
    graphdef: object
    params: object
    seed: int


def setup(cfg: TrainConfig) -> Setup:
    """Task, RL config and a freshly initialized model of a run's configuration."""
    task = make_task(cfg.task, seed=cfg.seed)
    graphdef, params = models.create(build_model_config(cfg, task), cfg.seed)
    return Setup(task, cfg.rl, graphdef, params, cfg.seed)


def learner(setup: Setup, **options):
    """The compiled learner of the benchmark's task and model (with its tools, if any)."""
    tok = setup.task.tokenizer
    return make_learner(
        setup.graphdef,
        setup.rl,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        reward_fn=setup.task.jnp_reward,
        tools=setup.task.tool_spec(),
        **options,
    )


def memory_bytes(jitted, *args) -> int:
    """Arguments + outputs + temporaries of the compiled program (XLA's memory analysis)."""
    mem = jitted.lower(*args).compile().memory_analysis()
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)


def alternate(a: dict, b: dict, batches, knobs, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per step of two compiled steps called alternately (a, b then b, a, ...) on the
    same batches. `a` / `b` hold "step", "state" (updated in place) and optional "fparams"."""
    times = {id(a): [], id(b): []}
    for i in range(repeats):
        for v in (a, b) if i % 2 == 0 else (b, a):
            t0 = time.perf_counter()
            v["state"], m = v["step"](
                v["state"], batches[i % len(batches)], knobs, v.get("fparams")
            )
            jax.block_until_ready(m)
            times[id(v)].append(time.perf_counter() - t0)
    return np.asarray(times[id(a)]), np.asarray(times[id(b)])


def runner(setup: Setup, batches, knobs, *, monitor=None, fault=None, fparams=None):
    """A compiled step with its own copy of the state, compiled and run three times."""
    step = learner(setup, monitor=monitor, fault=fault).step
    rl, params = setup.rl, setup.params
    state = init_state(jax.tree.map(jnp.copy, params), rl, setup.seed, monitor, fault)
    memory = memory_bytes(step, state, batches[0], knobs, fparams)
    v = {"step": step, "state": state, "fparams": fparams, "memory": memory}
    for i in range(3):  # compile and settle
        v["state"], m = v["step"](v["state"], batches[i], knobs, fparams)
    jax.block_until_ready(m)
    return v


def prompt_batches(setup: Setup) -> list:
    """Eight batches of the task's training prompts, on device."""
    task, rl = setup.task, setup.rl
    return [
        jax.device_put(to_prompt_batch(task.train_batch(i, rl.prompts_per_step))) for i in range(8)
    ]

"""Performance benchmarks, measured side by side in one process.

  python -m launch.bench --what=step [--json FILE] [model / batch flags of launch.train]

`tools`: tool round-trips in the compiled sampler (a task with tools, e.g. --task=calc):
rollouts with the task's environment, with cached answers, and without tools; the cost of one
round-trip and of the callback alone.
`fault_overhead`: per fault type, the step carrying an inactive fault versus the clean step.
`campaign_vmap`: how a campaign could step --runs runs of one configuration: one after another
(as a worker process does) versus one program vmapped over the runs' stacked states (with fm's
detector, as campaigns run). Alternating calls; medians.
`scaling`: the fused step on 1, 2, 4, 8 simulated CPU devices (one subprocess each, all devices
on `data`, then all on `fsdp`) for the same global batch, and the collectives in its compiled
program (all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all). CPU devices
share the same cores: the figures show overheads, not speed-ups.
`chaos`: --cycles kills (SIGTERM or SIGKILL at a random moment) of `launch.train --chaos_args`
runs, each resumed; prints the steps each kill lost and whether every finished run's metrics,
events and final evaluation equal those of a run never interrupted (`rftjax.train.chaos`).
`ray_overhead`: what Ray adds to a campaign run (`--executor=ray`): starting and stopping a
local Ray instance, and per trivial task the round trip (submit, wait, fetch), the cost in a
batch submitted at once, and the wait of a task that depends on another's result (as a
faulted run on its clean twin). Needs the ray extra.
`vs_trl`: rftjax against TRL's GRPOTrainer on one configuration, same weights, alternating steps,
for two thread settings (`rftjax.benchmarks.vs_trl`; needs the trl extra).
`memory`: compiled memory per device of the step for --model=qwen2.5-0.5b|1.5b|7b on --mesh,
from abstract arrays on simulated CPU devices (`rftjax.benchmarks.memory`; no weights allocated).
`step`: GRPO throughput of the configured step (completions/s, generated tokens/s, learner
tokens/s, and the rollout / learn split), its ratio to the established trainers' figure on this
machine class, and the speed-up of KV-cache decoding over full recompute at 64 new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import faults
from fm import taxonomy
from launch import common
from rftjax import models, sampling
from rftjax.knobs import make_knobs
from rftjax.tasks import Task, make_task
from rftjax.train import monitor as run_monitor
from rftjax.train.loop import build_model_config, to_prompt_batch
from rftjax.train.step import init_state, make_learner

flags.DEFINE_enum(
    "what",
    "step",
    [
        "step",
        "fm_overhead",
        "fault_overhead",
        "campaign_vmap",
        "tools",
        "scaling",
        "chaos",
        "ray_overhead",
        "vs_trl",
        "memory",
    ],
    "Which benchmark to run.",
)
flags.DEFINE_integer("cycles", 20, "chaos: kills to make (SIGTERM or SIGKILL, at random).")
flags.DEFINE_string("chaos_dir", "/tmp/rftjax_chaos", "chaos: folder of its runs (replaced).")
flags.DEFINE_string(
    "chaos_args",
    "--steps=300 --checkpoint_every=10 --eval_every=50 --fm=detect",
    "chaos: the launch.train flags of every run (without --workdir / --resume).",
)
flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
flags.DEFINE_string("fault_types", "all", "fault_overhead: comma-separated type ids, or 'all'.")
flags.DEFINE_integer("runs", 2, "campaign_vmap: runs stepped together (a campaign's workers).")
flags.DEFINE_integer("repeats", 50, "Timed calls per measurement (after compilation).")
flags.DEFINE_integer("decode_tokens", 64, "New tokens for the KV-cache vs recompute comparison.")
common.define_run_flags()
FLAGS = flags.FLAGS

# Established JAX and PyTorch GRPO trainers on the reference config (2 layers, hidden 128, 4
# heads, MLP 512, 16 prompts x 8 completions, <= 4 new tokens, KL 0.04, one update per step)
# on the 2-core CPU machines this project is developed on.
REFERENCE_COMPLETIONS_PER_S = 1700.0


def _time(fn, repeats: int) -> float:
    """Seconds per call of `fn()` (whose result is blocked on), after one warm-up call."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


class _Setup(NamedTuple):
    task: Task
    rl: object
    graphdef: object
    params: object


def _setup(values) -> _Setup:
    """Task, RL config and a freshly initialized model, from the same flags as launch.train."""
    task = make_task(values.task, seed=values.seed)
    cfg = common.train_config(values, workdir="unused", steps=0, resume=False)
    graphdef, params = models.create(build_model_config(cfg, task), values.seed)
    return _Setup(task, cfg.rl, graphdef, params)


def _learner(setup: _Setup, **options):
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


def bench_step(values, repeats: int) -> dict:
    setup = _setup(values)
    task, rl, graphdef, params = setup
    if task.jnp_reward is None:
        raise ValueError(f"--what=step needs a task with a compiled reward, not {values.task!r}")
    learner = _learner(setup)
    knobs = make_knobs(**common.knob_values(values))
    batches = [to_prompt_batch(task.train_batch(i, rl.prompts_per_step)) for i in range(8)]
    holder = {"state": init_state(params, rl, values.seed), "i": 0}

    def step():
        holder["i"] += 1
        holder["state"], metrics = learner["step"](holder["state"], batches[holder["i"] % 8], knobs)
        return metrics

    step_s = _time(step, repeats)
    metrics = jax.device_get(step())
    state = holder["state"]
    rollout_s = _time(lambda: learner["rollout"](state, batches[0], knobs), repeats)
    ro = learner["rollout"](state, batches[0], knobs)
    answers = jnp.repeat(batches[0].answers, rl.group_size, 0)
    rewards = {"reward": task.jnp_reward(ro.response, answers)["reward"]}
    copies = [jax.tree.map(jnp.copy, state) for _ in range(repeats + 1)]
    learn_s = _time(lambda: learner["learn"](copies.pop(), ro, rewards, knobs)[1], repeats)
    b = rl.batch_size
    seq_len = ro.tokens.shape[1]
    return {
        "config": {
            "model": values.model,
            "overrides": values.model_overrides,
            "params": int(sum(np.prod(v.shape) for v in jax.tree.leaves(params))),
            "prompts_per_step": rl.prompts_per_step,
            "group_size": rl.group_size,
            "max_new_tokens": rl.max_new_tokens,
            "kl_coef": values.kl_coef,
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


def bench_decode(values, repeats: int, new_tokens: int) -> dict:
    """KV-cache decoding vs recomputing the full forward for every token, same draws."""
    task, _, graphdef, params = _setup(values)
    batch = to_prompt_batch(task.train_batch(0, values.prompts_per_step))
    # eos_id=-1: never stop early, so both decoders produce exactly `new_tokens` tokens.
    kw = dict(
        group_size=values.group_size,
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
        name: _time(lambda f=fn: f(params, batch.prompts, batch.prompt_mask, key, sp), reps)
        for name, fn in run.items()
    }
    return {
        "new_tokens": new_tokens,
        "rows": values.prompts_per_step * values.group_size,
        "cache_seconds": secs["cache"],
        "recompute_seconds": secs["recompute"],
        "cache_speedup": secs["recompute"] / secs["cache"],
        "identical_tokens": same,
    }


def _memory_bytes(jitted, *args) -> int:
    """Arguments + outputs + temporaries of the compiled program (XLA's memory analysis)."""
    mem = jitted.lower(*args).compile().memory_analysis()
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)


def _alternate(a: dict, b: dict, batches, knobs, repeats: int) -> tuple[np.ndarray, np.ndarray]:
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


def _runner(setup: _Setup, values, batches, knobs, *, monitor=None, fault=None, fparams=None):
    """A compiled step with its own copy of the state, compiled and run three times."""
    learner = _learner(setup, monitor=monitor, fault=fault)
    rl, params = setup.rl, setup.params
    state = init_state(jax.tree.map(jnp.copy, params), rl, values.seed, monitor, fault)
    memory = _memory_bytes(learner["step"], state, batches[0], knobs, fparams)
    v = {"step": learner["step"], "state": state, "fparams": fparams, "memory": memory}
    for i in range(3):  # compile and settle
        v["state"], m = v["step"](v["state"], batches[i], knobs, fparams)
    jax.block_until_ready(m)
    return v


def _batches(setup: _Setup) -> list:
    task, rl = setup.task, setup.rl
    return [
        jax.device_put(to_prompt_batch(task.train_batch(i, rl.prompts_per_step))) for i in range(8)
    ]


def bench_fault_overhead(values, repeats: int) -> dict:
    """Per fault type: the step carrying the fault, not yet active (a campaign run before its
    onset), against the clean step; alternating calls in one process, median per-pair ratio."""
    setup = _setup(values)
    rl = setup.rl
    knobs = make_knobs(**common.knob_values(values))
    batches = _batches(setup)
    tools = setup.task.tool_spec()
    fault_setup = faults.Setup(rl.group_size, rl.max_new_tokens, rl.normalize_adv_std, tools)
    clean = _runner(setup, values, batches, knobs)
    out = {}
    types = list(faults.SPECS) if values.fault_types == "all" else values.fault_types.split(",")
    if values.fault_types == "all" and tools is None:  # tool faults need a tool task
        types = [t for t in types if taxonomy.get(t).family != "tool-environment"]
    for type_id in types:
        faulted = _runner(
            setup,
            values,
            batches,
            knobs,
            fault=faults.make(type_id, fault_setup),
            fparams=faults.params_for(type_id, onset=10**9, severity="severe"),
        )
        off, on = _alternate(clean, faulted, batches, knobs, repeats)
        out[type_id] = {
            "step_seconds_clean": float(np.median(off)),
            "step_seconds_inactive_fault": float(np.median(on)),
            "median_ratio": float(np.median(on / off)),
        }
    return out


def bench_fm_overhead(values, repeats: int) -> dict:
    """Step time with fm statistics + detection versus without: same process, alternating
    calls after compilation, median of per-pair ratios."""
    setup = _setup(values)
    fm_monitor = run_monitor.make_monitor(setup.rl)
    knobs = make_knobs(**common.knob_values(values))
    batches = _batches(setup)
    variants = {
        "off": _runner(setup, values, batches, knobs),
        "fm": _runner(setup, values, batches, knobs, monitor=fm_monitor),
    }
    off, on = _alternate(variants["off"], variants["fm"], batches, knobs, repeats)
    fm_state_bytes = sum(x.nbytes for x in jax.tree.leaves(variants["fm"]["state"].fm))
    return {
        "signals": len(fm_monitor.detector.signals),
        "step_seconds_off": float(np.median(off)),
        "step_seconds_fm": float(np.median(on)),
        "median_ratio": float(np.median(on / off)),
        "ratio_of_medians": float(np.median(on) / np.median(off)),
        "memory_bytes_off": variants["off"]["memory"],
        "memory_bytes_fm": variants["fm"]["memory"],
        "memory_ratio": variants["fm"]["memory"] / variants["off"]["memory"],
        "fm_state_bytes": int(fm_state_bytes),
    }


def bench_campaign_vmap(values, repeats: int) -> dict:
    """`values.runs` runs' steps one after another versus one step vmapped over their stacked
    states and batches (each run its own seed and data), called alternately; medians."""
    setup = _setup(values)
    task, rl, _, params = setup
    if task.jnp_reward is None:
        raise ValueError(f"--what=campaign_vmap needs a compiled reward, not {values.task!r}")
    fm_monitor = run_monitor.make_monitor(rl, tools=task.tools is not None)
    step = _learner(setup, monitor=fm_monitor)["step"]
    knobs = make_knobs(**common.knob_values(values))
    n, batches = values.runs, _batches(setup)
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    # Call i gives run r batch (i + 3r) mod 8: each run its own data, as a list and stacked.
    calls = [[batches[(i + 3 * r) % 8] for r in range(n)] for i in range(8)]
    calls = [(runs, stack(runs)) for runs in calls]
    states = [init_state(params, rl, values.seed + r, fm_monitor) for r in range(n)]

    def one_by_one(states, call, knobs, fparams=None):
        out = [step(state, batch, knobs) for state, batch in zip(states, call[0], strict=True)]
        return [s for s, _ in out], out[-1][1]

    vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, None)))
    seq = {"step": one_by_one, "state": states}
    vmapped = {"step": lambda state, call, knobs, fparams=None: vstep(state, call[1], knobs),
               "state": stack(states)}  # fmt: skip
    _alternate(seq, vmapped, calls[:2], knobs, 2)  # compile
    t_seq, t_vmap = _alternate(seq, vmapped, calls, knobs, repeats)
    return {
        "runs": n,
        "seconds_one_by_one": float(np.median(t_seq)),
        "seconds_vmapped": float(np.median(t_vmap)),
        "ratio_one_by_one_vs_vmapped": float(np.median(t_seq) / np.median(t_vmap)),
    }


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


def bench_tools(values, repeats: int) -> dict:
    """Cost of a tool round-trip in the compiled sampler: the same rollout program (every row
    writes a call, then the model writes freely to the end of the buffer) where the calls are
    closed and served by the task's environment, closed and served from a cache (the callback
    without the tool work), or never closed (no round-trip). Calls alternate; medians."""
    task, rl, graphdef, params = _setup(values)
    if task.tools is None:
        raise ValueError(
            f"--what=tools needs a task with tools (e.g. --task=calc), not {values.task!r}"
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


def bench_scaling(values, repeats: int) -> list[dict] | dict:
    """Without --mesh: spawns one process per layout and device count (XLA_FLAGS set before jax
    starts) and returns their figures. With --mesh (in such a process): times the fused step on
    that mesh and counts the collectives of its compiled program."""
    import os
    import subprocess
    import sys

    from rftjax import parallel

    if not values.mesh:
        keep = [a for a in sys.argv[1:] if not a.startswith(("--what", "--mesh", "--json"))]
        points = []
        for layout in ("data", "fsdp"):
            for n in (1, 2, 4, 8):
                env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
                args = ["-m", "launch.bench", "--what=scaling", f"--mesh={layout}:{n}", *keep]
                proc = subprocess.run(
                    [sys.executable, *args], env=env, capture_output=True, text=True, check=False
                )
                lines = [x for x in proc.stdout.splitlines() if x.startswith("SCALING ")]
                if proc.returncode or not lines:
                    raise RuntimeError(f"{layout}:{n} failed:\n{proc.stderr[-3000:]}")
                points.append(json.loads(lines[-1][len("SCALING ") :]))
        return points
    setup = _setup(values)
    task, rl, graphdef, params = setup
    mesh = parallel.make_mesh(values.mesh)
    learner = _learner(setup, mesh=mesh)
    knobs = parallel.replicate(make_knobs(**common.knob_values(values)), mesh)
    batches = [
        parallel.place_batch(to_prompt_batch(task.train_batch(i, rl.prompts_per_step)), mesh)
        for i in range(8)
    ]
    holder = {"state": parallel.place_state(init_state(params, rl, values.seed), mesh), "i": 0}

    def step():
        holder["i"] += 1
        holder["state"], metrics = learner["step"](holder["state"], batches[holder["i"] % 8], knobs)
        return metrics

    seconds = _time(step, repeats)
    hlo = learner["step"].lower(holder["state"], batches[0], knobs).compile().as_text()
    return {
        "mesh": values.mesh,
        "devices": jax.device_count(),
        "step_seconds": seconds,
        "collectives": parallel.collective_counts(hlo),
        "recompiled": learner["step"]._cache_size() > 1,
    }


def _echo(x, *after):
    """A trivial Ray task (`ray_overhead`)."""
    del after
    return x


def bench_ray_overhead(repeats: int) -> dict:
    """Seconds: Ray's start and stop, and per trivial task its round trip, its share of a
    batch, and one link of a chain of dependent tasks (all after the workers started)."""
    from rftjax.campaign import on_ray

    ray = on_ray.import_ray()
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False)
    out = {"start_seconds": time.perf_counter() - t0, "cpus": ray.cluster_resources()["CPU"]}
    task = ray.remote(num_cpus=1)(_echo)
    ray.get([task.remote(i) for i in range(int(out["cpus"]) * 2)])  # workers started
    t0 = time.perf_counter()
    for i in range(repeats):
        ray.get(task.remote(i))
    out["round_trip_seconds"] = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    ray.get([task.remote(i) for i in range(repeats)])
    out["batched_seconds_per_task"] = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    ref = task.remote(0)
    for i in range(repeats):
        ref = task.remote(i, ref)
    ray.get(ref)
    out["dependency_seconds_per_link"] = (time.perf_counter() - t0) / (repeats + 1)
    t0 = time.perf_counter()
    ray.shutdown()
    out["stop_seconds"] = time.perf_counter() - t0
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_libraries()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    if FLAGS.what == "vs_trl":
        from rftjax.benchmarks import vs_trl

        config = vs_trl.config_from_flags(FLAGS)
        results = vs_trl.run(config)
        print(vs_trl.table(config, results))
        if FLAGS.json:
            with open(FLAGS.json, "w", encoding="utf-8") as f:
                json.dump({"config": dataclasses.asdict(config), "results": results}, f, indent=1)
        return
    if FLAGS.what == "memory":
        from rftjax.benchmarks import memory

        shape = memory.shape_from_flags(FLAGS)
        out = memory.run(FLAGS.model, shape, FLAGS.mesh, memory.devices_of(FLAGS.mesh))
        print(f"{shape}\n" + memory.table([out]))
        if FLAGS.json:
            with open(FLAGS.json, "w", encoding="utf-8") as f:
                json.dump({"shape": dataclasses.asdict(shape), **out}, f, indent=1)
        return
    if FLAGS.what == "chaos":
        from rftjax.train import chaos

        out = chaos.run_chaos(FLAGS.chaos_dir, FLAGS.chaos_args.split(), cycles=FLAGS.cycles)
        print(
            f"chaos: {out['cycles']} kills over {out['episodes']} runs to completion; "
            f"runs whose records differ from the uninterrupted run: {out['mismatched_episodes']}"
        )
        print(
            f"  SIGTERM {out['sigterm']}: exit 0 in {out['sigterm_exit_0']}, steps lost at most "
            f"{out['sigterm_steps_lost_max']}; SIGKILL {out['sigkill']}: steps lost at most "
            f"{out['sigkill_steps_lost_max']}"
        )
        _write_json({"chaos": out})
        return
    if FLAGS.what == "ray_overhead":
        out = bench_ray_overhead(FLAGS.repeats)
        print(
            f"Ray ({out['cpus']:g} CPUs): start {out['start_seconds']:.2f} s, stop "
            f"{out['stop_seconds']:.2f} s; per trivial task ({FLAGS.repeats} each): round trip "
            f"{out['round_trip_seconds'] * 1e3:.2f} ms, in a batch "
            f"{out['batched_seconds_per_task'] * 1e3:.2f} ms, a dependency link "
            f"{out['dependency_seconds_per_link'] * 1e3:.2f} ms"
        )
        _write_json({"ray_overhead": out})
        return
    if FLAGS.what == "fault_overhead":
        out = bench_fault_overhead(FLAGS, FLAGS.repeats)
        print(f"inactive fault vs clean step, {FLAGS.repeats} alternating pairs per type:")
        for type_id, r in out.items():
            print(
                f"  {type_id}: {r['step_seconds_clean'] * 1e3:.2f} ms -> "
                f"{r['step_seconds_inactive_fault'] * 1e3:.2f} ms, median per-pair ratio "
                f"{r['median_ratio']:.3f}"
            )
        _write_json({"fault_overhead": out})
        return
    if FLAGS.what == "campaign_vmap":
        out = bench_campaign_vmap(FLAGS, FLAGS.repeats)
        print(
            f"{out['runs']} runs' steps, with fm: one after another "
            f"{out['seconds_one_by_one'] * 1e3:.2f} ms, vmapped {out['seconds_vmapped'] * 1e3:.2f}"
            f" ms (ratio {out['ratio_one_by_one_vs_vmapped']:.3f}; > 1: vmap is faster)"
        )
        _write_json({"campaign_vmap": out})
        return
    if FLAGS.what == "scaling":
        out = bench_scaling(FLAGS, FLAGS.repeats)
        if FLAGS.mesh:  # one point, for the parent process
            print("SCALING " + json.dumps(out))
            return
        base = {p["mesh"].split(":")[0]: p["step_seconds"] for p in out if p["devices"] == 1}
        print(f"fused step, same global batch, {FLAGS.repeats} calls per point:")
        for p in out:
            layout = p["mesh"].split(":")[0]
            ops = ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) or "none"
            print(
                f"  {p['mesh']:8s} {p['step_seconds'] * 1e3:8.2f} ms "
                f"({p['step_seconds'] / base[layout]:.2f}x of 1 device)  collectives: {ops}"
            )
        _write_json({"scaling": out})
        return
    if FLAGS.what == "tools":
        out = bench_tools(FLAGS, FLAGS.repeats)
        sec = out["rollout_seconds"]
        print(
            f"tool round-trips: {out['rows']} rows x {out['new_tokens']} slots, "
            f"{out['calls_per_rollout']} calls in {out['round_trips_per_rollout']} round-trips "
            "per rollout"
        )
        print(
            f"  rollout with tools {sec['tools'] * 1e3:.2f} ms, cached answers "
            f"{sec['cached'] * 1e3:.2f} ms, no tools {sec['none'] * 1e3:.2f} ms "
            f"(ratio tools / none {out['ratio_tools_vs_none']:.3f})"
        )
        print(
            f"  per round-trip: {out['seconds_per_round_trip'] * 1e3:.3f} ms, of which the "
            f"callback itself {out['callback_seconds_per_round_trip'] * 1e3:.3f} ms"
        )
        _write_json({"tools": out})
        return
    if FLAGS.what == "fm_overhead":
        out = bench_fm_overhead(FLAGS, FLAGS.repeats)
        print(f"fm overhead ({out['signals']} signals), {FLAGS.repeats} alternating pairs:")
        print(
            f"  step without fm {out['step_seconds_off'] * 1e3:.2f} ms, with fm "
            f"{out['step_seconds_fm'] * 1e3:.2f} ms (medians)"
        )
        print(
            f"  median per-pair ratio {out['median_ratio']:.3f}, ratio of medians "
            f"{out['ratio_of_medians']:.3f}"
        )
        print(
            f"  compiled memory (args + outputs + temps): {out['memory_bytes_off']:,} -> "
            f"{out['memory_bytes_fm']:,} bytes ({out['memory_ratio']:.3f}x); fm state "
            f"{out['fm_state_bytes']:,} bytes"
        )
        _write_json({"fm_overhead": out})
        return
    step = bench_step(FLAGS, FLAGS.repeats)
    print(f"{FLAGS.algo.upper()} step, {step['config']}")
    ms = {k: step[f"{k}_seconds"] * 1e3 for k in ("step", "rollout", "learn")}
    print(
        f"  step   {ms['step']:7.2f} ms  (rollout {ms['rollout']:.2f} ms, "
        f"learn {ms['learn']:.2f} ms)"
    )
    print(f"  completions/s        {step['completions_per_second']:9.0f}")
    print(f"  generated tokens/s   {step['generated_tokens_per_second']:9.0f}")
    print(f"  learner tokens/s     {step['learner_tokens_per_second']:9.0f}")
    print(
        f"  ratio vs established trainers ({REFERENCE_COMPLETIONS_PER_S:.0f} completions/s): "
        f"{step['ratio_vs_reference']:.2f}x"
    )
    decode = bench_decode(FLAGS, FLAGS.repeats, FLAGS.decode_tokens)
    print(
        f"decoding {decode['rows']} rows x {decode['new_tokens']} new tokens: KV cache "
        f"{decode['cache_seconds'] * 1e3:.1f} ms, full recompute "
        f"{decode['recompute_seconds'] * 1e3:.1f} ms -> {decode['cache_speedup']:.2f}x "
        f"(identical tokens: {decode['identical_tokens']})"
    )
    _write_json({"step": step, "decode": decode})


def _write_json(figures: dict) -> None:
    if FLAGS.json:
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    app.run(main)

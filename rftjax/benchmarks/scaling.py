"""`scaling`: the fused step on 1, 2, 4, 8 simulated CPU devices (one subprocess each, all
devices on `data`, then all on `fsdp`) for the same global batch, and the collectives in its
compiled program (all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all). CPU
devices share the same cores: the figures show overheads, not speed-ups."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax

from rftjax import parallel
from rftjax.benchmarks import harness as h
from rftjax.config import TrainConfig
from rftjax.knobs import make_knobs
from rftjax.train.setup import to_prompt_batch
from rftjax.train.step import init_state


def run(cfg: TrainConfig, knob_values: dict, repeats: int, argv: list[str]) -> list[dict] | dict:
    """`argv`: the benchmark's command line (each point re-runs it). Without a mesh: spawns one
    process per layout and device count (XLA_FLAGS set before jax starts) and returns their
    figures. With `cfg.mesh` (in such a process): times the fused step on that mesh and counts
    the collectives of its compiled program."""
    if not cfg.mesh:
        keep = [a for a in argv[1:] if not a.startswith(("--what", "--mesh", "--json"))]
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
    setup = h.setup(cfg)
    task, rl, graphdef, params, _ = setup
    mesh = parallel.make_mesh(cfg.mesh)
    learner = h.learner(setup, mesh=mesh)
    knobs = parallel.replicate(make_knobs(**knob_values), mesh)
    batches = [
        parallel.place_batch(to_prompt_batch(task.train_batch(i, rl.prompts_per_step)), mesh)
        for i in range(8)
    ]
    holder = {"state": parallel.place_state(init_state(params, rl, cfg.seed), mesh), "i": 0}

    def step():
        holder["i"] += 1
        holder["state"], metrics = learner.step(holder["state"], batches[holder["i"] % 8], knobs)
        return metrics

    seconds = h.time_calls(step, repeats)
    hlo = learner.step.lower(holder["state"], batches[0], knobs).compile().as_text()
    return {
        "mesh": cfg.mesh,
        "devices": jax.device_count(),
        "step_seconds": seconds,
        "collectives": parallel.collective_counts(hlo),
        "recompiled": learner.step._cache_size() > 1,
    }


def report(out: list[dict], repeats: int) -> list[str]:
    base = {p["mesh"].split(":")[0]: p["step_seconds"] for p in out if p["devices"] == 1}
    lines = [f"fused step, same global batch, {repeats} calls per point:"]
    for p in out:
        layout = p["mesh"].split(":")[0]
        ops = ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) or "none"
        lines.append(
            f"  {p['mesh']:8s} {p['step_seconds'] * 1e3:8.2f} ms "
            f"({p['step_seconds'] / base[layout]:.2f}x of 1 device)  collectives: {ops}"
        )
    return lines

"""Performance benchmarks, measured side by side in one process (`rftjax.benchmarks`).

  python -m launch.bench --what=step [--json FILE] [model / batch flags of launch.train]

step: GRPO throughput of the configured step and KV-cache vs recompute decoding.
fm_overhead, fault_overhead, campaign_vmap: what fm and fault injection cost the step, and a
campaign's runs stepped one by one vs vmapped. tools: tool round-trips in the sampler.
scaling: the step on 1-8 simulated devices and its collectives. chaos: kills and resumes of
`launch.train` runs compared with an uninterrupted run. ray_overhead: what Ray adds to a run.
vs_trl: rftjax against TRL's GRPOTrainer on one configuration, same weights, alternating
steps, two thread settings (needs the trl extra). memory: compiled memory per device of the
step for --model=qwen2.5-0.5b|1.5b|7b on --mesh, from abstract arrays (no weights allocated).
matmul: the projections' matmul in float32, bf16 as XLA takes a transposed weight, and
`models.mixed` (--model_overrides=matmul_dtype=bfloat16), forward and backward.
This file only parses flags and calls the library.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
from absl import app, flags

from launch import common

BENCHMARKS = (
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
    "matmul",
)
flags.DEFINE_enum("what", "step", BENCHMARKS, "Which benchmark to run.")
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


def measure(what: str) -> tuple[dict, list[str]]:
    """Runs the benchmark `what` with the flags; returns (figures, lines to print)."""
    from rftjax.benchmarks import chaos, overhead, ray_overhead, scaling, throughput, tools

    reps = FLAGS.repeats
    if what == "vs_trl":
        from rftjax.benchmarks import vs_trl

        config = vs_trl.config_from_flags(FLAGS)
        results = vs_trl.run(config)
        return {"config": dataclasses.asdict(config), "results": results}, [
            vs_trl.table(config, results)
        ]
    if what == "memory":
        from rftjax.benchmarks import memory
        from rftjax.models import parse_overrides

        shape = memory.shape_from_flags(FLAGS)
        overrides = parse_overrides(FLAGS.model_overrides or "")  # e.g. num_layers=2
        out = memory.run(FLAGS.model, shape, FLAGS.mesh, memory.devices_of(FLAGS.mesh), overrides)
        return {"shape": dataclasses.asdict(shape), **out}, [f"{shape}", memory.table([out])]
    if what == "matmul":
        from rftjax.benchmarks import matmul

        out = matmul.run(reps)
        return {what: out}, matmul.report(out, reps)
    if what == "chaos":
        out = chaos.run_chaos(FLAGS.chaos_dir, FLAGS.chaos_args.split(), cycles=FLAGS.cycles)
        return {"chaos": out}, chaos.report(out)
    if what == "ray_overhead":
        out = ray_overhead.run(reps)
        return {what: out}, ray_overhead.report(out, reps)
    cfg = common.train_config(FLAGS, workdir="unused", steps=0, resume=False)
    knobs = common.knob_values(FLAGS)
    if what == "step":
        step = throughput.run(cfg, knobs, reps)
        decode = throughput.decode(cfg, reps, FLAGS.decode_tokens)
        return {"step": step, "decode": decode}, throughput.report(step, decode)
    if what == "tools":
        out = tools.run(cfg, reps)
        return {what: out}, tools.report(out, reps)
    if what == "scaling":
        out = scaling.run(cfg, knobs, reps, sys.argv)
        if FLAGS.mesh:  # one point, for the parent process
            return {}, ["SCALING " + json.dumps(out)]
        return {what: out}, scaling.report(out, reps)
    if what == "fault_overhead":
        out = overhead.fault_overhead(cfg, knobs, reps, FLAGS.fault_types)
    elif what == "campaign_vmap":
        out = overhead.campaign_vmap(cfg, knobs, reps, FLAGS.runs)
    else:
        out = overhead.fm_overhead(cfg, knobs, reps)
    return {what: out}, getattr(overhead, f"report_{what}")(out, reps)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_libraries()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    figures, lines = measure(FLAGS.what)
    print("\n".join(lines))
    if FLAGS.json and figures:
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    app.run(main)

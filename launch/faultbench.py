"""FaultBench campaigns: `python -m launch.faultbench COMMAND [flags]`.

  severity --out DIR [--seeds 0,1,2] [--types RF1,PG2] [--workers 2] [--steps N]
           [any launch.train model / task / algorithm / knob flag]
      Every injectable type at each severity preset (its default variant) and a clean run per
      seed, on the default config; prints final held-out accuracy versus clean (mean over
      seeds) as a Markdown table and writes it to DIR/severity.{json,md}. Resumable.

This file only parses flags and calls the library (`rftjax.campaign`).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

import faults
from launch import common
from rftjax import campaign

COMMANDS = ("severity",)
flags.DEFINE_string("out", None, "Campaign folder (one workdir per run below it).")
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
flags.DEFINE_string("types", "all", "Comma-separated fault type ids, or 'all' injectable ones.")
flags.DEFINE_integer("workers", 2, "Runs in parallel (worker processes).")
flags.DEFINE_integer("steps", 1500, "RL steps of every run.")
common.define_run_flags()
FLAGS = flags.FLAGS


def _types(value: str) -> list[str]:
    if value == "all":
        return list(faults.SPECS)
    types = [t.strip() for t in value.split(",") if t.strip()]
    for t in types:
        faults.spec(t)  # names an unknown or not-yet-injectable type
    return types


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command: {', '.join(COMMANDS)}")
    if not FLAGS.out:
        raise app.UsageError("--out is required (the campaign folder)")
    try:
        seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
        types = _types(FLAGS.types)
        base = common.train_config(FLAGS, workdir=FLAGS.out, steps=FLAGS.steps, resume=False)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    common.quiet_libraries()
    runs = campaign.severity_runs(seeds, types)
    failed = campaign.run_campaign(runs, FLAGS.out, base, workers=FLAGS.workers)
    table = campaign.severity_table(FLAGS.out, runs)
    text = campaign.markdown(table)
    with open(os.path.join(FLAGS.out, "severity.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2)
    with open(os.path.join(FLAGS.out, "severity.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(r.name for r in failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)

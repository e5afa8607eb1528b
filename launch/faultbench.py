"""FaultBench campaigns: `python -m launch.faultbench COMMAND [flags]`.

  generate --spec FILE|BUILT-IN --out DIR [--workers 2]   (built-ins: see --spec)
           [--executor ray [--ray_address auto|HOST:PORT] [--run_cpus 1] [--run_gpus 0]]
      Runs a campaign spec (JSON; see the README) with the in-step detector and trajectory
      records on, then writes DIR/manifest.parquet, steps.parquet, trajectories.parquet and a
      dataset card DIR/README.md. Resumable: finished runs are skipped and the tables are
      assembled again from the run folders. The model / task / knob flags below do not apply
      (the spec holds every setting). generate, severity and remediate run on Ray with
      --executor=ray: a Ray task per run, the campaign folder on storage every node sees.

  evaluate --data DIR --out REPORT [--detector fm,zscore,...] [--window 50] [--split eval]
           [--harm_tolerance 0.05] [--view full,trl,verl,openrlhf]
      Scores detectors on the records of DIR (event-level, no point adjustment) and writes
      into the folder REPORT: report.json, report.md, summary.png (the report on one page)
      and plots/<type>.png (signals around onset). Faulted runs identical to their clean twin
      (inert) are not scored; harmful and harmless faults are also scored apart. --view:
      fm also scored on the records reduced to each trainer's log-level metrics (detection,
      delay, diagnosis per view: the rules, and each view's learned diagnoser by
      leave-one-seed-out cross-validation), into REPORT/views.{json,md}.

  severity --out DIR [--seeds 0,1,2] [--types RF1,PG2] [--workers 2] [--steps N]
           [any launch.train model / task / algorithm / knob flag]
      Every injectable type at each severity preset (its default variant) and a clean run per
      seed, on the default config; prints final held-out accuracy versus clean (mean over
      seeds) as a Markdown table and writes it to DIR/severity.{json,md}. Resumable.

  remediate --spec FILE|heldout-remedy|... --out DIR [--policies fm,random,...] [--workers 2]
      Closed-loop comparison: every faulted run of the spec trained once per policy (none:
      detection only; fm: --fm=full; random, rollback_skip, rollback_lr: baseline planners),
      plus a clean run per seed under --fm=full. Writes DIR/remediate.{json,md}: recovery
      rate on remediable faults (not halted, final accuracy >= clean median - 0.05),
      rollbacks, wasted steps, halts and correct halts, clean runs without rollback.
      Resumable.

  train-diagnoser --data DIR[,DIR...] --out MODEL.json [--window 50]
      Fits the learned diagnoser (`fm.diagnose.Learned`) on the train split's faulted runs at
      their first alarm within the window, scores it and the rule diagnoser on the eval split
      (held out: other seeds) and on the train split, and writes the model (JSON, read with
      numpy alone; the package ships one at fm/artifacts/diagnoser.json). Training runs under
      several conditions (e.g. --spec conditions-faults) are also scored leave one condition
      out and leave one variant out, and the confidence is calibrated on held-out conditions.
  train-diagnoser --data DIR --out FOLDER --view trl,verl,openrlhf [--window 50]
      One learned diagnoser per trainer's log-level view (fm.logs.learned), fit on every run
      of DIR reduced to that view, its leave-one-seed-out scores against the rules in its
      `info`: FOLDER/diagnoser_<view>.json (fm.analyze reads fm/artifacts/).

  power --out DIR [--spec standard|smoke|FILE] [--types all] [--seeds 0,1,2] [--points 6]
        [--variants all|first|others] [--budget 0.5] [--window 50] [--detector all] [--workers 2]
      Power curves: every variant of the types at --points magnitudes, geometric from a
      quarter of "subtle" to "severe" (rftjax.campaign.power), on every seed, with the base
      settings of --spec; each detector debounced to meet --budget false alarms per 1,000
      clean steps; writes DIR/power.{json,md} (minimal detectable magnitude per variant) and
      DIR/power_<family>.png (detection rate against magnitude). Resumable.

This file only parses flags and calls the libraries (`rftjax.campaign`, `fm.faultbench`).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

import faults
from fm.faultbench import baselines
from fm.faultbench import diagnosis as fb_diagnosis
from fm.faultbench import report as fb_report
from launch import common
from rftjax import campaign
from rftjax.campaign.power import VARIANTS as POWER_VARIANTS

COMMANDS = ("generate", "evaluate", "severity", "train-diagnoser", "remediate", "power")
flags.DEFINE_string("out", None, "Campaign folder (generate, severity), report folder (evaluate).")
flags.DEFINE_string(
    "spec",
    None,
    "generate, remediate: a campaign spec JSON file, or a built-in: "
    f"{', '.join(campaign.BUILTINS)}.",
)
flags.DEFINE_string(
    "data", None, "evaluate: a folder written by generate; train-diagnoser: one or more."
)
flags.DEFINE_string("detector", "all", "evaluate: comma-separated detectors, or 'all'.")
flags.DEFINE_integer("window", 50, "evaluate: W, steps after onset in which an alarm detects.")
flags.DEFINE_enum("split", "eval", ("train", "eval", "all"), "evaluate: runs to score.")
flags.DEFINE_string(
    "view",
    "",
    "evaluate: also score fm on the records reduced to what each named trainer's logs carry "
    "(comma-separated: full, trl, verl, openrlhf; fm.logs.evaluate): REPORT/views.{json,md}.",
)
flags.DEFINE_float(
    "harm_tolerance",
    0.05,
    "evaluate: final accuracy a faulted run may lose against its clean twin and still count "
    "as harmless (fm.faultbench.harm).",
)
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
flags.DEFINE_string("types", "all", "Comma-separated fault type ids, or 'all' injectable ones.")
flags.DEFINE_integer("workers", 2, "Runs in parallel (worker processes; --executor=local).")
flags.DEFINE_enum(
    "executor",
    "local",
    ("local", "ray"),
    "generate, severity, remediate: where runs execute: local (worker processes on this "
    "machine) or ray (a Ray task per run; needs pip install 'rftjax[ray]').",
)
flags.DEFINE_string(
    "ray_address",
    "",
    "--executor=ray: empty starts a local Ray instance; 'auto' joins the cluster started on "
    "this machine with `ray start`; else a cluster address (host:port).",
)
flags.DEFINE_float("run_cpus", 1.0, "--executor=ray: CPUs each run declares.")
flags.DEFINE_float("run_gpus", 0.0, "--executor=ray: GPUs each run declares (0.5: two a GPU).")
flags.DEFINE_integer(
    "run_retries", 3, "--executor=ray: times a run is retried after its worker died."
)
flags.DEFINE_integer("steps", 1500, "RL steps of every run.")
flags.DEFINE_string("policies", "all", "remediate: comma-separated policies, or 'all'.")
flags.DEFINE_integer("points", 6, "power: magnitudes per fault variant.")
flags.DEFINE_enum(
    "variants",
    "all",
    POWER_VARIANTS,
    "power: every variant, the default one, or all but the default (completes a 'first' sweep).",
)
flags.DEFINE_float("budget", 0.5, "power: false alarms per 1,000 clean steps for every detector.")
common.define_run_flags()
FLAGS = flags.FLAGS


def _types(value: str) -> list[str]:
    if value == "all":
        return list(faults.SPECS)
    types = [t.strip() for t in value.split(",") if t.strip()]
    for t in types:
        faults.spec(t)  # names an unknown or not-yet-injectable type
    return types


def _ray_options():
    """The Ray executor's options from the flags, or None for the local executor."""
    if FLAGS.executor == "local":
        return None
    from rftjax.campaign import on_ray

    on_ray.import_ray()  # names the extra to install
    return on_ray.RayOptions(
        address=FLAGS.ray_address,
        run_cpus=FLAGS.run_cpus,
        run_gpus=FLAGS.run_gpus,
        max_retries=FLAGS.run_retries,
    )


def _executor() -> str:
    if FLAGS.executor == "ray":
        return f"Ray tasks of {FLAGS.run_cpus:g} CPUs, {FLAGS.run_gpus:g} GPUs"
    return f"{FLAGS.workers} workers"


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def severity() -> None:
    try:
        seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
        types = _types(FLAGS.types)
        base = common.train_config(FLAGS, workdir=FLAGS.out, steps=FLAGS.steps, resume=False)
        ray_options = _ray_options()
    except ValueError as e:
        _fail(str(e))
    common.quiet_libraries()
    runs = campaign.severity_runs(seeds, types)
    try:
        failed = campaign.run_campaign(
            runs, FLAGS.out, base, workers=FLAGS.workers, ray_options=ray_options
        )
    except ValueError as e:
        _fail(str(e))
    table = campaign.severity_table(FLAGS.out, runs)
    _report(os.path.join(FLAGS.out, "severity"), table, campaign.markdown(table), failed)


def _report(path: str, result: dict, text: str, failed) -> None:
    """Writes PATH.json and PATH.md, prints the table; exits 1 if runs failed."""
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    with open(path + ".md", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(r.name for r in failed)}", file=sys.stderr)
        sys.exit(1)


_SPEC_REQUIRED = f"--spec is required: a JSON file or a built-in: {', '.join(campaign.BUILTINS)}"


def generate() -> None:
    if not FLAGS.spec:
        raise app.UsageError(_SPEC_REQUIRED)
    try:
        spec = campaign.resolve(campaign.load_spec(FLAGS.spec))
        ray_options = _ray_options()
    except ValueError as e:
        _fail(str(e))
    common.quiet_libraries()
    try:
        failed, sizes = campaign.generate(
            spec, FLAGS.out, workers=FLAGS.workers, ray_options=ray_options
        )
    except ValueError as e:
        _fail(str(e))
    print(
        f"wrote {FLAGS.out}: {sizes['runs']} runs, {sizes['steps']} steps, "
        f"{sizes['trajectories']} trajectories ({sizes['run_seconds']:.0f} s of runs, "
        f"{_executor()})"
    )
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(r.name for r in failed)}", file=sys.stderr)
        sys.exit(1)


def remediate() -> None:
    from rftjax.campaign import closed_loop

    if not FLAGS.spec:
        raise app.UsageError(_SPEC_REQUIRED)
    policies = closed_loop.POLICIES if FLAGS.policies == "all" else FLAGS.policies.split(",")
    try:
        spec = campaign.resolve(campaign.load_spec(FLAGS.spec))
        ray_options = _ray_options()
        common.quiet_libraries()
        result, failed = closed_loop.run(
            spec, FLAGS.out, policies, workers=FLAGS.workers, ray_options=ray_options
        )
    except ValueError as e:
        _fail(str(e))
    _report(os.path.join(FLAGS.out, "remediate"), result, closed_loop.markdown(result), failed)


def power() -> None:
    from fm.faultbench import power as fb_power
    from rftjax.campaign import power as sweep

    names = [n for n in baselines.BASELINES if n not in ("all_faulty", "fm_recorded")]
    names = names if FLAGS.detector == "all" else FLAGS.detector.split(",")
    try:
        for name in names:
            baselines.get(name)
        base = campaign.load_spec(FLAGS.spec or "standard").get("base", {})
        seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
        ray_options = _ray_options()
        common.quiet_libraries()
        result, failed = sweep.run(
            base, _types(FLAGS.types), seeds, names, FLAGS.out, variants=FLAGS.variants,
            points=FLAGS.points, window=FLAGS.window, budget=FLAGS.budget,
            workers=FLAGS.workers, ray_options=ray_options,
        )  # fmt: skip
    except ValueError as e:
        _fail(str(e))
    _report(os.path.join(FLAGS.out, "power"), result, fb_power.markdown(result), failed)


def evaluate() -> None:
    from fm.logs import evaluate as by_view

    if not FLAGS.data:
        raise app.UsageError("--data is required (a folder written by generate)")
    names = list(baselines.BASELINES) if FLAGS.detector == "all" else FLAGS.detector.split(",")
    views = [v for v in FLAGS.view.split(",") if v]
    common.quiet_libraries()
    try:
        text = fb_report.write(
            FLAGS.data, FLAGS.out, names, window=FLAGS.window, split=FLAGS.split,
            harm_tolerance=FLAGS.harm_tolerance,
        )  # fmt: skip
        if views:
            report = by_view.evaluate(FLAGS.data, views, window=FLAGS.window, split=FLAGS.split)
            table = by_view.markdown(report)
            with open(os.path.join(FLAGS.out, "views.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
            with open(os.path.join(FLAGS.out, "views.md"), "w", encoding="utf-8") as f:
                f.write(table)
            text += "\n\nfm on each trainer's log-level view of the records:\n\n" + table
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    print(text)


def train_diagnoser() -> None:
    if not FLAGS.data:
        raise app.UsageError("--data is required (folders written by generate, comma-separated)")
    if FLAGS.view:  # a learned diagnoser per log-level view, into the folder --out
        from fm.logs import evaluate as by_view

        try:
            infos = by_view.train(FLAGS.data, FLAGS.view.split(","), FLAGS.out, window=FLAGS.window)
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
        for view, info in infos.items():
            cv = info["cross_validation"]
            print(f"{view}: {sum(info['examples'].values())} examples, {cv['folds']}: learned "
                  f"top-1 {cv['learned'].get('top1_macro', 0):.2f}, rules "
                  f"{cv['rules'].get('top1_macro', 0):.2f}; wrote {FLAGS.out}")  # fmt: skip
        return
    try:
        info, table = fb_diagnosis.train_on(FLAGS.data.split(","), FLAGS.out, window=FLAGS.window)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    examples = info["examples"]
    print(f"examples: train {examples['train']}, eval {examples['eval']}; wrote {FLAGS.out}")
    print("\n".join(table))


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command: {', '.join(COMMANDS)}")
    if not FLAGS.out:
        raise app.UsageError("--out is required (the campaign folder, or the report path)")
    commands = {
        "generate": generate,
        "evaluate": evaluate,
        "severity": severity,
        "train-diagnoser": train_diagnoser,
        "remediate": remediate,
        "power": power,
    }
    commands[argv[1]]()


if __name__ == "__main__":
    app.run(main)

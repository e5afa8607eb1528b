"""Train a policy with GRPO or PPO: `python -m launch.train --workdir W [--flagfile F]`.

This file only parses flags and calls the library (`rftjax.train.loop.run`).
"""

from __future__ import annotations

from rftjax.train import preempt

preempt.catch_early()  # a preemption during the imports below is not lost

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

# transformers' advice that PyTorch is absent reads like an error; rftjax needs no torch.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags, logging  # noqa: E402

import faults  # noqa: E402
from launch import common  # noqa: E402

common.define_entry_flags("workdir", "steps", "resume")
common.define_run_flags()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.fault == "list":
        print("\n".join(faults.listing()))
        return
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required (the folder for checkpoints and logs)")
    common.quiet_libraries()
    from rftjax.train.loop import run

    try:
        cfg = common.train_config(
            FLAGS, workdir=FLAGS.workdir, steps=FLAGS.steps, resume=FLAGS.resume
        )
        summary = run(cfg)
    except preempt.Preempted as e:  # before the first RL step: nothing to save
        logging.warning("%s; nothing to save (run again, with --resume if it had begun)", e)
        return
    except (ValueError, FileNotFoundError) as e:  # said once, as a sentence: no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    if common.help_requested(sys.argv):  # the main flags, grouped; exit 0
        print(common.grouped_help(__doc__.strip().splitlines()[0]))
        sys.exit(0)
    app.run(main)

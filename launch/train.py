"""Train a policy with GRPO or PPO: `python -m launch.train --workdir W [--flagfile F]`.

This file only parses flags and calls the library (`rftjax.train.loop.run`). The console shows
plain lines and, on a terminal, a progress bar; the full log is in `W/train.log`
(`rftjax.train.console`).
"""

from __future__ import annotations

from rftjax.train import preempt

preempt.catch_early()  # a preemption during the imports below is not lost

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402

import faults  # noqa: E402
from launch import common  # noqa: E402
from rftjax.train import console  # noqa: E402

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
    with console.Console() as shown:  # before transformers' import: its advice goes to the log
        from rftjax.train.loop import run

        shown.route_transformers()

        try:
            cfg = common.train_config(
                FLAGS, workdir=FLAGS.workdir, steps=FLAGS.steps, resume=FLAGS.resume
            )
            summary = run(cfg)
        except preempt.Preempted as e:  # before the first RL step: nothing to save
            logging.warning("%s; nothing to save (run again, with --resume if it had begun)", e)
            return
        except (ValueError, FileNotFoundError) as e:  # said once, as a sentence: no traceback
            logging.error("%s", e)
            sys.exit(2)
        except Exception:  # Python prints the traceback on the console; the log keeps it too
            logging.exception("the run failed", extra=console.FILE_ONLY)
            raise
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    if common.help_requested(sys.argv):  # the main flags, grouped; exit 0
        print(common.grouped_help(__doc__.strip().splitlines()[0]))
        sys.exit(0)
    app.run(main)

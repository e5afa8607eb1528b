"""fm's overhead inside Tunix's GRPO step, on the tiny set-up of `test_fm_tunix.py`.

One process builds two learners, one without fm and one with fm (`monitor_optimizer` +
`Manager.attach`, remediation on), and trains each for `--steps` steps. Then, alternating
between the two for `--rounds` rounds, it times (fastest of `--reps` calls) each one's
compiled train step (Tunix's jitted `_train_step`: loss, gradients, optimizer; with fm also
fm's statistics) on the last batch each saw. It prints the paired ratio (median over
rounds), the median whole-step interval of each training run (rollout, rewards, reference
log-probs, update, hooks; past 5 warm-up steps) and fm's host time per step (its
`metric_fns` hook, optimizer-statistics copy and step-end hook: statistics, detector,
remediator).

  python tests/bench_fm_tunix.py [--steps 30] [--rounds 7] [--reps 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import jax
import numpy as np
import test_fm_tunix as harness
from tunix.sft import hooks

from fm.integrations import tunix as fm_tunix


class _Clock(hooks.TrainingHooks):
    """Stamps the start of every train step."""

    def __init__(self):
        self.stamps = []

    def on_train_step_start(self, ctx):
        self.stamps.append(time.perf_counter())

    def on_train_start(self, ctx): ...
    def on_train_end(self, ctx): ...
    def on_train_step_end(self, ctx, train_step, train_loss, step_time): ...
    def on_eval_step_start(self, ctx): ...
    def on_eval_step_end(self, ctx, eval_loss): ...


def _timed(fn, spent):
    def wrapped(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t)

    return wrapped


def trained(managed: bool, steps: int, workdir: str):
    """A learner trained `steps` steps: (trainer, its last batch, step interval, fm host s)."""
    manager = fm_tunix.Manager(workdir=workdir)
    mesh, learner = harness._learner(workdir, manager, steps=steps, monitored=managed)
    trainer = learner.rl_cluster.actor_trainer
    clock, spent, batches = _Clock(), {}, []
    trainer.with_training_hooks(clock)
    prepare = trainer._prepare_inputs
    trainer._prepare_inputs = lambda x: batches.append(prepare(x)) or batches[-1]
    if managed:
        for name in ("_observe", "_metric_fn", "_stash_optimizer_stats"):
            setattr(manager, name, _timed(getattr(manager, name), spent.setdefault(name, [])))
        manager.attach(learner)
    with warnings.catch_warnings(), mesh:
        warnings.simplefilter("ignore", DeprecationWarning)
        learner.train(harness._data(steps))
    if managed:
        assert not manager.summary()["alarms"] and not manager.unmanaged
    host = sum(float(np.median(t[5:])) for t in spent.values())  # each runs once a step
    return trainer, mesh, batches[-1], float(np.median(np.diff(clock.stamps)[5:])), host


def step_seconds(trainer, mesh, batch, reps: int) -> float:
    """Fastest of `reps` calls of the trainer's compiled train step, in seconds (the least
    disturbed by other work on a shared machine)."""
    step = trainer._jitted_train_step_fn
    times = []
    with warnings.catch_warnings(), mesh:
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(reps):
            t = time.perf_counter()
            loss, aux = step(trainer.model, trainer.optimizer, batch)
            jax.block_until_ready((loss, aux))
            times.append(time.perf_counter() - t)
    return float(np.min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        plain = trained(False, args.steps, a)
        managed = trained(True, args.steps, b)
        ratios, times = [], []
        for _ in range(args.rounds):
            t_plain = step_seconds(*plain[:3], args.reps)
            t_managed = step_seconds(*managed[:3], args.reps)
            ratios.append(t_managed / t_plain)
            times.append((t_plain, t_managed))
    t = np.median(np.array(times), axis=0) * 1e3
    print(f"compiled train step: {t[0]:.2f} ms without fm, {t[1]:.2f} ms with fm")
    rounds = np.round(ratios, 3)
    print(f"  ratio (paired, median of {args.rounds}): {np.median(ratios):.3f} {rounds}")
    print(f"whole step: {plain[3] * 1e3:.1f} ms without fm, {managed[3] * 1e3:.1f} ms with fm")
    print(f"fm on the host: {managed[4] * 1e3:.2f} ms per step")


if __name__ == "__main__":
    main()

"""fm inside a Tunix GRPO learner: statistics, online detection, diagnosis and remediation.

Install with ``pip install -e ".[tunix]"`` (the ``google-tunix`` package, 0.1.5). Wiring,
around an ordinary Tunix set-up::

    manager = fm_tunix.Manager(workdir="run")
    optimizer = fm_tunix.monitor_optimizer(optax.adam(schedule), learning_rate=schedule)
    config = RLTrainingConfig(actor_optimizer=optimizer, checkpoint_root_directory="run/ckpt",
                              checkpointing_options=manager.checkpointing_options(every=5), ...)
    learner = GRPOLearner(RLCluster(...), GRPOConfig(...), reward_fns=...)
    manager.attach(learner)
    learner.train(manager.dataset(train_ds))

Where each statistic is computed (`fm.monitor`'s stage functions throughout):

- inside Tunix's compiled train step, through the two things Tunix lets a user put there:
  the policy loss (`attach` wraps the learner's loss: KL to the reference, entropy, lengths
  and truncation, repetition, the loss-mask audit; they travel in the loss's aux and come back
  one step late through Tunix's metrics logger) and the optimizer (`monitor_optimizer`:
  gradient, update and parameter norms, per-layer gradient norms, non-finite counts, the
  learning rate, kept in the optimizer state);
- on the host, from Tunix's ``metric_fns`` hook, which receives each step's rewards and
  advantages: reward and group statistics, the advantage cross-checks against fm's shadow
  estimator, and the gap to a redundant verifier when one is given (``shadow_reward_fn``).

`fm.monitor.Monitor` (built from the inputs this set-up provides; `Manager.unavailable` lists
the signals it cannot watch and why) runs its detector on the host each step, one step late,
from a Tunix training hook; alarms go to `fm.diagnose` and `fm.remediate`. What fm can do
through Tunix (`Controller.capabilities`):

- roll back through Tunix's own Orbax checkpoints (`CheckpointManager.maybe_restore`; they
  hold the weights only, so Adam's moments go on unless the plan resets them; Tunix's step
  counter does not rewind, so the steps after a rollback keep counting up);
- Tunix's own settings: β (``kl_coef``, `GRPOConfig.beta`) and ε (``eps_low``,
  `GRPOConfig.epsilon`; a change retraces the train step once), the sampler's temperature,
  top-p and top-k (`RolloutConfig`), the reward functions (``verifier_failover`` swaps them
  for the redundant verifier);
- with `monitor_optimizer`: ``lr_scale`` and ``lr_cap`` (arrays in the optimizer state:
  changing them never recompiles) and resetting Adam's moments; with `Manager.dataset`:
  skipping data (without it, a skip is recorded as ``unavailable``);
- halt with a report (Tunix's ``max_steps`` set to the current step: training ends cleanly).

What it cannot see: the sampler's own log-probs (Tunix's vanilla rollout returns none), tool
use, fingerprints of the weights and the reference, the loss's effective coefficients. An
exception inside fm (host statistics, detector, diagnoser, remediator, or tracing fm's in-step
statistics) is logged as an ``fm_error`` event and training goes on unmanaged.
"""

try:
    import tunix.rl.common  # noqa: F401
    import tunix.sft.hooks  # noqa: F401
    import tunix.sft.metrics_logger  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "fm.integrations.tunix needs Tunix (the google-tunix package), which is not installed: "
        'pip install -e ".[tunix]" (or pip install "rftjax[tunix]")'
    ) from e

from fm.integrations.tunix.control import Controller
from fm.integrations.tunix.manager import Config, Manager
from fm.integrations.tunix.step import PREFIX, OptimizerState, monitor_optimizer, step_stats

__all__ = [
    "PREFIX",
    "Config",
    "Controller",
    "Manager",
    "OptimizerState",
    "monitor_optimizer",
    "step_stats",
]

"""fm: failure management for reinforcement fine-tuning — a library for any trainer.

In the spirit of optax: pure functions of generic inputs and `init` / `update` pairs with
fixed-shape state that live inside a compiled train step, plus host-side diagnosis and
remediation that act through a small controller the trainer implements. fm depends only on
jax, numpy and optax; it never imports the trainer around it.

- `fm.monitor`: the in-step API (`monitor(...)` -> `Monitor.init / read / update`).
- `fm.stats`: the statistics, as pure jnp functions.
- `fm.detect`: the online detector (robust z-scores, CUSUM, invariants).
- `fm.integrity`: bit-exact fingerprints of weights (and cross-replica checks).
- `fm.diagnose`: from an alarm's window of statistics to ranked fault types with evidence.
- `fm.remediate`: the closed loop over a `Controller` with declared `Capabilities`.
- `fm.scalars`: a step's named scalars out of a compiled function as one array per dtype.
- `fm.report`: a run's signals with alarms, diagnoses and rollbacks, as a picture.
- `fm.taxonomy`: the 16 fault types in 5 families, and their remedies.
"""

import importlib

from fm import detect, diagnose, integrity, monitor, remediate, scalars, stats, taxonomy


def __getattr__(name: str):
    """`fm.report` loads on first use: `python -m fm.report` then runs it as imported once."""
    if name == "report":
        return importlib.import_module("fm.report")
    raise AttributeError(f"module 'fm' has no attribute {name!r}")


__all__ = [
    "detect",
    "diagnose",
    "integrity",
    "monitor",
    "remediate",
    "report",
    "scalars",
    "stats",
    "taxonomy",
]

"""Detectors to compare on FaultBench: fm's in-step detector and the baselines.

Every detector is `fit(train_runs) -> alarms_of(run) -> bool[T]`, where a run is a dict of its
step columns (arrays over steps 1..T) and `train_runs` are the clean runs of the training split
(only the learned baselines use them). Every detector is causal: the alarm at step t reads steps
≤ t only, as an online detector in a trainer would.

- `fm`: fm.detect's default detector replayed over the recorded statistics (`detect.replay`
  runs the same `update` as the train step, so on records its trainer wrote with this
  detector it reproduces the `alarm` column bit for bit; on older records it scores the
  detector as it is now).
- `fm_recorded`: the `alarm` column the trainer's in-step detector wrote.
- `all_faulty`: an alarm on every step (the floor any detector must beat).
- Fixed threshold rules in the style of SageMaker Debugger's built-in rules: `rule_nan`
  (non-finite loss, gradient norm or reward), `rule_grad_explode` (‖g‖ > 100),
  `rule_grad_vanish` (‖g‖ < 1e-7), `rule_loss_not_decreasing` (every 10 steps, the loss fell
  by less than 0.1% of |loss| 10 steps earlier), and `rules`, any of the four.
- `zscore`: the skip-step rule of OLMo-core and levanter: an alarm when the loss or the gradient
  norm exceeds the mean of its last 128 accepted values by 6 standard deviations (or is
  non-finite); alarmed values do not enter the history.
- `isolation_forest`, `lof`: scikit-learn IsolationForest and LocalOutlierFactor on robustly
  standardized step statistics, fit on training clean steps, with the alarm threshold at the
  training scores' 1 - 5e-4 quantile (a target of 0.5 false alarms per 1,000 clean steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from fm.faultbench import schema

Run = dict[str, np.ndarray]
AlarmFn = Callable[[Run], np.ndarray]

GRAD_EXPLODE = 100.0
GRAD_VANISH = 1e-7
LOSS_EVERY = 10
LOSS_MIN_DECREASE = 1e-3  # fraction of |loss|
ZSCORE_WINDOW = 128
ZSCORE_SIGMA = 6.0
ZSCORE_MIN_HISTORY = 20
TARGET_FALSE_ALARM_RATE = 5e-4
FEATURE_CLIP = 50.0
MAX_FIT_ROWS = {"isolation_forest": 20_000, "lof": 4_000}


class Baseline(NamedTuple):
    name: str
    description: str
    fit: Callable[[Sequence[Run]], AlarmFn]
    requires: str = ""  # optional package it imports


def _column(run: Run, name: str) -> np.ndarray:
    if name not in run:
        raise KeyError(f"step records lack the {name!r} column; present: {sorted(run)}")
    return np.asarray(run[name], np.float64)


def rolling_zscore(
    x: np.ndarray,
    *,
    window: int = ZSCORE_WINDOW,
    sigma: float = ZSCORE_SIGMA,
    min_history: int = ZSCORE_MIN_HISTORY,
) -> np.ndarray:
    """Upward spikes of a series against its own recent history.

    Args:
      x: f[T], one value a step.
      window: most recent accepted values kept in the history.
      sigma: alarm when x_t > mean + sigma · std of the history (population std).
      min_history: no alarm (other than non-finite) before the history holds this many values.

    Returns:
      bool[T]: alarm_t. Non-finite values always alarm. Alarmed values are kept out of the
      history, so one spike does not inflate σ for the next one.
    """
    alarm = np.zeros(len(x), bool)
    history: list[float] = []
    for t, value in enumerate(np.asarray(x, np.float64)):
        if not np.isfinite(value):
            alarm[t] = True
            continue
        if len(history) >= min_history:
            h = np.asarray(history)
            if value > h.mean() + sigma * h.std():
                alarm[t] = True
                continue
        history.append(float(value))
        if len(history) > window:
            history.pop(0)
    return alarm


def loss_not_decreasing(loss: np.ndarray, *, every: int = LOSS_EVERY) -> np.ndarray:
    """SageMaker Debugger's LossNotDecreasing: at steps every, 2·every, ... (1-based), alarm when
    the loss fell by less than LOSS_MIN_DECREASE · |loss| against `every` steps earlier."""
    loss = np.asarray(loss, np.float64)
    alarm = np.zeros(loss.size, bool)
    for t in range(2 * every - 1, loss.size, every):  # 0-based index of step 2·every, ...
        before, now = loss[t - every], loss[t]
        alarm[t] = not now < before - LOSS_MIN_DECREASE * abs(before)
    return alarm


def _rule_nan(run: Run) -> np.ndarray:
    names = [n for n in ("loss", "grad_norm", "reward_mean") if n in run]
    if not names:
        raise KeyError("step records lack loss, grad_norm and reward_mean")
    return ~np.all([np.isfinite(_column(run, n)) for n in names], axis=0)


def _rule_grad_explode(run: Run) -> np.ndarray:
    return _column(run, "grad_norm") > GRAD_EXPLODE


def _rule_grad_vanish(run: Run) -> np.ndarray:
    return _column(run, "grad_norm") < GRAD_VANISH


def _rule_loss(run: Run) -> np.ndarray:
    return loss_not_decreasing(_column(run, "loss"))


def _rules(run: Run) -> np.ndarray:
    rules = (_rule_nan, _rule_grad_explode, _rule_grad_vanish, _rule_loss)
    return np.any([r(run) for r in rules], axis=0)


def _zscore(run: Run) -> np.ndarray:
    return rolling_zscore(_column(run, "loss")) | rolling_zscore(_column(run, "grad_norm"))


def _fm(run: Run) -> np.ndarray:
    if "alarm" not in run:
        raise KeyError("step records have no 'alarm' column: the runs had no in-step detector")
    return np.nan_to_num(_column(run, "alarm")) > 0


def replay_signals(run: Run) -> tuple:
    """fm.detect's default signals that `run` recorded (a statistic with no finite value was not
    logged). The advantage cross-checks that assume a group-normalized estimator are kept when
    the run's in-step detector watched them too, or when it had none."""
    from fm import detect

    watched = {n.removeprefix("flag/") for n in run if n.startswith("flag/")}
    group_normalized = not watched or "adv_scale_ratio" in watched
    return tuple(
        s
        for s in detect.default_signals(group_normalized=group_normalized)
        if s.name in run and np.isfinite(np.asarray(run[s.name], np.float64)).any()
    )


_REPLAYS: dict[tuple, Callable] = {}  # signals → compiled replay (one compile per signal set)


def replay_flags(run: Run) -> tuple[tuple, np.ndarray]:
    """fm.detect's default detector replayed over `run`'s recorded statistics: (its signals,
    their flags bool[T, S])."""
    import jax

    from fm import detect

    signals = replay_signals(run)
    if not signals:
        raise ValueError(f"step records hold none of fm.detect's signals; present: {sorted(run)}")
    if signals not in _REPLAYS:
        det = detect.detector(signals)
        _REPLAYS[signals] = jax.jit(lambda series, d=det: detect.replay(d, series)[0].flags)
    read = [n for n in detect.statistics_read(signals) if n in run]
    series = {n: np.asarray(run[n], np.float32) for n in read}
    return signals, np.asarray(_REPLAYS[signals](series))


def _fm_replay(run: Run) -> np.ndarray:
    return replay_flags(run)[1].any(axis=-1)


def _all_faulty(run: Run) -> np.ndarray:
    return np.ones(len(run["step"]), bool)


def _fixed(fn: AlarmFn) -> Callable[[Sequence[Run]], AlarmFn]:
    def fit(train: Sequence[Run]) -> AlarmFn:
        del train
        return fn

    return fit


class Standardizer(NamedTuple):
    """Robust per-feature standardization: (x - median) / scale, clipped to ±FEATURE_CLIP."""

    names: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray

    def __call__(self, run: Run) -> tuple[np.ndarray, np.ndarray]:
        """Returns (features f[T, F], non-finite bool[T])."""
        x = np.stack([_column(run, n) for n in self.names], axis=-1)
        bad = ~np.all(np.isfinite(x), axis=-1)
        z = (np.nan_to_num(x, nan=0.0, posinf=1e30, neginf=-1e30) - self.center) / self.scale
        return np.clip(z, -FEATURE_CLIP, FEATURE_CLIP), bad


def standardizer(train: Sequence[Run]) -> Standardizer:
    """Features: step statistics (`schema.is_feature`) finite on every training step; scale:
    IQR / 1.349, floored at 1e-6 + 1e-3 · |median| so that constant statistics stay usable."""
    if not train:
        raise ValueError("the learned baselines need clean runs in the training split; none given")
    names = sorted(n for n in train[0] if schema.is_feature(n))
    x = np.concatenate([np.stack([_column(r, n) for n in names], -1) for r in train])
    keep = np.all(np.isfinite(x), axis=0)
    names, x = [n for n, k in zip(names, keep, strict=True) if k], x[:, keep]
    center = np.median(x, axis=0)
    q75, q25 = np.percentile(x, [75, 25], axis=0)
    scale = np.maximum((q75 - q25) / 1.349, 1e-6 + 1e-3 * np.abs(center))
    return Standardizer(tuple(names), center, scale)


def _sklearn_fit(kind: str) -> Callable[[Sequence[Run]], AlarmFn]:
    def fit(train: Sequence[Run]) -> AlarmFn:
        try:
            from sklearn.ensemble import IsolationForest
            from sklearn.neighbors import LocalOutlierFactor
        except ImportError as e:
            raise ImportError(
                f"detector {kind!r} needs scikit-learn: pip install 'rftjax[faultbench]'"
            ) from e
        std = standardizer(train)
        x = np.concatenate([std(r)[0] for r in train])
        rng = np.random.default_rng(0)
        if len(x) > MAX_FIT_ROWS[kind]:
            x = x[rng.choice(len(x), MAX_FIT_ROWS[kind], replace=False)]
        if kind == "isolation_forest":
            model = IsolationForest(n_estimators=200, random_state=0).fit(x)
            train_scores = -model.score_samples(x)
        else:
            neighbors = max(1, min(20, len(x) - 1))
            model = LocalOutlierFactor(n_neighbors=neighbors, novelty=True).fit(x)
            train_scores = -model.negative_outlier_factor_
        threshold = np.quantile(train_scores, 1 - TARGET_FALSE_ALARM_RATE)

        def alarms_of(run: Run) -> np.ndarray:
            z, bad = std(run)
            return (-model.score_samples(z) > threshold) | bad

        return alarms_of

    return fit


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("fm", "fm.detect replayed over the recorded statistics", _fixed(_fm_replay)),
        Baseline("fm_recorded", "fm.detect in the train step (its alarm column)", _fixed(_fm)),
        Baseline("all_faulty", "an alarm on every step", _fixed(_all_faulty)),
        Baseline("rules", "any of the four threshold rules", _fixed(_rules)),
        Baseline("rule_nan", "non-finite loss, grad norm or reward", _fixed(_rule_nan)),
        Baseline("rule_grad_explode", "grad norm > 100", _fixed(_rule_grad_explode)),
        Baseline("rule_grad_vanish", "grad norm < 1e-7", _fixed(_rule_grad_vanish)),
        Baseline(
            "rule_loss_not_decreasing",
            "loss fell < 0.1% in 10 steps (checked every 10)",
            _fixed(_rule_loss),
        ),
        Baseline("zscore", "loss or grad norm > mean + 6σ of last 128 steps", _fixed(_zscore)),
        Baseline(
            "isolation_forest",
            "IsolationForest on step statistics",
            _sklearn_fit("isolation_forest"),
            "sklearn",
        ),
        Baseline("lof", "LocalOutlierFactor on step statistics", _sklearn_fit("lof"), "sklearn"),
    )
}


def get(name: str) -> Baseline:
    """The detector called `name`; a ValueError lists the known ones."""
    if name not in BASELINES:
        raise ValueError(f"unknown detector {name!r}; accepted: {', '.join(BASELINES)}")
    return BASELINES[name]


def available(baseline: Baseline) -> bool:
    """Whether the optional package the detector needs is installed."""
    if not baseline.requires:
        return True
    import importlib.util

    return importlib.util.find_spec(baseline.requires) is not None

"""Online anomaly detection over per-step scalar statistics, run inside a jitted train step.

A `detector(signals, config)` factory returns a `Detector(init, update, thresholds)` of pure
functions in the optax style. The state is a fixed-shape ring buffer of the last W accepted
values of each of S signals, plus CUSUM sums; `update` never syncs with the host and takes no
Python branch on values, so it can live in the compiled step (and under `vmap` over seeds).

Per "score" signal and step, with x the new value and the window's valid points:

    m = median(window),  σ̂ = max(1.4826·MAD(window), min_scale·(|m| + 1))
    z = (x - m) / σ̂                                   robust z-score, signed
    r = clip(z, -c, c)                                winsorized: one spike adds at most c - k
    S⁺ = max(0, S⁺ + r - k),  S⁻ = max(0, S⁻ - r - k)  Page's two-sided CUSUM

The signal flags when the direction-allowed side of z exceeds z_thr or of CUSUM exceeds h, once
the window holds at least `warmup` valid points; a flag resets its CUSUM sums. "invariant"
signals (cross-check counts) flag iff their value is > 0. Any non-finite value flags.

Flagged values never enter the window (their ring-buffer slot stays invalid for that signal):
otherwise σ̂ inflates after every spike and the next anomaly goes unseen. A shift flagged on
every step is flagged until the pre-shift points age out; the window then holds fewer than
`warmup` points and the signal re-enters warm-up at the new level. Points between CUSUM trips
are accepted, so after a smaller shift the window follows the new level.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_DIRECTIONS = ("up", "down", "both")
_KINDS = ("score", "invariant")
_HEAVY_Z = 25.0  # z threshold of statistics whose healthy runs show rare large spikes
_TRENDING_H = 40.0
# The update/param ratio of Adam at a constant lr is tight (1.4826·MAD ≈ 10% of its value) yet
# wanders by 1-2σ for dozens of healthy steps; an lr spike or stall moves it by ≥ 5σ at once.
# Entropy and the gradient norm drift the same way as a task is learned: at h = 40 they made
# all of the false alarms on FaultBench `standard`'s training split (36 steps), at 60 two.
_SLOW_H = 60.0  # CUSUM threshold of statistics that drift during healthy training
# Statistics that saturate as a task is learned (the reward's spread and the share of groups
# whose completions all score alike both move toward their limit as accuracy nears 100%) get no
# drift alarm: that drift is learning. On FaultBench `standard`'s tool task they made 283 of
# the training split's 304 false alarms; without it no fault there went unseen. Jumps still
# alarm through the z-score.
_NO_DRIFT = math.inf
# Statistics of the policy gradient, read only on steps where some group's rewards differ: when
# every group ties (a saturated task, e.g. `sort` after warm-up) the gradient norm falls to the
# regularizers' (1e-6–1e-3 against 0.1–10) and the advantages to rounding noise, so the next
# step with a learning signal scored against such a window was a z of 25–57 on clean runs.
_IDLE_WITHOUT_SIGNAL = ("grad_norm", "adv_scale_ratio")
_MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): MAD → σ for Gaussian data


class Signal(NamedTuple):
    """Static description of one monitored scalar statistic.

    Attributes:
      name: key of the statistic in the `stats` dict given to `update`.
      direction: "up" | "down" | "both": which deviations from the window may alarm.
      kind: "score" (robust z-score + CUSUM drift) or "invariant" (alarm iff value > 0, e.g. a
        count of cross-check failures; no warm-up, no history needed).
      floor: absolute floor of the robust scale σ̂, in the signal's units: the smallest change
        that matters. Signals that sit at 0 or move in discrete steps (a fraction of 128
        samples, a numerical mismatch of 1e-6) would otherwise turn any movement into z ≫ 1.
      cusum_h: this signal's CUSUM threshold (None: the config's; math.inf: no drift alarm),
        e.g. higher for statistics that trend while training goes well (KL to the reference,
        entropy).
      z: this signal's z-score threshold (None: the config's), e.g. higher for statistics with
        heavy tails in healthy runs.
      idle_if: name of a statistic in [0, 1]; on steps where it equals 1 this signal has
        nothing to say and is not read: not scored, not entered into its window, its CUSUM
        sums kept (a non-finite value still flags). E.g. the gradient norm when every group's
        rewards tie (`frac_zero_std_groups` = 1): the policy gradient is then zero and the
        norm is the regularizers' alone, orders of magnitude below the window's. When the
        statistic is absent from a step's stats, the signal is always read.
    """

    name: str
    direction: str = "both"
    kind: str = "score"
    floor: float = 0.0
    cusum_h: float | None = None
    z: float | None = None
    idle_if: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DetectConfig:
    """Static detector configuration: shapes and the defaults of `Thresholds`.

    Attributes:
      window: rolling history length W (ring buffer slots per signal).
      warmup: valid window points a signal needs before it may alarm (scores still computed).
      z_threshold: robust |z| above which a point is flagged.
      cusum_k: CUSUM drift allowance k, in robust-σ units.
      cusum_h: CUSUM decision threshold h.
      cusum_clip: CUSUM input winsorization c: |r| ≤ c, so isolated spikes (already judged by
        the z-score) cannot add up to a drift alarm; only sustained shifts accumulate.
      cusum_memory: M, the CUSUM's memory in steps: each step its sums decay by 1 - 1/M
        before the new point is added (math.inf: Page's classic CUSUM, which never forgets).
      min_scale: relative floor of the robust scale: σ̂ ≥ min_scale·(|median| + 1).

    The default thresholds are set for heavy-tailed statistics (grad norms, max ratios): on
    Student-t(3) noise a MAD z-score exceeds 6 on ~0.9% of steps, so z = 6, h = 12 would raise
    ~9 false alarms per 1,000 steps; z = 16, h = 20 raise ~0.7 (tests/test_fm_detect.py). A
    sustained shift is still caught by CUSUM within a few steps (8σ: 2 steps). For near-Gaussian
    signals pass a lower per-signal `Thresholds.z` at runtime. With c - k < h one spike cannot
    trip CUSUM alone; with c = 4, k = 0.5, h = 20 a sustained 4σ shift trips it in 6 steps.

    The memory M equals the window by default: the center is the window's median, which lags a
    statistic that trends while training goes well (KL to the reference, entropy, the update
    ratio) by about W/2 steps, so a classic CUSUM summed that lag for ever and alarmed after
    100–200 healthy steps at |z| ≈ 1 (4 of the 11 false alarms of FaultBench `conditions`). A
    constant excess e = r - k per step now sums to at most e·M: the 4σ shift still trips h = 20
    in 6 steps (h = 40: 13, h = 60: 20 instead of 12 and 18), while a shift of 1σ or less
    (e ≤ 0.5, at most 32) no longer trips h ≥ 40: on a trending statistic it is not told apart
    from learning.
    """

    window: int = 64
    warmup: int = 20
    z_threshold: float = 16.0
    cusum_k: float = 0.5
    cusum_h: float = 20.0
    cusum_clip: float = 4.0
    cusum_memory: float = 64.0
    min_scale: float = 1e-6

    def __post_init__(self):
        for name in ("window", "warmup"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"DetectConfig.{name} must be an int, got {value!r}")
        if self.window < 2:
            raise ValueError(f"DetectConfig.window must be >= 2, got {self.window}")
        if not 0 <= self.warmup <= self.window:
            raise ValueError(
                f"DetectConfig.warmup must be in [0, window={self.window}], got {self.warmup}"
            )
        if not (isinstance(self.cusum_memory, (int, float)) and self.cusum_memory >= 1):
            raise ValueError(
                f"DetectConfig.cusum_memory must be >= 1 step (math.inf: no decay), "
                f"got {self.cusum_memory!r}"
            )
        for name in ("z_threshold", "cusum_h", "cusum_clip", "min_scale", "cusum_k"):
            value = getattr(self, name)
            lowest_ok = 0.0 if name == "cusum_k" else math.nextafter(0.0, 1.0)
            if not (isinstance(value, (int, float)) and math.isfinite(value)) or value < lowest_ok:
                bound = ">= 0" if name == "cusum_k" else "> 0"
                raise ValueError(f"DetectConfig.{name} must be finite and {bound}, got {value!r}")


class Thresholds(NamedTuple):
    """Runtime thresholds, passed as arrays so that changing them never recompiles.

    Each field is a scalar (all signals) or shaped [S] (per signal, in `Detector.signals` order).
    """

    z: jax.Array  # f32[] | f32[S]
    cusum_k: jax.Array  # f32[] | f32[S]
    cusum_h: jax.Array  # f32[] | f32[S]
    warmup: jax.Array  # i32[] | i32[S]
    floor: jax.Array  # f32[] | f32[S] absolute floor of the robust scale


class DetectState(NamedTuple):
    """Detector state carried from step to step (W = window, S = number of signals)."""

    history: jax.Array  # f32[W, S] accepted values; 0 in invalid slots
    valid: jax.Array  # bool[W, S] slot holds an accepted value of that signal
    index: jax.Array  # i32[] next ring-buffer slot to write
    count: jax.Array  # i32[S] accepted points per signal now in the window (= valid.sum(0))
    cusum_pos: jax.Array  # f32[S] S⁺
    cusum_neg: jax.Array  # f32[S] S⁻
    step: jax.Array  # i32[] updates so far
    alarms_total: jax.Array  # i32[] steps with an alarm so far


class DetectOutput(NamedTuple):
    """What one `update` says about the step it just saw."""

    alarm: jax.Array  # bool[] any signal flagged
    flags: jax.Array  # bool[S]
    scores: jax.Array  # f32[S] robust z, signed; 0 below 2 window points, non-finite, invariants
    cusum: jax.Array  # f32[S] largest direction-allowed CUSUM side, before any reset
    nonfinite: jax.Array  # bool[] any monitored value non-finite


class Detector(NamedTuple):
    """A detector over a fixed tuple of signals: pure `init` / `update` functions."""

    signals: tuple[Signal, ...]
    init: Callable[[], DetectState]
    update: Callable[
        [Mapping[str, jax.Array], DetectState, Thresholds | None],
        tuple[DetectOutput, DetectState],
    ]
    thresholds: Callable[[], Thresholds]


def robust_stats(
    history: jax.Array, valid: jax.Array, *, min_scale: float, floor: jax.Array | float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Median and robust scale of each column over its valid entries.

    Invalid entries are set to +inf and sorted to the end, so the median is read at the middle
    index given by the valid count: O(S·W log W).

    Args:
      history: f32[W, S] values.
      valid: bool[W, S] which entries count.
      min_scale: relative floor, σ̂ ≥ min_scale·(|median| + 1).
      floor: absolute floor, σ̂ ≥ floor (scalar or f32[S]).

    Returns:
      (median f32[S], scale f32[S]) with scale = max(1.4826·MAD, floor); a column without valid
      entries gets median 0 and the floor.
    """
    n = valid.sum(axis=0)
    median = _masked_median(history, valid, n)
    mad = _masked_median(jnp.abs(history - median), valid, n)
    scale = jnp.maximum(_MAD_TO_SIGMA * mad, min_scale * (jnp.abs(median) + 1.0))
    scale = jnp.maximum(scale, floor)
    return median, scale


def _masked_median(x: jax.Array, valid: jax.Array, n: jax.Array) -> jax.Array:
    """Median over axis 0 of the entries where `valid` (n = valid count per column, [S])."""
    ordered = sort_columns(jnp.where(valid, x, jnp.inf))
    lo = jnp.take_along_axis(ordered, jnp.maximum((n - 1) // 2, 0)[None], axis=0)[0]
    hi = jnp.take_along_axis(ordered, jnp.maximum(n // 2, 0)[None], axis=0)[0]
    return jnp.where(n > 0, 0.5 * (lo + hi), 0.0)


def sort_columns(x: jax.Array) -> jax.Array:
    """f32[W, S] sorted along axis 0, the values of `jnp.sort(x, axis=0)` (NaN last, −0.0 read
    as 0.0), by a bitonic network: log₂W·(log₂W + 1)/2 stages of elementwise min / max over the
    whole array, on integer keys in the floats' total order. XLA's CPU sort compares one pair at
    a time: at W = 64, S = 26 (the detector's window) the network is about 4× faster."""
    x = jnp.where(x == 0, 0.0, x)  # −0.0 → 0.0, as jnp.sort's comparison reads it
    x = jnp.where(jnp.isnan(x), jnp.nan, x)  # one NaN payload
    keys = _order_keys(jax.lax.bitcast_convert_type(x, jnp.int32))
    w = x.shape[0]
    size = 1 << max(w - 1, 0).bit_length()
    keys = jnp.pad(keys, [(0, size - w), (0, 0)], constant_values=np.iinfo(np.int32).max)
    block = 2
    while block <= size:
        step = block // 2
        while step >= 1:  # slots i and i + step (i & step == 0) compared, as pairs [.., 2, ..]
            pairs = keys.reshape(size // (2 * step), 2, step, -1)
            low, high = jnp.minimum(pairs[:, 0], pairs[:, 1]), jnp.maximum(pairs[:, 0], pairs[:, 1])
            up = ((np.arange(size // (2 * step)) * 2 * step) & block) == 0  # ascending pairs
            up = up[:, None, None]
            pairs = jnp.stack([jnp.where(up, low, high), jnp.where(up, high, low)], axis=1)
            keys = pairs.reshape(size, -1)
            step //= 2
        block *= 2
    return jax.lax.bitcast_convert_type(_order_keys(keys[:w]), jnp.float32)


def _order_keys(bits: jax.Array) -> jax.Array:
    """int32 float bits -> keys whose integer order is the floats' total order (negative
    floats' magnitude bits flipped); its own inverse."""
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


def detector(signals: Sequence[Signal | str], config: DetectConfig = DetectConfig()) -> Detector:
    """Builds a detector over `signals` (a bare name means `Signal(name)`).

    Args:
      signals: the S monitored statistics, in the order of the state's last axis.
      config: window, warm-up, default thresholds.

    Returns:
      Detector whose `update(stats, state, thresholds=None)` reads `stats[s.name]` (scalars) and
      returns `(DetectOutput, DetectState)`; `thresholds=None` uses `config`'s values as constants.
    """
    sigs = tuple(Signal(s) if isinstance(s, str) else Signal(*s) for s in signals)
    _check_signals(sigs)
    num, window, min_scale = len(sigs), config.window, config.min_scale
    decay = 1.0 - 1.0 / config.cusum_memory  # 1.0 for math.inf
    is_score = np.array([s.kind == "score" for s in sigs])
    up_ok = is_score & np.array([s.direction in ("up", "both") for s in sigs])
    down_ok = is_score & np.array([s.direction in ("down", "both") for s in sigs])

    def init() -> DetectState:
        zeros = jnp.zeros((num,), jnp.float32)
        return DetectState(
            history=jnp.zeros((window, num), jnp.float32),
            valid=jnp.zeros((window, num), bool),
            index=jnp.zeros((), jnp.int32),
            count=jnp.zeros((num,), jnp.int32),
            cusum_pos=zeros,
            cusum_neg=zeros,
            step=jnp.zeros((), jnp.int32),
            alarms_total=jnp.zeros((), jnp.int32),
        )

    floors = np.array([s.floor for s in sigs], np.float32)
    zs = np.array([config.z_threshold if s.z is None else s.z for s in sigs], np.float32)
    cusum_hs = np.array(
        [config.cusum_h if s.cusum_h is None else s.cusum_h for s in sigs], np.float32
    )

    def thresholds() -> Thresholds:
        return Thresholds(
            z=jnp.asarray(zs),
            cusum_k=jnp.asarray(config.cusum_k, jnp.float32),
            cusum_h=jnp.asarray(cusum_hs),
            warmup=jnp.asarray(config.warmup, jnp.int32),
            floor=jnp.asarray(floors),
        )

    def update(
        stats: Mapping[str, jax.Array], state: DetectState, thresholds: Thresholds | None = None
    ) -> tuple[DetectOutput, DetectState]:
        th = thresholds
        if th is None:
            th = Thresholds(zs, config.cusum_k, cusum_hs, config.warmup, floors)
        x = _gather(stats, sigs)
        idle = _idle(stats, sigs)
        finite = jnp.isfinite(x)
        median, scale = robust_stats(
            state.history, state.valid, min_scale=min_scale, floor=th.floor
        )
        scored = finite & is_score & (state.count >= 2) & ~idle
        z = jnp.where(scored, (jnp.where(finite, x, 0.0) - median) / scale, 0.0)
        warm = is_score & (state.count >= th.warmup) & ~idle
        z_flag = warm & ((up_ok & (z > th.z)) | (down_ok & (z < -th.z)))

        r = jnp.clip(z, -config.cusum_clip, config.cusum_clip)
        pos = jnp.maximum(decay * state.cusum_pos + r - th.cusum_k, 0.0)
        neg = jnp.maximum(decay * state.cusum_neg - r - th.cusum_k, 0.0)
        pos = jnp.where(warm, pos, jnp.where(idle, state.cusum_pos, 0.0))
        neg = jnp.where(warm, neg, jnp.where(idle, state.cusum_neg, 0.0))
        cusum = jnp.maximum(jnp.where(up_ok, pos, 0.0), jnp.where(down_ok, neg, 0.0))
        cusum_flag = warm & (cusum > th.cusum_h)

        invariant_flag = ~is_score & (x > 0) & ~idle
        flags = z_flag | cusum_flag | invariant_flag | ~finite
        accept = ~flags & ~idle
        slot_was_valid = state.valid[state.index]
        new_state = DetectState(
            history=state.history.at[state.index].set(jnp.where(accept, x, 0.0)),
            valid=state.valid.at[state.index].set(accept),
            index=(state.index + 1) % window,
            count=state.count - slot_was_valid.astype(jnp.int32) + accept.astype(jnp.int32),
            cusum_pos=jnp.where(flags, 0.0, pos),
            cusum_neg=jnp.where(flags, 0.0, neg),
            step=state.step + 1,
            alarms_total=state.alarms_total + jnp.any(flags).astype(jnp.int32),
        )
        output = DetectOutput(
            alarm=jnp.any(flags),
            flags=flags,
            scores=z,
            cusum=cusum,
            nonfinite=~jnp.all(finite),
        )
        return output, new_state

    return Detector(signals=sigs, init=init, update=update, thresholds=thresholds)


def replay(
    detector: Detector,
    series: Mapping[str, jax.Array],
    thresholds: Thresholds | None = None,
    state: DetectState | None = None,
) -> tuple[DetectOutput, DetectState]:
    """Runs the detector over recorded statistics {name: f32[T]} in one compiled scan.

    The same `update` as in a train step, so detectors can be scored or tuned offline on
    recorded runs (e.g. FaultBench step records). `series` holds every signal's statistic and,
    where recorded, the `Signal.idle_if` statistics. Returns outputs stacked over T and the
    final state.
    """
    missing = [s.name for s in detector.signals if s.name not in series]
    if missing:
        raise KeyError(f"series lacks detector signals {missing}; available: {sorted(series)}")
    names = [n for n in statistics_read(detector.signals) if n in series]
    xs = jnp.stack([jnp.asarray(series[n], jnp.float32) for n in names], axis=-1)

    def body(st, x):
        out, st = detector.update({n: x[i] for i, n in enumerate(names)}, st, thresholds)
        return st, out

    init = detector.init() if state is None else state
    final, outs = jax.lax.scan(body, init, xs)
    return outs, final


def _check_signals(signals: tuple[Signal, ...]) -> None:
    if not signals:
        raise ValueError("detector needs at least one signal, got none")
    seen = set()
    for s in signals:
        if not isinstance(s.name, str) or not s.name:
            raise ValueError(f"Signal name must be a non-empty str, got {s.name!r}")
        if s.name in seen:
            raise ValueError(f"Signal name {s.name!r} appears more than once")
        seen.add(s.name)
        if s.idle_if is not None and (not isinstance(s.idle_if, str) or not s.idle_if):
            raise ValueError(
                f"Signal {s.name!r}: idle_if must be a statistic's name or None, got {s.idle_if!r}"
            )
        if s.direction not in _DIRECTIONS:
            raise ValueError(
                f"Signal {s.name!r}: direction must be one of {_DIRECTIONS}, got {s.direction!r}"
            )
        if s.kind not in _KINDS:
            raise ValueError(f"Signal {s.name!r}: kind must be one of {_KINDS}, got {s.kind!r}")
        if not (s.floor >= 0 and math.isfinite(s.floor)):
            raise ValueError(f"Signal {s.name!r}: floor must be finite and >= 0, got {s.floor!r}")
        if s.z is not None and not s.z > 0:
            raise ValueError(f"Signal {s.name!r}: z must be > 0, got {s.z!r}")
        if s.cusum_h is not None and not s.cusum_h > 0:
            raise ValueError(f"Signal {s.name!r}: cusum_h must be > 0, got {s.cusum_h!r}")


def statistics_read(signals: Sequence[Signal]) -> tuple[str, ...]:
    """The statistics a detector over `signals` reads: each signal's, then the `idle_if`
    statistics that gate them (an absent gate is allowed: the signal is then always read)."""
    names = [s.name for s in signals]
    return tuple(dict.fromkeys([*names, *(s.idle_if for s in signals if s.idle_if)]))


def _idle(stats: Mapping[str, jax.Array], signals: tuple[Signal, ...]) -> jax.Array:
    """bool[S]: which signals are idle this step (`Signal.idle_if` present and equal to 1)."""
    one = jnp.ones((), jnp.float32)
    return jnp.stack(
        [
            jnp.asarray(stats[s.idle_if], jnp.float32).reshape(()) == one
            if s.idle_if is not None and s.idle_if in stats
            else jnp.zeros((), bool)
            for s in signals
        ]
    )


def _gather(stats: Mapping[str, jax.Array], signals: tuple[Signal, ...]) -> jax.Array:
    """Stacks the monitored scalars into f32[S]; errors (at trace time) name the bad signal."""
    values = []
    for s in signals:
        if s.name not in stats:
            raise KeyError(
                f"detector signal {s.name!r} is missing from stats; available: {sorted(stats)}"
            )
        value = jnp.asarray(stats[s.name])
        if value.size != 1:
            raise ValueError(f"stat {s.name!r} must be a scalar, got shape {value.shape}")
        values.append(value.reshape(()).astype(jnp.float32))
    return jnp.stack(values)


# How a `DetectOutput` is logged in a flat record (metrics.jsonl, FaultBench step records):
# "alarm", "nonfinite" and one key per signal and field with these prefixes. `flags_to_dict`
# writes it, `Reading.from_record` reads it. FaultBench's record schema, which stays free of
# jax, names the same prefixes (`fm.faultbench.schema.DETECTOR_PREFIXES`; a test keeps them equal).
FLAG, SCORE, CUSUM = "flag/", "score/", "cusum/"
PREFIXES = (FLAG, SCORE, CUSUM)


def flags_to_dict(detector: Detector, output: DetectOutput) -> dict[str, jax.Array]:
    """Flattens an output for logging.

    Returns:
      {"alarm": bool[], "nonfinite": bool[], "flag/<name>": bool[], "score/<name>": f32[],
       "cusum/<name>": f32[]} with score and cusum entries for "score" signals only.
    """
    out = {"alarm": output.alarm, "nonfinite": output.nonfinite}
    for i, s in enumerate(detector.signals):
        out[FLAG + s.name] = output.flags[i]
        if s.kind == "score":
            out[SCORE + s.name] = output.scores[i]
            out[CUSUM + s.name] = output.cusum[i]
    return out


def is_detector_key(key: str) -> bool:
    """Whether a record's key is a detector output, not a statistic."""
    return key in ("alarm", "nonfinite") or key.startswith(PREFIXES)


class Reading(NamedTuple):
    """One step's detector output on the host, as Python values (typed, by signal name).

    Attributes:
      alarm: any signal flagged.
      nonfinite: any monitored value was non-finite.
      flags: {signal: flagged} for every signal.
      scores: {signal: robust z} and cusum {signal: CUSUM side} for "score" signals.
    """

    alarm: bool
    nonfinite: bool
    flags: dict[str, bool]
    scores: dict[str, float]
    cusum: dict[str, float]

    @property
    def flagged(self) -> list[str]:
        """The flagged signals, in the detector's order."""
        return [name for name, on in self.flags.items() if on]

    @classmethod
    def from_record(cls, values: Mapping[str, float]) -> Reading:
        """Reads a flat record as `flags_to_dict` wrote it (after a host transfer)."""
        by = {p: {k[len(p) :]: v for k, v in values.items() if k.startswith(p)} for p in PREFIXES}
        return cls(
            alarm=float(values.get("alarm", 0.0)) > 0,
            nonfinite=float(values.get("nonfinite", 0.0)) > 0,
            flags={k: float(v) > 0 for k, v in by[FLAG].items()},
            scores={k: float(v) for k, v in by[SCORE].items()},
            cusum={k: float(v) for k, v in by[CUSUM].items()},
        )


# Signals that assume group-normalized advantages (GRPO, RLOO, Dr. GRPO): with GAE and a
# learned critic, sequence advantages need not track the group-relative reward.
GROUP_NORMALIZED_ONLY = (
    "adv_scale_ratio",
    "adv_group_mean_max_abs",
    "check_adv_sign",
    "check_adv_flip",
)
TOOLS_ONLY = ("tool_error_rate",)


def default_signals(*, group_normalized: bool = True, tools: bool = True) -> tuple[Signal, ...]:
    """Signals for an RL fine-tuning run, named after `fm.stats` keys, with alarm directions.

    `group_normalized=False` drops the advantage cross-checks that assume a group-normalized
    estimator (`GROUP_NORMALIZED_ONLY`); `tools=False` drops the tool signals (`TOOLS_ONLY`).

    "up" where only growth is a failure sign (clipping, repetition, divergence from the
    reference or the rollout policy, tool errors), "down" for the importance-sampling effective
    sample size, "both" where either way is suspicious (reward collapse or hacking, entropy
    collapse or blow-up, vanishing or exploding gradients).

    Scale floors are the smallest changes that matter, in each statistic's units: a few samples
    of a fraction, 1% of an importance ratio, 0.01 nats of log-prob mismatch (sampler and
    trainer agree to ~1e-6 when nothing is wrong, so without a floor rounding noise would
    score as an anomaly). Statistics that trend while training goes well (reward, KL to the
    reference, entropy, length) get a higher CUSUM threshold, so that learning itself is not a
    drift alarm. The figures behind these choices are in the project's build notes.
    """
    # name: (direction, floor, cusum_h or None for the config default, z or None likewise)
    score = {
        "reward_mean": ("both", 0.02, _TRENDING_H),
        "reward_std": ("both", 0.02, _NO_DRIFT),
        "reward_shadow_gap": ("up", 0.01, None),
        "frac_zero_std_groups": ("up", 0.05, _NO_DRIFT),
        "length_mean": ("both", 0.1, _TRENDING_H),
        "clip_ratio": ("up", 0.02, None),
        "repetition_ratio": ("up", 0.02, None),
        "entropy_mean": ("both", 0.01, _SLOW_H),
        "kl_ref_k1": ("up", 1e-3, _TRENDING_H),
        "mismatch_k3": ("up", 1e-4, None),
        "mismatch_max_abs": ("up", 0.01, None),
        "is_ratio_max": ("up", 0.01, None),
        "is_ess": ("down", 0.01, None),
        "grad_norm": ("both", 0.0, _SLOW_H, _HEAVY_Z),
        "update_param_ratio": ("both", 0.0, _SLOW_H),
        "adv_scale_ratio": ("both", 0.01, None),
        "adv_group_mean_max_abs": ("up", 0.05, None),
        "tool_error_rate": ("up", 0.02, None),
    }
    invariants = (
        "nonfinite_grads",
        "nonfinite_params",
        "nonfinite_rewards",
        "check_mask_length",
        "check_adv_sign",
        "check_adv_flip",
        "check_weights",
        "check_reference",
        "check_coefficients",
    )
    drop = set(() if group_normalized else GROUP_NORMALIZED_ONLY) | set(() if tools else TOOLS_ONLY)
    signals = tuple(
        Signal(name, direction, floor=floor, cusum_h=h, z=z, idle_if=idle)
        for name, (direction, floor, h, *zs) in score.items()
        for z in (zs[0] if zs else None,)
        for idle in ("frac_zero_std_groups" if name in _IDLE_WITHOUT_SIGNAL else None,)
    ) + tuple(Signal(name, "up", "invariant") for name in invariants)
    return tuple(s for s in signals if s.name not in drop)

"""fm.detect: synthetic series with known answers, hand-worked CUSUM, no recompilation."""

import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm import detect

W = 64  # default window


def scan(det, series, thresholds=None, state=None):
    """Runs `det.update` over series {name: f32[T]} in one lax.scan; outputs stacked over T."""
    names = list(series)
    xs = jnp.stack([jnp.asarray(series[n], jnp.float32) for n in names], axis=-1)

    def body(st, x):
        out, st = det.update({n: x[i] for i, n in enumerate(names)}, st, thresholds)
        return st, out

    state = det.init() if state is None else state
    final, outs = jax.jit(lambda s, v: jax.lax.scan(body, s, v))(state, xs)
    return jax.tree.map(np.asarray, outs), final


def ref_z(x, t, excluded=(), window=W):
    """Robust z of x[t] against the accepted points among the previous `window` steps."""
    past = np.array([x[i] for i in range(max(0, t - window), t) if i not in excluded])
    med = np.median(past)
    scale = max(1.4826 * np.median(np.abs(past - med)), 1e-6 * (abs(med) + 1))
    return (x[t] - med) / scale, med, scale


def gauss(seed, n):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def test_robust_stats_by_hand():
    history = jnp.array([[1.0, 1.0], [2.0, 2.0], [100.0, 100.0], [3.0, 3.0]])
    valid = jnp.array([[True, True], [True, True], [True, False], [True, True]])
    median, scale = detect.robust_stats(history, valid, min_scale=1e-6)
    # column 0: {1,2,3,100} → median 2.5, |dev| {1.5,.5,.5,97.5} → MAD 1; column 1: {1,2,3} → 2, 1
    np.testing.assert_allclose(median, [2.5, 2.0])
    np.testing.assert_allclose(scale, [1.4826, 1.4826])
    median, scale = detect.robust_stats(history, jnp.zeros_like(valid), min_scale=1e-3)
    np.testing.assert_allclose(median, [0.0, 0.0])
    np.testing.assert_allclose(scale, [1e-3, 1e-3])


@pytest.mark.parametrize("rows", [1, 2, 3, 17, W, 100])
def test_sort_columns_equals_jnp_sort_with_ties_infinities_nans_and_signed_zeros(rows):
    rng = np.random.default_rng(rows)
    x = (np.round(rng.normal(size=(rows, 7)) * 2) / 2).astype(np.float32)  # many ties
    for value, share in ((0.0, 0.2), (-0.0, 0.1), (np.inf, 0.1), (-np.inf, 0.1), (np.nan, 0.1)):
        x[rng.random(x.shape) < share] = value
    got = np.asarray(jax.jit(detect.sort_columns)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.sort(x, axis=0))  # NaN last, as numpy sorts
    assert not np.signbit(got[got == 0]).any()  # −0.0 comes back as 0.0


def test_cusum_trajectory_by_hand():
    det = detect.detector(["x"], detect.DetectConfig(window=4, warmup=4, cusum_h=100.0))
    # window {-1, 1, -1, 1}: median 0, MAD 1; z = 3 → S⁺ = 3 - 0.5, S⁻ = 0
    # then window {1, -1, 1, 4.45}: median 1, MAD 1; z = -2 → S⁺ = max(0, 2.5 - 2 - .5), S⁻ = 1.5
    x = [-1.0, 1.0, -1.0, 1.0, 3 * 1.4826, 1.0 - 2 * 1.4826]
    outs, state = scan(det, {"x": x})
    np.testing.assert_allclose(outs.scores[4:, 0], [3.0, -2.0], rtol=1e-5)
    np.testing.assert_allclose(outs.cusum[4:, 0], [2.5, 1.5], rtol=1e-5)
    np.testing.assert_allclose([state.cusum_pos[0], state.cusum_neg[0]], [0.0, 1.5], atol=1e-5)
    assert not outs.alarm.any()
    # h = 2 trips at the first of those steps, and the sums restart from zero
    outs, state = scan(det, {"x": x}, det.thresholds()._replace(cusum_h=jnp.float32(2.0)))
    np.testing.assert_array_equal(outs.flags[:, 0], [0, 0, 0, 0, 1, 0])
    assert float(state.cusum_pos[0]) == 0.0 and int(state.alarms_total) == 1


@pytest.mark.parametrize("memory", [8.0, math.inf])
def test_cusum_memory_bounds_what_a_constant_excess_sums_to(memory):
    # 40 zeros: median 0, MAD 0, so σ̂ = the floor 1. Then 15 points at 1.5: z = r = 1.5, an
    # excess e = r - k = 1 a step, and the median stays 0 (40 zeros against 15). With decay
    # λ = 1 - 1/M the sum after j such steps is e·(1 - λʲ)/(1 - λ) (M = ∞: j, Page's CUSUM).
    det = detect.detector(
        [detect.Signal("x", "up", floor=1.0)],
        detect.DetectConfig(cusum_h=100.0, cusum_memory=memory),
    )
    outs, _ = scan(det, {"x": np.r_[np.zeros(40), np.full(15, 1.5)]})
    lam, j = 1.0 - 1.0 / memory, np.arange(1, 16)
    expected = j if memory == math.inf else (1 - lam**j) / (1 - lam)
    np.testing.assert_allclose(outs.scores[40:, 0], 1.5, rtol=1e-6)
    np.testing.assert_allclose(outs.cusum[40:, 0], expected, rtol=1e-5)
    assert not outs.alarm.any()


def test_idle_signal_is_not_read_while_its_gate_is_one():
    # x is read on steps where g < 1. A huge x while g = 1 is neither scored, flagged nor kept,
    # and leaves the CUSUM sums as they were; a NaN still flags; g absent: always read.
    det = detect.detector([detect.Signal("x", idle_if="g")])
    x = gauss(5, 70)
    x[60], x[61], x[62] = 1e6, np.nan, 1e6
    g = np.zeros(70, np.float32)
    g[60:62] = 1.0
    outs, state = scan(det, {"x": x, "g": g})
    np.testing.assert_array_equal(np.flatnonzero(outs.alarm), [61, 62])  # the NaN; 1e6 read at 62
    assert outs.scores[60, 0] == 0.0 and outs.cusum[60, 0] == outs.cusum[59, 0]
    _, before = scan(det, {"x": x[:60], "g": g[:60]})
    _, after = scan(det, {"x": x[:61], "g": g[:61]})
    assert int(after.count[0]) == int(before.count[0]) and not after.valid[60 % W, 0]
    assert float(after.cusum_pos[0]) == float(before.cusum_pos[0])
    outs, _ = scan(det, {"x": x})  # no gate given: read on every step
    assert bool(outs.alarm[60])
    # the default signals gate the policy gradient's statistics on groups with a signal
    idle = {s.name: s.idle_if for s in detect.default_signals() if s.idle_if}
    assert idle == {"grad_norm": "frac_zero_std_groups", "adv_scale_ratio": "frac_zero_std_groups"}


@pytest.mark.parametrize("z", [None, 6.0])
def test_step_change_alarms_within_a_few_steps(z):
    x = gauss(0, 200)
    x[100:] += 8.0
    det = detect.detector(["x"])
    th = None if z is None else det.thresholds()._replace(z=jnp.float32(z))
    outs, _ = scan(det, {"x": x}, th)
    alarms = np.flatnonzero(outs.alarm)
    assert alarms.size and alarms[0] >= 100, "no alarm before the change"
    # defaults: an 8σ shift is winsorized to c = 4, so CUSUM gains 4 - 0.5 = 3.5 a step and
    # passes h = 20 on the 6th shifted step (6 × 3.5 = 21); z = 6 flags at once.
    assert alarms[0] <= (105 if z is None else 100)


def test_spike_is_flagged_and_kept_out_of_the_window():
    x = gauss(1, 120)
    x[80] = 20.0
    det = detect.detector(["x"])
    outs, _ = scan(det, {"x": x})
    assert np.flatnonzero(outs.alarm).tolist() == [80]
    assert outs.scores[80, 0] > 16.0

    _, state = scan(det, {"x": x[:81]})
    assert not state.valid[80 % W, 0], "the spike's slot stays invalid"
    kept = np.asarray(state.history)[np.asarray(state.valid)[:, 0], 0]
    np.testing.assert_array_equal(np.sort(kept), np.sort(x[17:80]))
    median, scale = detect.robust_stats(state.history, state.valid, min_scale=1e-6)
    _, ref_median, ref_scale = ref_z(x, 81, excluded={80})
    np.testing.assert_allclose([median[0], scale[0]], [ref_median, ref_scale], rtol=1e-5)
    # had the spike entered the window, the scale would have grown
    with_spike = np.append(x[17:80], 20.0)
    assert 1.4826 * np.median(np.abs(with_spike - np.median(with_spike))) > ref_scale
    for t in range(81, 120):
        np.testing.assert_allclose(outs.scores[t, 0], ref_z(x, t, {80})[0], rtol=1e-4, atol=1e-5)


def test_slow_drift_is_caught_by_cusum_not_by_z():
    t = np.arange(400)
    x = gauss(2, 400) + 0.05 * np.maximum(t - 100, 0)
    det = detect.detector(["x"])
    outs, _ = scan(det, {"x": x})
    first = int(np.flatnonzero(outs.alarm)[0])
    assert 100 < first < 200
    assert outs.cusum[first, 0] > detect.DetectConfig().cusum_h
    # |z| stayed below even the textbook 6σ from the drift's start until CUSUM fired
    assert np.abs(outs.scores[100 : first + 1, 0]).max() < 6.0


def test_nan_flags_that_step_and_leaves_the_history_clean():
    x, y = gauss(3, 200), gauss(4, 200)
    x[50] = np.nan
    det = detect.detector(["x", "y"])
    outs, _ = scan(det, {"x": x, "y": y})
    assert np.flatnonzero(outs.nonfinite).tolist() == [50]
    assert np.flatnonzero(outs.alarm).tolist() == [50]
    np.testing.assert_array_equal(outs.flags[50], [True, False])
    _, state = scan(det, {"x": x[:51], "y": y[:51]})
    assert np.isfinite(state.history).all()
    np.testing.assert_array_equal(state.valid[50], [False, True])
    for t in range(51, 200):  # later steps: the NaN's step is simply missing from the window
        np.testing.assert_allclose(outs.scores[t, 0], ref_z(x, t, {50})[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(outs.scores[t, 1], ref_z(y, t)[0], rtol=1e-4, atol=1e-5)


def test_heavy_tailed_noise_false_alarm_rate():
    steps, seeds = 2000, 20
    det = detect.detector(["x"])
    noise = np.random.default_rng(5).standard_t(3, size=(seeds, steps)).astype(np.float32)

    def alarms(xs):
        def body(st, x):
            out, st = det.update({"x": x}, st)
            return st, out.alarm

        return jax.lax.scan(body, det.init(), xs)[1]

    count = int(jax.jit(jax.vmap(alarms))(jnp.asarray(noise)).sum())
    rate = 1000 * count / (seeds * steps)
    # measured: 0.75 alarms / 1,000 steps (30 in 40,000) with the defaults z = 16, h = 20
    # (0.71 over 200,000 steps of other seeds); z = 6, h = 12 gives 8.6 / 1,000 on this noise
    assert rate <= 1.0, rate


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_direction_restricts_which_deviations_alarm(sign):
    x = gauss(6, 150)
    x[80:] += sign * 30.0  # a lasting jump: the other side's window simply moves to it
    det = detect.detector([detect.Signal("up", "up"), detect.Signal("down", "down"), "both"])
    outs, _ = scan(det, {"up": x, "down": x, "both": x})
    flagged = outs.flags.any(axis=0)
    assert flagged.tolist() == [sign > 0, sign < 0, True]
    assert outs.flags[80].tolist() == [sign > 0, sign < 0, True]


def test_warmup_holds_score_alarms_but_not_invariants():
    x = gauss(7, 40)
    x[10] = 1000.0
    inv = np.zeros(40, np.float32)
    inv[0] = 1.0
    det = detect.detector(["x", detect.Signal("check", kind="invariant")])
    outs, _ = scan(det, {"x": x, "check": inv})
    assert not outs.flags[:, 0].any(), "x is in warm-up (20 points) at step 10"
    assert outs.scores[10, 0] > 100 and (outs.scores[:2, 0] == 0).all()
    assert np.flatnonzero(outs.flags[:, 1]).tolist() == [0]
    # a runtime warm-up of 5 points lets the same spike alarm
    outs, _ = scan(det, {"x": x, "check": inv}, det.thresholds()._replace(warmup=jnp.int32(5)))
    assert np.flatnonzero(outs.flags[:, 0]).tolist() == [10]


def test_update_compiles_once_for_new_values_and_thresholds():
    det = detect.detector(detect.default_signals())
    traces = []

    @jax.jit
    def step(stats, state, th):
        traces.append(1)
        return det.update(stats, state, th)

    state, th = det.init(), det.thresholds()
    rng = np.random.default_rng(8)
    for i in range(5):
        stats = {s.name: jnp.float32(rng.standard_normal()) for s in det.signals}
        th = th._replace(z=jnp.float32(6.0 + i), warmup=jnp.int32(i), cusum_h=jnp.float32(9 + i))
        out, state = step(stats, state, th)
    jax.block_until_ready(out)
    assert len(traces) == 1 and int(state.step) == 5


def test_missing_stat_is_named():
    det = detect.detector(["reward_mean", "grad_norm"])
    with pytest.raises(KeyError, match="grad_norm") as err:
        jax.jit(det.update)({"reward_mean": jnp.float32(0.0)}, det.init())
    assert "reward_mean" in str(err.value)  # the available keys are listed


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"window": 1}, "window"),
        ({"warmup": 65}, "warmup"),
        ({"z_threshold": 0.0}, "z_threshold"),
        ({"cusum_k": -1.0}, "cusum_k"),
        ({"cusum_h": float("nan")}, "cusum_h"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"cusum_memory": 0.5}, "cusum_memory"),
    ],
)
def test_config_names_the_bad_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        detect.DetectConfig(**kwargs)


@pytest.mark.parametrize(
    ("signals", "bad"),
    [
        ([detect.Signal("x", "sideways")], "sideways"),
        ([detect.Signal("x", kind="vote")], "vote"),
        (["x", "x"], "more than once"),
        ([], "at least one"),
        ([detect.Signal("x", idle_if="")], "idle_if"),
    ],
)
def test_bad_signals_are_named(signals, bad):
    with pytest.raises(ValueError, match=bad):
        detect.detector(signals)


def test_default_signals_and_flags_to_dict():
    sigs = detect.default_signals()
    names = [s.name for s in sigs]
    assert len(set(names)) == len(names) == 27
    assert {s.name for s in sigs if s.kind == "invariant"} == {
        "nonfinite_grads",
        "nonfinite_params",
        "nonfinite_rewards",
        "check_mask_length",
        "check_adv_sign",
        "check_adv_flip",
        "check_weights",
        "check_reference",
        "check_coefficients",
    }
    # A critic's advantages need not track the group-relative reward; tool signals need tools.
    ppo = {s.name for s in detect.default_signals(group_normalized=False, tools=False)}
    assert set(names) - ppo == set(detect.GROUP_NORMALIZED_ONLY) | set(detect.TOOLS_ONLY)
    assert dict((s.name, s.direction) for s in sigs)["is_ess"] == "down"
    det = detect.detector(sigs)
    out, _ = det.update({n: jnp.float32(0.0) for n in names}, det.init())
    logged = detect.flags_to_dict(det, out)
    assert {
        "alarm",
        "nonfinite",
        "flag/grad_norm",
        "score/grad_norm",
        "flag/check_adv_sign",
    } <= set(logged)
    assert "score/check_adv_sign" not in logged


def test_import_leaves_trainer_and_faults_out():
    code = (
        "import sys, fm.detect; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('rftjax', 'faults', 'flax')]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_scale_floor_keeps_a_mostly_zero_signal_quiet():
    # A fraction of 128 samples that is 0 on most steps: MAD is 0, so without a floor the
    # first 1/128 after warm-up scores z ≈ 1/128 / 1e-6 and alarms; a floor of 0.05 (the
    # smallest change that matters) keeps occasional 1/128 and 2/128 values quiet, while a
    # real jump to 0.9 still alarms.
    rng = np.random.default_rng(0)
    x = np.where(rng.random(300) < 0.1, rng.integers(1, 3, 300) / 128, 0.0).astype(np.float32)
    x[280:] = 0.9
    bare = detect.detector(["clip"])
    floored = detect.detector([detect.Signal("clip", "up", floor=0.05)])
    bare_alarms = np.asarray(scan(bare, {"clip": x})[0].alarm)
    floored_alarms = np.asarray(scan(floored, {"clip": x})[0].alarm)
    assert bare_alarms[:280].any()
    assert not floored_alarms[:280].any() and floored_alarms[280]


def test_per_signal_cusum_threshold_and_floor_reach_the_thresholds():
    det = detect.detector([detect.Signal("a", floor=0.5, cusum_h=40.0), "b"])
    th = det.thresholds()
    np.testing.assert_allclose(th.floor, [0.5, 0.0])
    np.testing.assert_allclose(th.cusum_h, [40.0, detect.DetectConfig().cusum_h])
    with pytest.raises(ValueError, match="floor"):
        detect.detector([detect.Signal("a", floor=-1.0)])


def test_replay_equals_stepwise_updates():
    rng = np.random.default_rng(3)
    det = detect.detector([detect.Signal("a"), detect.Signal("b", "up", floor=0.1, idle_if="g")])
    series = {
        "a": rng.normal(size=80).astype(np.float32),
        "b": rng.standard_t(3, size=80).astype(np.float32),
        "g": (rng.uniform(size=80) < 0.3).astype(np.float32),  # the gate is replayed too
    }
    series["a"][60] = 50.0
    outs, final = detect.replay(det, series)
    state = det.init()
    update = jax.jit(det.update)
    for t in range(80):
        out, state = update({k: v[t] for k, v in series.items()}, state, None)
        assert bool(out.alarm) == bool(outs.alarm[t])
        np.testing.assert_allclose(out.scores, outs.scores[t], rtol=1e-6)
    np.testing.assert_array_equal(state.history, final.history)
    assert bool(outs.alarm[60])

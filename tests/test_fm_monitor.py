"""fm.monitor: the public in-step API — optional inputs, audits, the coefficient probe, typed
detector output, and fm's public surface."""

import inspect
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fm
from fm import detect
from fm import monitor as fmm

B, T, G = 8, 5, 4


def _full_inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    mask = jnp.asarray(rng.random((B, T)) > 0.2, jnp.float32)
    params = {"layer_0": {"w": f(3, 2)}, "head": {"b": f(2)}}
    return fmm.StepInputs(
        rewards=jnp.asarray(rng.integers(0, 2, B), jnp.float32),
        verifier_rewards=jnp.asarray(rng.integers(0, 2, B), jnp.float32),
        lengths=mask.sum(1).astype(jnp.int32),
        truncated=jnp.zeros((B,), bool),
        response=jnp.asarray(rng.integers(0, 9, (B, T)), jnp.int32),
        response_mask=mask,
        loss_mask=mask,
        advantages=f(B, T) * mask,
        sampler_logp=-jnp.abs(f(B, T)),
        old_logp=-jnp.abs(f(B, T)),
        logp=-jnp.abs(f(B, T)),
        ref_logp=-jnp.abs(f(B, T)),
        entropy=jnp.abs(f(B, T)),
        grads=jax.tree.map(lambda x: x * 0.1, params),
        updates=jax.tree.map(lambda x: x * 0.01, params),
        params=params,
        lr=jnp.float32(1e-3),
        tool_calls=jnp.ones((B,)),
        tool_errors=jnp.zeros((B,)),
        tool_turns=jnp.ones((B,)),
        tool_aborted=jnp.zeros((B,), bool),
        coefficients=({"kl_coef": 0.04, "ent_coef": 0.0}, {"kl_coef": 0.04, "ent_coef": 0.0}),
    )


def test_each_statistic_group_yields_the_keys_the_needs_table_declares():
    # The table behind `needs` (and so behind which signals a monitor can watch) must match
    # what the stage functions compute: every key they return is declared, with inputs that
    # are all present, and dropping any one declared input removes the key.
    inputs = _full_inputs()
    mon = fmm.monitor(group_size=G, max_len=T, audits=False)
    stats = mon.statistics(inputs)
    per_group = {k.split("/")[0] for k in stats}
    for key in per_group:
        needed = fmm.needs(key)
        assert needed, key
        without = mon.statistics(inputs._replace(**{needed[0]: None}))
        assert key not in without, (key, needed[0])
    with pytest.raises(KeyError, match="no statistic"):
        fmm.needs("not_a_statistic")


def test_missing_inputs_leave_their_statistics_and_signals_out_with_a_reason():
    mon = fmm.monitor(
        group_size=G, max_len=T, inputs=("rewards", "grads", "updates", "params", "lr")
    )
    names = [s.name for s in mon.detector.signals]
    assert "reward_mean" in names and "grad_norm" in names
    assert "entropy_mean" not in names and "check_weights" in names
    why = dict(mon.unavailable)
    assert "entropy" in why["entropy_mean"] and "loss_mask" in why["entropy_mean"]
    # Fields given beyond the declared inputs are ignored, not half-used.
    state = mon.init(params={"w": jnp.ones(3)}, opt_state=(), ref_params={"w": jnp.ones(3)})
    read = mon.read({"w": jnp.ones(3)}, (), {"w": jnp.ones(3)})
    own, out, _ = mon.update(_full_inputs(), state, read=read)
    assert "reward_mean" in own and "grad_norm" in own and "entropy_mean" not in own
    assert out.flags.shape == (len(names),)
    with pytest.raises(ValueError, match="unknown inputs"):
        fmm.monitor(group_size=G, max_len=T, inputs=("reward",))
    no_audit = fmm.monitor(group_size=G, max_len=T, audits=False)
    assert dict(no_audit.unavailable)["check_weights"] == "integrity audits are off"


def test_audits_catch_a_change_between_steps_and_a_seal_accepts_a_deliberate_one():
    mon = fmm.monitor(group_size=G, max_len=T, inputs=("rewards",))
    params, opt, ref = {"w": jnp.arange(4.0)}, {"m": jnp.zeros(4)}, {"w": jnp.arange(4.0)}
    update = jax.jit(mon.update)
    state = mon.init(params, opt, ref)
    inputs = fmm.StepInputs(rewards=jnp.ones(B))

    def step(state, params, opt, ref):
        return update(inputs, state, read=mon.read(params, opt, ref), sealed=(params, opt))

    own, _, state = step(state, params, opt, ref)
    assert float(own["check_weights"]) == 0 and float(own["check_reference"]) == 0
    flipped = {"w": params["w"].at[2].set(-0.0 if params["w"][2] == 0 else params["w"][2] * -1)}
    own, out, state = step(state, flipped, opt, ref)  # changed between steps: caught
    assert float(own["check_weights"]) == 1 and bool(out.alarm)
    own, _, state = step(state, flipped, opt, {"w": ref["w"].at[0].set(1e-30)})
    assert float(own["check_weights"]) == 0 and float(own["check_reference"]) == 1
    state = fmm.seal(state, params, {"m": jnp.ones(4)})  # a deliberate reset, sealed
    own, _, state = step(state, params, {"m": jnp.ones(4)}, ref)
    assert float(own["check_weights"]) == 0
    assert update._cache_size() == 1
    # A sharded monitor fingerprints leaf by leaf: the same fingerprints, its seal accepted.
    sharded = fmm.monitor(group_size=G, max_len=T, inputs=("rewards",), sharded=True)
    assert sharded.read(params, opt, ref) == mon.read(params, opt, ref)
    own, _, _ = update(inputs, sharded.seal(state, params, opt), read=mon.read(params, opt, ref))
    assert float(own["check_weights"]) == 0


def test_the_coefficient_probe_measures_what_the_loss_applies():
    # loss = pg - c_ent·(H + p_ent) + β·(KL + p_kl): d loss / d p = (β, -c_ent).
    def loss(probe, beta, c_ent):
        kl, ent = jnp.float32(0.3), jnp.float32(1.2)
        return 0.5 - c_ent * (ent + probe["ent_coef"]) + beta * (kl + probe["kl_coef"])

    g = jax.grad(loss)(fmm.coefficient_probe(), 0.04, 0.01)
    assert np.isclose(g["kl_coef"], 0.04) and np.isclose(-g["ent_coef"], 0.01)
    mon = fmm.monitor(group_size=G, max_len=T, inputs=("coefficients",), audits=False)
    state = mon.init()
    ok = (
        {"kl_coef": g["kl_coef"], "ent_coef": -g["ent_coef"]},
        {"kl_coef": 0.04, "ent_coef": 0.01},
    )
    assert float(mon.update(fmm.StepInputs(coefficients=ok), state)[0]["check_coefficients"]) == 0
    flipped = ({"kl_coef": -g["kl_coef"], "ent_coef": 0.01}, {"kl_coef": 0.04, "ent_coef": 0.01})
    own = mon.update(fmm.StepInputs(coefficients=flipped), state)[0]
    assert float(own["check_coefficients"]) == 1


def test_trainer_statistics_are_watched_and_fms_own_win_a_shared_key():
    sig = [detect.Signal("loss", "up"), detect.Signal("reward_mean", "both")]
    mon = fmm.monitor(group_size=G, max_len=T, inputs=("rewards",), signals=sig, audits=False)
    state = mon.init()
    rewards = jnp.asarray([1.0, 0, 1, 0, 1, 1, 0, 0])
    own, _, state = mon.update(
        fmm.StepInputs(rewards=rewards), state, stats={"loss": 2.0, "reward_mean": 99.0}
    )
    assert "loss" not in own and float(own["reward_mean"]) == 0.5
    # The detector saw fm's reward_mean (0.5), not the trainer's 99: its window holds 0.5.
    column = [s.name for s in mon.detector.signals].index("reward_mean")
    assert float(state.detect.history[0, column]) == 0.5


def test_reading_parses_what_flags_to_dict_writes():
    det = detect.detector([detect.Signal("a"), detect.Signal("b", kind="invariant")])
    out, _ = det.update({"a": 1.0, "b": 2.0}, det.init())
    record = {k: float(v) for k, v in detect.flags_to_dict(det, out).items()}
    record["a"] = 1.0  # a statistic beside the detector's keys
    reading = detect.Reading.from_record(record)
    assert reading.alarm and reading.flagged == ["b"]
    assert reading.flags == {"a": False, "b": True} and set(reading.scores) == {"a"}
    assert [k for k in record if detect.is_detector_key(k)] == [k for k in record if k != "a"]
    from fm.faultbench import schema  # FaultBench's jax-free schema names the same prefixes

    assert schema.DETECTOR_PREFIXES == detect.PREFIXES


def test_fm_exports_its_public_modules_and_documents_every_public_function():
    for name in ("stats", "detect", "diagnose", "remediate", "report", "monitor", "integrity"):
        assert name in fm.__all__ and inspect.ismodule(getattr(fm, name))
    undocumented = []
    for name in fm.__all__:
        module = getattr(fm, name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
                undocumented.append(f"{name}.{attr}")
    assert not undocumented, undocumented


def test_import_fm_pulls_in_no_trainer_and_no_torch():
    code = (
        "import sys, fm; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('rftjax', 'faults', 'launch', 'torch', 'matplotlib')]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)

"""Faults inside the compiled step: identical to a clean run before onset, visible after it in the
signals the taxonomy names, and one compilation whatever the onset, duration or magnitude."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import faults
from fm import taxonomy
from rftjax import models
from rftjax.config import RLConfig
from rftjax.knobs import make_knobs
from rftjax.tasks import make_task
from rftjax.train import monitor
from rftjax.train import step as step_lib
from rftjax.train import warmup as wu
from rftjax.train.setup import to_prompt_batch
from rftjax.train.step import init_state, make_learner

MODEL = models.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2
)
# Sorting with partial credit: after a short warm-up most groups hold different rewards.
TASK = make_task("sort", seed=0, eval_size=16)
CFG = RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=TASK.max_new_tokens_hint)
STEPS, ONSET = 8, 4
KNOBS = make_knobs(lr=3e-3)
# A signal "deviates" when its mean over the faulted steps moves by more than this fraction of
# the clean mean (plus a small absolute floor), in the direction the taxonomy gives.
REL_CHANGE, FLOOR = 0.2, 1e-3


# Tool faults need a tool task: two-digit products with the calculator, where a short warm-up
# leaves a policy that calls the tool and is right on part of its samples.
TOOL_TASK = make_task("calc", seed=0, eval_size=16, tool_demo_fraction=1.0)
TOOL_CFG = RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=TOOL_TASK.max_new_tokens_hint)
TOOL_TYPES = sorted(t for t in faults.SPECS if taxonomy.get(t).family == "tool-environment")


def _cfg(task):
    return TOOL_CFG if task.tools is not None else CFG


def _setup(task):
    tools = task.tool_spec()
    return faults.Setup(_cfg(task).group_size, _cfg(task).max_new_tokens, tools=tools), tools


def _warm(task, steps):
    """A policy that earns about half the reward (RL signals need rewards that vary)."""
    graphdef, params = models.create(MODEL, 0)
    optimizer = wu.sft_optimizer(3e-3)
    step = wu.make_sft_step(graphdef, optimizer, pad_id=task.tokenizer.pad_token_id)
    state = wu.SFTState(params, optimizer.init(params))
    for i in range(steps):
        b = task.demo_batch(10_000 + i, 64)
        state, _ = step(state, b.prompts, b.prompt_mask, b.targets, b.target_mask)
    return graphdef, state.params


@pytest.fixture(scope="module")
def task():
    return TASK


@pytest.fixture(scope="module")
def warm(task):
    return _warm(task, 40)


def _learner(task, graphdef, fault):
    tok = task.tokenizer
    setup, tools = _setup(task)
    return make_learner(
        graphdef,
        _cfg(task),
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        reward_fn=task.jnp_reward,
        monitor=monitor.make_monitor(_cfg(task), tools=tools is not None),
        fault=fault,
        tools=tools,
    )


_LEARNERS: dict = {}  # (task, type id) -> (fault, learner): one compile per type and task


def _shared(task, graphdef, type_id):
    """The fault of `type_id` and its learner, compiled once for every test of this module
    (onsets, variants, magnitudes and knobs are runtime values)."""
    key = (id(task), type_id)
    if key not in _LEARNERS:
        fault = faults.make(type_id, _setup(task)[0])
        _LEARNERS[key] = (fault, _learner(task, graphdef, fault))
    return _LEARNERS[key]


def _run(task, warm, fault=None, fparams=None, learner=None, knobs=KNOBS):
    """Metrics of each step and the policy after each step (host copies)."""
    graphdef, params = warm
    cfg = _cfg(task)
    learner = learner or _learner(task, graphdef, fault)
    detector = monitor.make_monitor(cfg, tools=task.tools is not None)
    state = init_state(params, cfg, 0, detector, fault)
    metrics, policies = [], []
    for i in range(STEPS):
        batch = to_prompt_batch(task.train_batch(i, cfg.prompts_per_step))
        state, m = learner.step(state, batch, knobs, fparams)
        metrics.append(jax.device_get(m))
        policies.append(jax.device_get(state.params["policy"]))
    return learner, state, metrics, policies


@pytest.fixture(scope="module")
def clean(task, warm):
    return _run(task, warm)


def _mean(metrics, key, steps):
    return float(np.mean([metrics[i][key] for i in steps]))


@pytest.fixture(scope="module")
def tool_warm():
    return _warm(TOOL_TASK, 140)


@pytest.fixture(scope="module")
def tool_clean(tool_warm):
    return _run(TOOL_TASK, tool_warm)


@pytest.mark.parametrize("type_id", sorted(set(faults.SPECS) - set(TOOL_TYPES)))
def test_fault_is_silent_before_onset_and_visible_after(task, warm, clean, type_id):
    _check_fault(task, warm, clean, type_id)


@pytest.mark.parametrize("type_id", TOOL_TYPES)
def test_tool_fault_is_silent_before_onset_and_visible_after(tool_warm, tool_clean, type_id):
    _, _, metrics, _ = tool_clean
    assert min(m["tool_calls_mean"] for m in metrics) > 0.5  # the policy does call the tool
    _check_fault(TOOL_TASK, tool_warm, tool_clean, type_id)


def _check_fault(task, warm, clean, type_id):
    fault, learner = _shared(task, warm[0], type_id)
    fparams = faults.params_for(type_id, onset=ONSET, severity="severe")
    learner, state, metrics, policies = _run(task, warm, fault, fparams, learner=learner)
    _, _, clean_metrics, clean_policies = clean

    # Before onset: bit for bit the clean run (every metric, and the weights).
    for i in range(ONSET - 1):
        assert metrics[i]["fault_active"] == 0.0
        for key, value in clean_metrics[i].items():
            np.testing.assert_array_equal(metrics[i][key], value, err_msg=f"step {i + 1} {key}")
        pairs = zip(jax.tree.leaves(policies[i]), jax.tree.leaves(clean_policies[i]), strict=True)
        for a, b in pairs:
            np.testing.assert_array_equal(a, b)
    assert all(metrics[i]["fault_active"] == 1.0 for i in range(ONSET - 1, STEPS))

    # After onset: at least one of the taxonomy's signals moves the stated way.
    after = range(ONSET - 1, STEPS)
    moved = {}
    for key, direction in taxonomy.get(type_id).signals:
        c, f = _mean(clean_metrics, key, after), _mean(metrics, key, after)
        change = f - c
        if not np.isfinite(f):
            moved[key] = change  # a non-finite signal is as visible as it gets
        elif abs(change) > REL_CHANGE * abs(c) + FLOOR:
            if direction == "~" or np.sign(change) == (1 if direction == "+" else -1):
                moved[key] = change
    assert moved, {k: _mean(metrics, k, after) for k, _ in taxonomy.get(type_id).signals}

    # Every other variant: silent before onset too (one compilation serves them all).
    for variant in range(1, len(faults.SPECS[type_id].variants)):
        name = faults.SPECS[type_id].variants[variant]
        vparams = faults.params_for(type_id, onset=ONSET, severity="severe", variant=name)
        _, _, vmetrics, _ = _run(task, warm, fault, vparams, learner=learner)
        for i in range(ONSET - 1):
            for key, value in clean_metrics[i].items():
                np.testing.assert_array_equal(vmetrics[i][key], value, err_msg=f"{name} {key}")
        assert vmetrics[ONSET - 1]["fault_active"] == 1.0

    # Other onsets, durations, magnitudes and variants reuse the compiled step.
    other = faults.make_params(
        onset=2, duration=3, magnitude=0.5, variant=len(faults.SPECS[type_id].variants) - 1
    )
    batch = to_prompt_batch(task.train_batch(0, _cfg(task).prompts_per_step))
    learner.step(state, batch, KNOBS, other)
    assert learner.step._cache_size() == 1


@pytest.mark.parametrize("type_id", ["OD3", "RF1"])
def test_split_rollout_and_learn_inject_like_the_fused_step(task, warm, type_id):
    # Host-side rewards (text tasks) use prepare -> rollout -> learn; the fault must act there
    # exactly as in the fused step, and each function compiles once.
    graphdef, params = warm
    fault = faults.make(type_id, faults.Setup(CFG.group_size, CFG.max_new_tokens))
    learner = _learner(task, graphdef, fault)
    fused = init_state(params, CFG, 0, monitor.make_monitor(CFG), fault)
    split = init_state(params, CFG, 0, monitor.make_monitor(CFG), fault)
    for i, onset in enumerate([1, 2, 1]):
        fparams = faults.params_for(type_id, onset=onset, severity="severe")
        raw = task.train_batch(i, CFG.prompts_per_step)
        batch = to_prompt_batch(raw)
        fused, m_fused = learner.step(fused, batch, KNOBS, fparams)
        split = learner.prepare(split, fparams)
        ro = learner.rollout(split, batch, KNOBS, fparams)
        answers = jnp.repeat(jnp.asarray(batch.answers), CFG.group_size, axis=0)
        split, m_split = learner.learn(
            split, ro, task.jnp_reward(ro.response, answers), KNOBS, fparams
        )
        for key in ("reward_mean", "grad_norm", "kl_ref", "fault_active"):
            np.testing.assert_allclose(m_split[key], m_fused[key], rtol=1e-5, err_msg=key)
    for name in ("prepare", "rollout", "learn"):
        assert getattr(learner, name)._cache_size() == 1, name


@pytest.mark.parametrize(
    "type_id,switch",
    [
        ("RF1", "verifier_failover"),
        ("RF2", "verifier_failover"),
        ("CA1", "advantage_audit"),
        ("CA2", "advantage_audit"),
        ("CA3", "restore_mask"),
        ("PG3", "restore_sampler"),
        ("OD4", "restore_coefficients"),
        ("PG1", "resync_sampler"),
        ("PG2", "resync_sampler"),
    ],
)
def test_a_remedy_switch_undoes_its_fault_in_the_compiled_step(task, warm, clean, type_id, switch):
    # With the fault severe from step 1 and its remedy's switch on, every update equals the
    # clean run's: the switch takes the value from before the faulty stage. Without the switch
    # the same run departs from the clean one (the comparison can fail).
    fault, learner = _shared(task, warm[0], type_id)
    fparams = faults.params_for(type_id, onset=1, severity="severe")
    _, _, _, broken = _run(task, warm, fault, fparams, learner=learner)
    knobs = make_knobs(lr=3e-3, **{switch: 1.0})
    _, _, _, fixed = _run(task, warm, fault, fparams, learner=learner, knobs=knobs)
    _, _, _, reference = clean
    leaves = lambda policies: jax.tree.leaves(policies[-1])
    pairs = zip(leaves(broken), leaves(reference), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)
    for a, b in zip(leaves(fixed), leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert learner.step._cache_size() == 1  # the switch is a runtime value


CHECKS = ("check_weights", "check_reference", "check_coefficients")


@pytest.mark.parametrize(
    "type_id,variant,check,steps",
    [
        ("OD3", "policy", "check_weights", "onset"),  # once: the next step reads what it sealed
        ("OD3", "optimizer", "check_weights", "onset"),
        ("OD3", "reference", "check_reference", "after"),
        ("OD4", "kl_sign", "check_coefficients", "after"),
        ("OD4", "entropy", "check_coefficients", "after"),
    ],
)
def test_integrity_and_coefficient_checks_name_the_corruption(
    task, warm, clean, type_id, variant, check, steps
):
    # Zero at every step of a clean run; the corrupted stage's check is non-zero exactly on the
    # steps that read corrupted state, and the other checks stay zero.
    _, _, clean_metrics, _ = clean
    assert all(m[c] == 0.0 for m in clean_metrics for c in CHECKS)
    fault, learner = _shared(task, warm[0], type_id)
    fparams = faults.params_for(type_id, onset=ONSET, severity="moderate", variant=variant)
    _, _, metrics, _ = _run(task, warm, fault, fparams, learner=learner)
    expect = [i + 1 == ONSET if steps == "onset" else i + 1 >= ONSET for i in range(STEPS)]
    assert [bool(m[check] > 0) for m in metrics] == expect
    assert all(m[c] == 0.0 for m in metrics for c in CHECKS if c != check)
    assert all(bool(m["alarm"]) for m, on in zip(metrics, expect, strict=True) if on)


def test_a_deliberate_change_between_steps_is_sealed(task, warm, clean):
    # Resetting the optimizer moments between steps changes the weights the next step reads:
    # unsealed that is a check_weights alarm, sealed (as the remediator's controller does) not.
    learner, state, _, _ = clean
    fresh = state._replace(opt_state=step_lib.make_optimizer(CFG).init(state.params))
    batch = to_prompt_batch(task.train_batch(STEPS, CFG.prompts_per_step))
    copy = lambda st: jax.tree.map(jnp.copy, st)
    _, unsealed = learner.step(copy(fresh), batch, KNOBS, None)
    _, sealed = learner.step(step_lib.seal_weights(copy(fresh)), batch, KNOBS, None)
    assert float(unsealed["check_weights"]) == 1.0
    assert float(sealed["check_weights"]) == 0.0
    assert learner.step._cache_size() == 1
    compiled = step_lib.seal_weights._cache_size()
    step_lib.seal_weights(copy(state))  # new values, same structure: no new program
    assert step_lib.seal_weights._cache_size() == compiled


def test_mask_unscorable_takes_infra_failed_completions_out_of_the_loss(tool_warm):
    # A rollout of the tool task in which the environment failed rows 1 and 4-7 (one of a
    # mixed group, and a whole group), with rewards 1, 0, 1, 0, ...: with the switch on,
    # those rows train with advantage 0, row 1 with the mean score of its group's others
    # ((1 + 1 + 0) / 3), and the mask audit still sees the pipeline's own mask.
    # Without the switch row 1 carries an advantage (the check can fail).
    _, tools = _setup(TOOL_TASK)
    tok, detector = TOOL_TASK.tokenizer, monitor.make_monitor(TOOL_CFG, tools=True)
    learner = make_learner(
        tool_warm[0], TOOL_CFG, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
        reward_fn=TOOL_TASK.jnp_reward, monitor=detector, tools=tools, trajectories=True,
    )  # fmt: skip
    batch = to_prompt_batch(TOOL_TASK.train_batch(0, TOOL_CFG.prompts_per_step))
    state = init_state(tool_warm[1], TOOL_CFG, 0, detector)
    ro = learner.rollout(state, batch, KNOBS)
    b, g = ro.lengths.shape[0], TOOL_CFG.group_size
    failed = np.zeros(b, bool)
    failed[[1, 4, 5, 6, 7]] = True
    ro = ro._replace(tool_failures=jnp.asarray(failed, jnp.int32))
    reward = jnp.asarray(np.arange(b) % 2 == 0, jnp.float32)
    rows = {}
    for switch in (0.0, 1.0):
        fresh = init_state(tool_warm[1], TOOL_CFG, 0, detector)
        knobs = make_knobs(lr=3e-3, mask_unscorable=switch)
        _, m = learner.learn(fresh, ro, {"reward": reward}, knobs)
        rows[switch] = jax.device_get(m["trajectories"])
        assert float(m["check_mask_length"]) == 0.0
    assert np.all(rows[1.0]["advantage"][failed] == 0.0)
    assert rows[0.0]["advantage"][1] != 0.0
    np.testing.assert_allclose(rows[1.0]["score"][1], (1 + 1 + 0) / 3, rtol=1e-6)
    np.testing.assert_array_equal(rows[1.0]["score"][~failed], reward[~failed])
    # Group 2 (rows 8-11) is untouched: the same advantages either way.
    group2 = slice(2 * g, 3 * g)
    np.testing.assert_array_equal(rows[1.0]["advantage"][group2], rows[0.0]["advantage"][group2])
    assert learner.learn._cache_size() == 1

"""The fault catalog, hook by hook: hand-worked values, gating, and which hooks each type uses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import faults
from faults.base import _keep
from fm import taxonomy
from rftjax import tools
from rftjax.knobs import make_knobs
from rftjax.sampling import Rollout, sampling_params
from rftjax.tokenizer import char_tokenizer
from rftjax.train.step import learning_rate

TOOLS = tools.ToolEnv({"calc": tools.calculate}, char_tokenizer(), max_obs=16).spec()
SETUP = faults.Setup(group_size=2, max_new_tokens=4, tools=TOOLS)
# The hooks each type must act on (all others are the identity).
ACTS_ON = {
    "RF1": {"rewards"},
    "RF2": {"rewards"},
    "RF3": {"rewards"},
    "PG1": {"logits", "rollout_logprobs"},
    "PG2": {"rollout_params"},
    "PG3": {"sampler"},
    "OD1": {"learning_rate"},
    "OD2": {"gradients"},
    "OD3": {"params", "ref_params", "opt_state"},
    "OD4": {"regularizers"},
    "CA1": {"advantages"},
    "CA2": {"advantages"},
    "CA3": {"loss_mask"},
    "CA4": {"rewards"},
    "TE1": {"tool_results"},
    "TE2": {"observations"},
}
# Taxonomy hook names (fm.taxonomy.HOOKS) as the trainer's hook points.
TAXONOMY_HOOK = {"params": {"params", "ref_params", "opt_state"}}


def ctx(step=5, *, onset=1, duration=-1, magnitude=1.0, variant=0, seed=0):
    p = faults.make_params(
        onset=onset, duration=duration, magnitude=magnitude, variant=variant, seed=seed
    )
    return faults.context(p, jnp.asarray(step - 1))


def rollout(lengths, truncated, n=4):
    lengths = jnp.asarray(lengths, jnp.int32)
    mask = (jnp.arange(n)[None, :] < lengths[:, None]).astype(jnp.float32)
    b = lengths.shape[0]
    zeros = jnp.zeros((b, n), jnp.int32)
    return Rollout(
        tokens=zeros,
        valid=mask > 0,
        response=zeros,
        response_mask=mask,
        logp=-mask,
        lengths=lengths,
        truncated=jnp.asarray(truncated),
    )


def test_every_taxonomy_type_has_an_injection_or_a_stated_blocker():
    assert set(faults.SPECS) | set(faults.BLOCKED) == set(taxonomy.BY_ID)
    assert not set(faults.SPECS) & set(faults.BLOCKED)


@pytest.mark.parametrize("type_id", sorted(ACTS_ON))
def test_each_type_acts_only_on_its_own_hooks(type_id):
    fault = faults.make(type_id, SETUP)
    assert set(fault.acts_on) == ACTS_ON[type_id]
    for name in faults.HOOK_NAMES:
        if name not in ACTS_ON[type_id]:
            assert getattr(fault.hooks, name) is _keep, name
    hook = taxonomy.get(type_id).hook
    assert TAXONOMY_HOOK.get(hook, {hook}) & set(fault.acts_on)
    spec = faults.SPECS[type_id]
    assert len(spec.variants) == len(spec.units) == len(spec.presets)


def test_activity_window_follows_onset_and_duration():
    active = [bool(ctx(s, onset=3, duration=2).active) for s in range(1, 7)]
    assert active == [False, False, True, True, False, False]
    forever = [bool(ctx(s, onset=3, duration=-1).active) for s in range(1, 7)]
    assert forever == [False, False, True, True, True, True]
    assert [bool(ctx(s, onset=3).first) for s in range(1, 6)] == [0, 0, 1, 0, 0]
    # Onset 0 means from the start: one-time events happen in the first step.
    assert [bool(ctx(s, onset=0).first) for s in range(1, 4)] == [1, 0, 0]
    assert all(bool(ctx(s, onset=0).active) for s in range(1, 4))


def test_presets_and_variants_resolve_and_bad_names_are_refused():
    assert faults.magnitude_of("PG3", "severe", "cold") == 0.05
    p = faults.params_for("OD1", onset=7, severity="subtle", variant="stall")
    assert int(p.variant) == 1 and float(p.magnitude) == pytest.approx(0.3)
    assert int(p.onset) == 7 and int(p.duration) == -1
    with pytest.raises(ValueError, match="unknown fault type 'ZZ1'"):
        faults.spec("ZZ1")
    with pytest.raises(ValueError, match="accepted: spike, stall"):
        faults.variant_index("OD1", "surge")
    with pytest.raises(ValueError, match="severity 'extreme'"):
        faults.magnitude_of("OD1", "extreme")
    with pytest.raises(ValueError, match="onset"):
        faults.make_params(onset=-2, magnitude=1.0)


SCORES = jnp.array([1.0, 0.0, 0.5, 1.0])


def _rewards(type_id, c, scores=SCORES, ro=None, reward_dict=None):
    ro = ro if ro is not None else rollout([2, 1, 4, 3], [False, False, True, False])
    return faults.make(type_id, SETUP).hooks.rewards(scores, reward_dict or {}, ro, c)


def test_inactive_faults_return_their_input_bit_for_bit():
    c = ctx(2, onset=3, magnitude=1.0)
    for type_id in ("RF1", "RF2", "RF3", "CA4"):
        np.testing.assert_array_equal(_rewards(type_id, c), SCORES)


def test_rf1_flips_or_replaces_a_fraction_of_rewards():
    np.testing.assert_array_equal(_rewards("RF1", ctx(magnitude=1.0)), 1.0 - SCORES)
    np.testing.assert_array_equal(_rewards("RF1", ctx(magnitude=0.0)), SCORES)
    noisy = _rewards("RF1", ctx(magnitude=1.0, variant=1))
    assert np.all((noisy >= 0) & (noisy <= 1)) and not np.array_equal(noisy, SCORES)
    many = jnp.zeros(4000)
    frac = float(_rewards("RF1", ctx(magnitude=0.3), scores=many).mean())
    assert frac == pytest.approx(0.3, abs=0.03)


def test_rf2_pays_a_bonus_for_the_shortcut():
    ro = rollout([2, 1, 4, 1], [False, False, True, True])
    length = _rewards("RF2", ctx(magnitude=0.5), ro=ro)
    np.testing.assert_allclose(length, SCORES + 0.5 * np.array([2, 1, 4, 1]) / 4)
    empty = _rewards("RF2", ctx(magnitude=0.5, variant=1), ro=ro)
    np.testing.assert_allclose(empty, SCORES + 0.5 * np.array([0, 1, 0, 0]))
    fmt = {"format": jnp.array([1.0, 0.0, 1.0, 0.0])}
    formatted = _rewards("RF2", ctx(magnitude=0.5, variant=2), ro=ro, reward_dict=fmt)
    np.testing.assert_allclose(formatted, SCORES + 0.5 * fmt["format"])


def test_rf3_loses_rewards_per_sample_or_per_step():
    np.testing.assert_array_equal(_rewards("RF3", ctx(magnitude=1.0)), np.zeros(4))
    np.testing.assert_array_equal(_rewards("RF3", ctx(magnitude=1.0, variant=1)), np.zeros(4))
    outage = [float(_rewards("RF3", ctx(s, magnitude=0.5, variant=1)).sum()) for s in range(200)]
    assert set(outage) == {0.0, float(SCORES.sum())}  # all or nothing per step


def test_acted_marks_exactly_the_steps_a_drawn_fault_changed():
    od2 = faults.make("OD2", SETUP).hooks.gradients
    changed = {"OD2": [], "RF3": []}
    acted = {"OD2": [], "RF3": []}
    for step in range(1, 80):
        c = ctx(step, onset=20, duration=40, magnitude=0.2, variant=0)
        nan = not all(np.isfinite(x).all() for x in jax.tree.leaves(od2(GRADS, c)))
        changed["OD2"].append(nan)
        acted["OD2"].append(bool(faults.acted("OD2", c)))
        c = ctx(step, onset=20, duration=40, magnitude=0.2, variant=1)
        changed["RF3"].append(not np.array_equal(_rewards("RF3", c), SCORES))
        acted["RF3"].append(bool(faults.acted("RF3", c)))
    for type_id in ("OD2", "RF3"):
        assert acted[type_id] == changed[type_id], type_id
        assert 0 < sum(acted[type_id]) < 40  # drawn on some of the 40 active steps
        assert not any(acted[type_id][:19]) and not any(acted[type_id][59:])
    # Variants without a draw act on every active step, as do all other types.
    for type_id, variant in (("OD2", 1), ("RF3", 0), ("CA1", 0)):
        flags = [bool(faults.acted(type_id, ctx(s, onset=20, duration=40, variant=variant)))
                 for s in range(1, 80)]  # fmt: skip
        assert flags == [20 <= s < 60 for s in range(1, 80)], type_id


def test_ca4_gives_each_cached_group_its_first_reward():
    np.testing.assert_array_equal(_rewards("CA4", ctx(magnitude=1.0)), [1.0, 1.0, 0.5, 0.5])


def test_pg1_perturbs_sampler_logits_or_reported_logprobs_only():
    hooks = faults.make("PG1", SETUP).hooks
    logits = jnp.zeros((3, 8))
    logp, mask = -jnp.ones((3, 4)), jnp.array([[1, 1, 0, 0]] * 3, jnp.float32)
    c0, c1 = ctx(magnitude=0.5, variant=0), ctx(magnitude=0.5, variant=1)
    noisy = hooks.logits(logits, 2, c0)
    assert float(jnp.std(noisy)) == pytest.approx(0.5, rel=0.5)
    np.testing.assert_array_equal(hooks.rollout_logprobs(logp, mask, c0), logp)
    np.testing.assert_array_equal(hooks.logits(logits, 2, c1), logits)
    reported = hooks.rollout_logprobs(logp, mask, c1)
    np.testing.assert_array_equal(reported[:, 2:], logp[:, 2:])  # padding untouched
    assert np.all(reported[:, :2] != logp[:, :2])


def test_pg2_syncs_the_sampler_weights_every_k_steps():
    fault = faults.make("PG2", SETUP)
    stale = fault.state_init({"w": jnp.zeros(())})
    used = []
    # Lag 3 from step 4: the sampler's copy is refreshed after steps 1-3 (inactive) and after
    # steps divisible by 3 (6, 9).
    for step in range(1, 11):
        c = ctx(step, onset=4, magnitude=3.0)
        policy = {"w": jnp.asarray(float(step - 1))}  # weights after step - 1 updates
        used.append(int(fault.hooks.rollout_params(policy, stale, c)["w"]))
        stale = fault.state_update(stale, {"w": jnp.asarray(float(step))}, c)
    assert used == [0, 1, 2, 3, 3, 3, 6, 6, 6, 9]


def test_pg3_changes_the_samplers_settings_only():
    hooks = faults.make("PG3", SETUP).hooks
    s = sampling_params(temperature=0.8, top_p=0.9, top_k=5)
    hot = hooks.sampler(s, ctx(magnitude=2.0, variant=0))
    assert float(hot.temperature) == pytest.approx(1.6) and float(hot.top_p) == pytest.approx(0.9)
    assert int(hot.max_tokens) == 0 and int(hot.top_k) == 5
    cut = hooks.sampler(s, ctx(magnitude=0.5, variant=2))
    assert int(cut.max_tokens) == 2 and float(cut.temperature) == pytest.approx(0.8)
    assert int(hooks.sampler(s, ctx(magnitude=0.99, variant=2)).max_tokens) == 1  # at least 1


def test_od1_scales_the_schedule_before_the_cap():
    hook = faults.make("OD1", SETUP).hooks.learning_rate
    knobs = make_knobs(lr=1e-3, lr_cap=5e-3)
    spiked = learning_rate(knobs, jnp.asarray(0), 0, lambda lr: hook(lr, ctx(magnitude=3.0)))
    capped = learning_rate(knobs, jnp.asarray(0), 0, lambda lr: hook(lr, ctx(magnitude=100.0)))
    assert float(spiked) == pytest.approx(3e-3) and float(capped) == pytest.approx(5e-3)


GRADS = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4)}


def test_od2_adds_noise_of_the_stated_norm_or_poisons_gradients():
    hook = faults.make("OD2", SETUP).hooks.gradients
    exploded = hook(GRADS, ctx(magnitude=5.0, variant=1))
    diff = jax.tree.map(lambda x, y: x - y, exploded, GRADS)
    assert float(optax.tree.norm(diff)) == pytest.approx(5.0 * float(optax.tree.norm(GRADS)))
    poisoned = hook(GRADS, ctx(magnitude=1.0, variant=0))
    for g, p in zip(jax.tree.leaves(GRADS), jax.tree.leaves(poisoned), strict=True):
        assert np.isnan(np.asarray(p).reshape(-1)[0])
        np.testing.assert_array_equal(np.asarray(p).reshape(-1)[1:], np.asarray(g).reshape(-1)[1:])
    spared = hook(GRADS, ctx(magnitude=0.0, variant=0))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(spared))


def test_od2_nonfinite_injection_leaves_gradients_of_inactive_steps_finite():
    # The NaN branch is computed but unselected before onset: the gradients must be untouched.
    # (The hook acts after value_and_grad, so no NaN can reach a backward pass; the compiled
    # step's bit-identity before onset is checked in test_fault_injection.py.)
    hook = faults.make("OD2", SETUP).hooks.gradients
    before = hook(GRADS, ctx(2, onset=5, magnitude=1.0, variant=0))
    for g, p in zip(jax.tree.leaves(GRADS), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(g, p)


def test_od3_corrupts_weights_once_and_adam_moments_once():
    hooks = faults.make("OD3", SETUP).hooks
    params = {"policy": {"w": jnp.full((64, 64), 2.0)}, "value_head": {"b": jnp.zeros(())}}
    hit = hooks.params(params, ctx(3, onset=3, magnitude=0.1))
    rel = float(jnp.std(hit["policy"]["w"] - 2.0) / 2.0)
    assert rel == pytest.approx(0.1, rel=0.1) and float(hit["value_head"]["b"]) == 0.0
    later = hooks.params(params, ctx(4, onset=3, magnitude=0.1))
    np.testing.assert_array_equal(later["policy"]["w"], params["policy"]["w"])
    ref = {"w": jnp.full((8,), 1.0)}
    bad_ref = hooks.ref_params(ref, ctx(4, onset=3, magnitude=0.1, variant=1))
    again = hooks.ref_params(ref, ctx(9, onset=3, magnitude=0.1, variant=1))
    np.testing.assert_array_equal(again["w"], bad_ref["w"])
    assert not np.array_equal(bad_ref["w"], ref["w"])  # the same bad copy every step
    adam = optax.scale_by_adam().init({"w": jnp.zeros(3)})
    adam = adam._replace(nu={"w": jnp.full(3, 4.0)})
    shrunk = hooks.opt_state(adam, ctx(3, onset=3, magnitude=1e-2, variant=2))
    np.testing.assert_allclose(shrunk.nu["w"], 0.04)
    untouched = hooks.opt_state(adam, ctx(4, onset=3, magnitude=1e-2, variant=2))
    np.testing.assert_array_equal(untouched.nu["w"], adam.nu["w"])


def test_od4_changes_only_regularizer_knobs():
    hook = faults.make("OD4", SETUP).hooks.regularizers
    knobs = make_knobs(kl_coef=0.04, ent_coef=0.0, eps_low=0.2, eps_high=0.28)
    flipped = hook(knobs, ctx(magnitude=2.0, variant=0))
    entropy = hook(knobs, ctx(magnitude=0.1, variant=1))
    opened = hook(knobs, ctx(magnitude=10.0, variant=2))
    assert float(flipped.kl_coef) == pytest.approx(-0.08)
    assert float(entropy.ent_coef) == pytest.approx(0.1)
    assert float(opened.eps_low) == float(opened.eps_high) == 10.0
    regularizers = {"kl_coef", "ent_coef", "eps_low", "eps_high"}
    for changed in (flipped, entropy, opened):
        for name in knobs._fields:
            if name not in regularizers:
                assert float(getattr(changed, name)) == float(getattr(knobs, name)), name


ADV = jnp.array([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]])
MASK = (ADV != 0).astype(jnp.float32)


def test_ca1_negates_advantages_of_whole_groups():
    hook = faults.make("CA1", SETUP).hooks.advantages
    np.testing.assert_array_equal(hook(ADV, SCORES, MASK, ctx(magnitude=1.0)), -ADV)
    some = faults.make("CA1", faults.Setup(group_size=4, max_new_tokens=3)).hooks.advantages
    big = jnp.ones((4000, 1))
    out = np.asarray(some(big, jnp.zeros(4000), big, ctx(magnitude=0.5)))[:, 0]
    groups = out.reshape(-1, 4)
    assert np.all(groups == groups[:, :1])  # a group is flipped as a whole
    assert (out < 0).mean() == pytest.approx(0.5, abs=0.05)


def test_ca2_uses_the_next_groups_baseline_or_rescales():
    # Groups (1, 0) and (0.5, 1) have mean rewards 0.5 and 0.75. With the next group's mean as
    # baseline, group 0's advantages shift by 0.5 - 0.75 = -0.25 and group 1's (whose next
    # group is group 0) by 0.75 - 0.5 = +0.25; masked slots stay 0.
    hook = faults.make("CA2", SETUP).hooks.advantages
    own = jnp.array([1.0, -1.0, -1.0, 1.0])
    adv = own[:, None] * jnp.array([[1.0, 0.0]])
    mask = jnp.array([[1.0, 0.0]] * 4)
    wrong = hook(adv, SCORES, mask, ctx(magnitude=1.0, variant=1))
    np.testing.assert_allclose(wrong[:, 0], [0.75, -1.25, -0.75, 1.25], atol=1e-6)
    np.testing.assert_array_equal(wrong[:, 1], 0.0)
    np.testing.assert_allclose(wrong[:, 0].reshape(2, 2).mean(1), [-0.25, 0.25], atol=1e-6)
    scaled = hook(adv, SCORES, jnp.ones((4, 2)), ctx(magnitude=0.01, variant=0))
    np.testing.assert_allclose(scaled, adv * 0.01)


def test_ca3_drops_eos_from_the_loss_or_counts_padding():
    hook = faults.make("CA3", SETUP).hooks.loss_mask
    ro = rollout([2, 4, 1, 3], [False, True, False, False])
    shifted = hook(ro.response_mask, ro, ctx(magnitude=1.0, variant=0))
    late = np.array([[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1]])
    np.testing.assert_array_equal(shifted, late)
    dropped = hook(ro.response_mask, ro, ctx(magnitude=1.0, variant=1))
    expected = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(dropped, expected)  # a truncated row has no EOS to drop
    padded = hook(ro.response_mask, ro, ctx(magnitude=1.0, variant=2))
    np.testing.assert_array_equal(padded, np.ones((4, 4)))


def _served():
    """A round-trip in which rows 0-2 were served "<result>2146</result>"; row 3 was not."""
    obs = np.zeros((4, 16), np.int32)
    obs[:, :6] = [6, 10, 9, 12, 14, 7]
    result = tools.ToolResult(
        jnp.asarray(obs), jnp.full((4,), 6), jnp.zeros((4,), jnp.int32), jnp.zeros((4,), bool)
    )
    return result, jnp.array([True, True, True, False])


def test_te_faults_need_a_task_with_tools():
    with pytest.raises(ValueError, match="TE1 acts on tool calls"):
        faults.make("TE1", faults.Setup(group_size=2, max_new_tokens=4))


def test_te1_fails_served_calls_loudly_or_silently():
    hook = faults.make("TE1", SETUP).hooks.tool_results
    result, rows = _served()
    err = hook(result, rows, 3, ctx(magnitude=1.0, variant=0))
    np.testing.assert_array_equal(err.status, [tools.TOOL_ERROR] * 3 + [0])
    for r in range(3):
        n = int(err.length[r])
        assert char_tokenizer().decode(err.tokens[r, :n]) == "<result>error: tool</result>"
    np.testing.assert_array_equal(err.tokens[3], result.tokens[3])  # not served: untouched
    empty = hook(result, rows, 3, ctx(magnitude=1.0, variant=1))
    np.testing.assert_array_equal(empty.status, 0)  # silent: no error reported
    np.testing.assert_array_equal(empty.length, [2, 2, 2, 6])
    np.testing.assert_array_equal(empty.tokens[:3, :2], [[6, 7]] * 3)
    # Inactive: bit for bit; a fraction of calls otherwise (per call, not per step).
    same = hook(result, rows, 3, ctx(step=5, onset=6, magnitude=1.0))
    for a, b in zip(same, result, strict=True):
        np.testing.assert_array_equal(a, b)
    many = jnp.ones((4000,), bool)
    big = jax.tree.map(lambda x: jnp.repeat(x[:1], 4000, axis=0), result)
    some = hook(big, many, 7, ctx(magnitude=0.3))
    assert float((some.status != 0).mean()) == pytest.approx(0.3, abs=0.03)


def test_te2_corrupts_observation_content_or_times_out_and_aborts():
    hook = faults.make("TE2", SETUP).hooks.observations
    result, rows = _served()
    bad = hook(result, rows, 3, ctx(magnitude=1.0, variant=0))
    # Markers and lengths stay, status stays OK; the content is redrawn from served content.
    np.testing.assert_array_equal(bad.tokens[:3, [0, 5]], [[6, 7]] * 3)
    np.testing.assert_array_equal(bad.length, result.length)
    np.testing.assert_array_equal(bad.status, 0)
    assert set(np.asarray(bad.tokens[:3, 1:5]).ravel()) <= {10, 9, 12, 14}
    assert not np.array_equal(bad.tokens[:3], result.tokens[:3])
    np.testing.assert_array_equal(bad.tokens[3], result.tokens[3])
    out = hook(result, rows, 3, ctx(magnitude=1.0, variant=1))
    np.testing.assert_array_equal(out.status, [tools.TIMEOUT] * 3 + [0])
    np.testing.assert_array_equal(out.abort, [True, True, True, False])
    text = char_tokenizer().decode(out.tokens[0, : int(out.length[0])])
    assert text == "<result>error: timeout</result>"

"""Tests for rftjax.algorithms: advantages and losses, against hand-worked values."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax.algorithms import (
    AGG_MODES,
    KL_KINDS,
    aggregate,
    entropy_from_logits,
    gae,
    group_advantages,
    group_stats,
    impute_group_mean,
    kl_penalty,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)

ATOL = 1e-5


def f32(x):
    return jnp.asarray(x, dtype=jnp.float32)


# ---------------------------------------------------------------------------------------------
# group advantages
# ---------------------------------------------------------------------------------------------


def test_group_advantages_grpo_two_groups():
    # Group 1: [1, 0, 0, 1], mean 0.5, population std 0.5 -> (r - 0.5) / 0.5 = [1, -1, -1, 1].
    # Group 2: [1, 1, 1, 1], mean 1, std 0 -> all 0 (0 / (0 + eps)).
    rewards = f32([1, 0, 0, 1, 1, 1, 1, 1])
    adv = group_advantages(rewards, group_size=4)
    np.testing.assert_allclose(adv, [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-5)


def test_group_advantages_dr_grpo():
    # No std division: r - mean -> group 1 [0.5, -0.5, -0.5, 0.5], group 2 all 0.
    rewards = f32([1, 0, 0, 1, 1, 1, 1, 1])
    adv = group_advantages(rewards, group_size=4, normalize_std=False)
    np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], atol=1e-7)


def test_group_advantages_population_std():
    # [0, 1, 2]: mean 1, population std sqrt(2/3) = 0.8165 -> [-1.2247, 0, 1.2247].
    # (The sample std, ddof=1, would be 1 and give [-1, 0, 1].)
    adv = group_advantages(f32([0, 1, 2]), group_size=3, eps=0.0)
    s = math.sqrt(1.5)
    np.testing.assert_allclose(adv, [-s, 0, s], atol=1e-6)


def test_group_advantages_bad_group_size():
    with pytest.raises(ValueError):
        group_advantages(f32([1, 0, 1]), group_size=2)


def test_group_stats():
    stats = group_stats(f32([1, 0, 0, 1, 1, 1, 1, 1]), group_size=4)
    np.testing.assert_allclose(stats["mean"], [0.5, 1.0])
    np.testing.assert_allclose(stats["std"], [0.5, 0.0])
    np.testing.assert_allclose(stats["frac_zero_std"], 0.5)


def test_impute_group_mean_gives_dropped_rows_the_kept_rows_mean():
    rewards = f32([1, 0, 0, 1, 1, 1, 0, 0])
    keep = jnp.array([True, False, True, True, False, False, False, False])
    out = impute_group_mean(rewards, keep, group_size=4)
    # Group 1: kept rows 1, 0, 1 -> the dropped row gets 2/3; group 2 keeps nothing: as it was.
    np.testing.assert_allclose(out, [1, 2 / 3, 0, 1, 1, 1, 0, 0], rtol=1e-6)
    # The kept rows' group-relative advantages are as if the dropped row did not exist, and
    # the dropped row's own is 0 (Dr. GRPO: no std).
    adv = group_advantages(out, group_size=4, normalize_std=False)
    np.testing.assert_allclose(adv[:4], [1 / 3, 0, -2 / 3, 1 / 3], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# GAE, whitening, token rewards
# ---------------------------------------------------------------------------------------------


def gae_reference(rewards, values, mask, gamma, lam):
    """Plain NumPy loop: each row's episode is its first sum(mask) tokens, then terminal."""
    rewards, values, mask = (np.asarray(a, np.float64) for a in (rewards, values, mask))
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_gamma1_lam1_is_return_minus_value():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7]; with gamma = lam = 1 the return from every
    # position is 1, so A = 1 - V = [0.5, 0.4, 0.3] and returns = [1, 1, 1].
    adv, ret = gae(f32([[0, 0, 1]]), f32([[0.5, 0.6, 0.7]]), f32([[1, 1, 1]]), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, [[0.5, 0.4, 0.3]], atol=ATOL)
    np.testing.assert_allclose(ret, [[1, 1, 1]], atol=ATOL)


def test_gae_hand_worked_discounted():
    # gamma = 0.9, lam = 0.5, so gamma * lam = 0.45.
    # delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3       A_2 = 0.3
    # delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03      A_1 = 0.03 + 0.45 * 0.3   = 0.165
    # delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04      A_0 = 0.04 + 0.45 * 0.165 = 0.11425
    # returns = A + V = [0.61425, 0.765, 1.0]
    adv, ret = gae(f32([[0, 0, 1]]), f32([[0.5, 0.6, 0.7]]), f32([[1, 1, 1]]), gamma=0.9, lam=0.5)
    np.testing.assert_allclose(adv, [[0.11425, 0.165, 0.3]], atol=ATOL)
    np.testing.assert_allclose(ret, [[0.61425, 0.765, 1.0]], atol=ATOL)


def test_gae_trailing_padding_is_terminal():
    # Row 0 is the example above plus a padded 4th position holding garbage reward 5 and value
    # 9: the episode ends at token 2, so the result must be unchanged and 0 at the padding.
    # Row 1 has no valid token at all: everything is 0.
    rewards = f32([[0, 0, 1, 5], [1, 2, 3, 4]])
    values = f32([[0.5, 0.6, 0.7, 9], [1, 1, 1, 1]])
    mask = f32([[1, 1, 1, 0], [0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    np.testing.assert_allclose(adv, [[0.11425, 0.165, 0.3, 0], [0, 0, 0, 0]], atol=ATOL)
    np.testing.assert_allclose(ret, [[0.61425, 0.765, 1.0, 0], [0, 0, 0, 0]], atol=ATOL)


def test_gae_matches_numpy_reference_random():
    rng = np.random.default_rng(0)
    b, t = 6, 11
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    lengths = np.array([0, 1, 5, 11, 7, 3])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    adv, ret = gae(f32(rewards), f32(values), jnp.asarray(mask > 0), gamma=0.97, lam=0.9)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, 0.97, 0.9)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-4)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-4)


def test_whiten():
    # Valid entries [1, 2, 3]: mean 2, population var 2/3 -> [-1.2247, 0, 1.2247]; padding -> 0.
    x, mask = f32([1, 2, 3, 100]), f32([1, 1, 1, 0])
    s = math.sqrt(1.5)
    np.testing.assert_allclose(whiten(x, mask, eps=0.0), [-s, 0, s, 0], atol=1e-6)
    # shift_mean=False adds the mean back: only the scale changes.
    np.testing.assert_allclose(
        whiten(x, mask, shift_mean=False, eps=0.0), [2 - s, 2, 2 + s, 0], atol=1e-6
    )
    np.testing.assert_array_equal(whiten(x, jnp.zeros(4)), np.zeros(4))


def test_token_rewards():
    # Score on the last valid token, minus 0.1 * 0.5 = 0.05 on every valid token.
    scores = f32([2, 3, 5])
    mask = f32([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    out = token_rewards(scores, mask, kl=jnp.full((3, 3), 0.5), kl_coef=0.1)
    np.testing.assert_allclose(out, [[-0.05, 1.95, 0], [-0.05, -0.05, 2.95], [0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(token_rewards(scores, mask), [[0, 2, 0], [0, 0, 3], [0, 0, 0]])


# ---------------------------------------------------------------------------------------------
# policy loss and aggregation
# ---------------------------------------------------------------------------------------------

# eps_low = 0.2 (ratio floor 0.8), eps_high = 0.28 (ratio ceiling 1.28). Per token:
#   0: A=+1, ratio 1.5 > 1.28 -> clipped:   -min(1.5, 1.28)    = -1.28, d/dlogp = 0
#   1: A=-1, ratio 0.5 < 0.8  -> clipped:   -min(-0.5, -0.8)   =  0.8,  d/dlogp = 0
#   2: A=+2, ratio 1.1        -> unclipped: -min(2.2, 2.2)     = -2.2,  d/dlogp = -A*ratio = -2.2
#   3: A=-1, ratio 1.5 (A<0, high side is not clipped): -min(-1.5, -1.28) = 1.5, d/dlogp = 1.5
#   4: A=+1, ratio 0.5 (A>0, low side is not clipped):  -min(0.5, 0.8)    = -0.5, d/dlogp = -0.5
# token_mean loss = (-1.28 + 0.8 - 2.2 + 1.5 - 0.5) / 5 = -1.68 / 5 = -0.336
RATIOS = [1.5, 0.5, 1.1, 1.5, 0.5]
ADVS = [1.0, -1.0, 2.0, -1.0, 1.0]
OLD = f32([[-1.0, -2.0, -0.5, -3.0, -1.5]])
LOGP = OLD + jnp.log(f32([RATIOS]))
CLIP = dict(eps_low=0.2, eps_high=0.28)


def test_policy_loss_clip_cases_value_and_metrics():
    loss, metrics = policy_loss(
        LOGP, OLD, f32([ADVS]), jnp.ones((1, 5)), agg_mode="token_mean", **CLIP
    )
    np.testing.assert_allclose(loss, -0.336, atol=ATOL)
    np.testing.assert_allclose(metrics["clipfrac_low"], 0.2, atol=ATOL)  # token 1
    np.testing.assert_allclose(metrics["clipfrac_high"], 0.2, atol=ATOL)  # token 0
    np.testing.assert_allclose(metrics["ppo_kl"], -np.mean(np.log(RATIOS)), atol=ATOL)
    np.testing.assert_allclose(metrics["ratio_mean"], 5.1 / 5, atol=ATOL)
    np.testing.assert_allclose(metrics["ratio_max"], 1.5, atol=ATOL)


def test_policy_loss_gradient_zero_where_clipped():
    def f(logp):
        mask = jnp.ones((1, 5))
        return policy_loss(logp, OLD, f32([ADVS]), mask, agg_mode="token_mean", **CLIP)[0]

    grad = jax.grad(f)(LOGP)
    np.testing.assert_allclose(grad, [[0, 0, -2.2 / 5, 1.5 / 5, -0.5 / 5]], atol=ATOL)


def test_policy_loss_is_weights_constant():
    # Weight 2 on token 0: loss = (-2.56 + 0.8 - 2.2 + 1.5 - 0.5) / 5 = -0.592.
    w = f32([[2, 1, 1, 1, 1]])

    def f(logp, w):
        return policy_loss(
            logp, OLD, f32([ADVS]), jnp.ones((1, 5)), agg_mode="token_mean", is_weights=w, **CLIP
        )[0]

    np.testing.assert_allclose(f(LOGP, w), -0.592, atol=ATOL)
    g_logp, g_w = jax.grad(f, argnums=(0, 1))(LOGP, w)
    np.testing.assert_allclose(g_w, np.zeros((1, 5)))  # stop_gradient on the weights
    np.testing.assert_allclose(g_logp, [[0, 0, -2.2 / 5, 1.5 / 5, -0.5 / 5]], atol=ATOL)


# Ragged mask: row 0 has 3 valid tokens [1, 2, 3], row 1 one token [6], row 2 none.
#   token_mean               = (1 + 2 + 3 + 6) / 4             = 3
#   seq_mean_token_mean      = mean(mean[1,2,3]=2, 6)           = 4   (row 2 skipped)
#   seq_mean_token_sum_norm  = mean(6/4, 6/4, 0/4)              = 1   (T = 4)
#                   max_len=6: mean(6/6, 6/6, 0)                = 2/3
AGG_X = f32([[1, 2, 3, 100], [6, 100, 100, 100], [7, 7, 7, 7]])
AGG_MASK = f32([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
AGG_EXPECTED = {"token_mean": 3.0, "seq_mean_token_mean": 4.0, "seq_mean_token_sum_norm": 1.0}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_ragged(mode):
    np.testing.assert_allclose(aggregate(AGG_X, AGG_MASK, mode=mode), AGG_EXPECTED[mode], atol=ATOL)
    np.testing.assert_allclose(aggregate(AGG_X, AGG_MASK > 0, mode=mode), AGG_EXPECTED[mode])


def test_aggregate_max_len_and_unknown_mode():
    np.testing.assert_allclose(
        aggregate(AGG_X, AGG_MASK, mode="seq_mean_token_sum_norm", max_len=6), 2 / 3, atol=ATOL
    )
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(AGG_X, AGG_MASK, mode="sum")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_agg_modes(mode):
    # ratio = 1 everywhere -> per-token loss = -A, so the loss is -aggregate(A).
    loss, _ = policy_loss(AGG_X, AGG_X, AGG_X, AGG_MASK, agg_mode=mode, **CLIP)
    np.testing.assert_allclose(loss, -AGG_EXPECTED[mode], atol=ATOL)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_empty_mask_is_zero(mode):
    # Garbage log-probs at masked positions must not leak inf / NaN into loss or gradient.
    # (-inf - -inf is NaN, so the log-ratio must be masked, not just the per-token loss.)
    logp = f32([[50.0, -1e4], [-jnp.inf, 3e3]])
    old = f32([[-50.0, 1e4], [-jnp.inf, -3e3]])

    def f(lp):
        return policy_loss(lp, old, jnp.ones((2, 2)), jnp.zeros((2, 2)), agg_mode=mode, **CLIP)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, np.zeros((2, 2)))
    for name, value in metrics.items():
        assert np.isfinite(value), name


# ---------------------------------------------------------------------------------------------
# KL, entropy, value loss
# ---------------------------------------------------------------------------------------------


def test_kl_penalty_hand_values():
    # Token 0: p = 0.5, p_ref = 0.25 -> d = logp - ref = ln 2; r = p_ref / p = 0.5.
    #   k1 = ln 2 = 0.693147, k2 = 0.5 ln^2 2 = 0.240227, k3 = 0.5 + ln 2 - 1 = 0.193147
    # Token 1: p = 0.25, p_ref = 0.5 -> d = -ln 2; r = 2.
    #   k1 = -0.693147, k2 = 0.240227, k3 = 2 - ln 2 - 1 = 0.306853
    logp = jnp.log(f32([[0.5, 0.25]]))
    ref = jnp.log(f32([[0.25, 0.5]]))
    ln2 = math.log(2)
    np.testing.assert_allclose(kl_penalty(logp, ref, kind="k1"), [[ln2, -ln2]], atol=1e-6)
    np.testing.assert_allclose(
        kl_penalty(logp, ref, kind="k2"), [[0.5 * ln2**2, 0.5 * ln2**2]], atol=1e-6
    )
    np.testing.assert_allclose(kl_penalty(logp, ref, kind="k3"), [[ln2 - 0.5, 1 - ln2]], atol=1e-6)
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, kind="k4")


def test_kl_k3_nonnegative_and_zero_when_equal():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    logp = jax.random.normal(k1, (16, 64)) * 3
    ref = logp + jax.random.normal(k2, (16, 64)) * jnp.logspace(-6, 1.5, 64)
    k3 = kl_penalty(logp, ref, kind="k3")
    assert bool(jnp.all(k3 >= 0))
    assert bool(jnp.all(jnp.isfinite(kl_penalty(f32([[0.0]]), f32([[-1e4]]), kind="k3"))))
    np.testing.assert_allclose(kl_penalty(logp, logp, kind="k3"), np.zeros((16, 64)), atol=1e-7)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_zero_when_equal(kind):
    logp = f32([[-0.3, -2.0, -7.0]])
    np.testing.assert_allclose(kl_penalty(logp, logp, kind=kind), np.zeros((1, 3)), atol=1e-7)


def test_entropy_from_logits():
    v = 7
    uniform = jnp.zeros((2, 3, v))
    np.testing.assert_allclose(
        entropy_from_logits(uniform), np.full((2, 3), math.log(v)), atol=1e-5
    )
    peaked = jnp.zeros((1, 1, v)).at[..., 0].set(100.0)
    np.testing.assert_allclose(entropy_from_logits(peaked), [[0.0]], atol=1e-5)
    # -inf logits (masked vocabulary) contribute 0: uniform over the 4 remaining -> ln 4.
    masked = jnp.zeros((1, 1, v)).at[..., 4:].set(-jnp.inf)
    np.testing.assert_allclose(entropy_from_logits(masked), [[math.log(4)]], atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda x: entropy_from_logits(x).sum())(masked))))


# clip_eps = 0.2. Per token (V, V_old, R):
#   0: (1.0, 0.5, 1.0): V_clip = 0.7; (V-R)^2 = 0,    (V_clip-R)^2 = 0.09 -> 0.045, clipped
#   1: (0.6, 0.5, 1.0): V_clip = 0.6; both 0.16                            -> 0.08
#   2: (1.5, 0.5, 2.0): V_clip = 0.7; 0.25 vs 1.69                         -> 0.845, clipped
#   3: (0.0, 0.5, 1.0): V_clip = 0.3; 1.0  vs 0.49                         -> 0.5
# token_mean = (0.045 + 0.08 + 0.845 + 0.5) / 4 = 0.3675; vf_clipfrac = 0.5.
# Unclipped (clip_eps = 10): 0.5 * (0 + 0.16 + 0.25 + 1.0) / 4 = 0.17625.
VL = dict(values=f32([[1.0, 0.6, 1.5, 0.0]]), old_values=f32([[0.5] * 4]))
VL_RET, VL_MASK = f32([[1.0, 1.0, 2.0, 1.0]]), jnp.ones((1, 4))


def test_value_loss_clipped_vs_unclipped():
    loss, metrics = value_loss(
        **VL, returns=VL_RET, mask=VL_MASK, clip_eps=0.2, agg_mode="token_mean"
    )
    np.testing.assert_allclose(loss, 0.3675, atol=ATOL)
    np.testing.assert_allclose(metrics["vf_clipfrac"], 0.5, atol=ATOL)
    np.testing.assert_allclose(metrics["value_mean"], 0.775, atol=ATOL)
    loss_wide, metrics_wide = value_loss(
        **VL, returns=VL_RET, mask=VL_MASK, clip_eps=10.0, agg_mode="token_mean"
    )
    np.testing.assert_allclose(loss_wide, 0.17625, atol=ATOL)
    np.testing.assert_allclose(metrics_wide["vf_clipfrac"], 0.0)


def test_value_loss_gradient():
    # Clipped tokens 0 and 2 take the saturated clipped branch -> gradient 0;
    # tokens 1 and 3: (V - R) / 4 = [-0.1, -0.25].
    def f(v):
        return value_loss(
            v, VL["old_values"], VL_RET, VL_MASK, clip_eps=0.2, agg_mode="token_mean"
        )[0]

    np.testing.assert_allclose(jax.grad(f)(VL["values"]), [[0, -0.1, 0, -0.25]], atol=ATOL)


# ---------------------------------------------------------------------------------------------
# jit with traced hyperparameters: no retrace when the knob values change
# ---------------------------------------------------------------------------------------------


def _pl(logp, old, adv, mask, eps_low, eps_high):
    return policy_loss(
        logp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, agg_mode="seq_mean_token_mean"
    )


def _vl(v, old, ret, mask, clip_eps):
    return value_loss(v, old, ret, mask, clip_eps=clip_eps, agg_mode="token_mean")


def _gae(r, v, mask, gamma, lam):
    return gae(r, v, mask, gamma=gamma, lam=lam)


def _tr(scores, mask, kl, kl_coef):
    return token_rewards(scores, mask, kl=kl, kl_coef=kl_coef)


def _ga(rewards, eps):
    return group_advantages(rewards, group_size=4, eps=eps)


def _wh(x, mask, eps):
    return whiten(x, mask, eps=eps)


PL_ARGS = (LOGP, OLD, f32([ADVS]), jnp.ones((1, 5)))
JIT_CASES = {
    "policy_loss": (_pl, PL_ARGS, (0.2, 0.28), (0.05, 0.6)),
    "value_loss": (_vl, (*VL.values(), VL_RET, VL_MASK), (0.2,), (10.0,)),
    "gae": (_gae, (f32([[0, 0, 1]]), f32([[0.5, 0.6, 0.7]]), jnp.ones((1, 3))), (1, 1), (0.9, 0.5)),
    "token_rewards": (_tr, (f32([2, 3]), AGG_MASK[:2], jnp.ones((2, 4))), (0.1,), (0.3,)),
    "group_advantages": (_ga, (f32([1, 0, 0, 1, 1, 1, 1, 1]),), (1e-6,), (1.0,)),
    "whiten": (_wh, (f32([1, 2, 3, 100]), f32([1, 1, 1, 0])), (1e-8,), (1.0,)),
}


@pytest.mark.parametrize("name", sorted(JIT_CASES))
def test_jit_traced_knobs_no_retrace(name):
    fn, args, knobs_a, knobs_b = JIT_CASES[name]
    chex.clear_trace_counter()  # chex keys its counter by the wrapped function's code
    traces = []

    def counted(*a):
        traces.append(1)
        return fn(*a)

    jitted = jax.jit(chex.assert_max_traces(counted, n=1))
    out_a = jitted(*args, *map(f32, knobs_a))
    out_b = jitted(*args, *map(f32, knobs_b))
    assert len(traces) == 1
    # Same values as eager execution with Python-float knobs, and the knobs took effect.
    chex.assert_trees_all_close(out_a, fn(*args, *knobs_a), atol=1e-5)
    chex.assert_trees_all_close(out_b, fn(*args, *knobs_b), atol=1e-5)
    leaves_a, leaves_b = jax.tree.leaves(out_a), jax.tree.leaves(out_b)
    assert any(not np.allclose(a, b) for a, b in zip(leaves_a, leaves_b, strict=True))


@pytest.mark.parametrize("kind", KL_KINDS)
def test_jit_static_kind_and_entropy(kind):
    fn = jax.jit(kl_penalty, static_argnames="kind")
    logp, ref = jnp.log(f32([[0.5, 0.25]])), jnp.log(f32([[0.25, 0.5]]))
    chex.assert_trees_all_close(fn(logp, ref, kind=kind), kl_penalty(logp, ref, kind=kind))
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5))
    chex.assert_trees_all_close(jax.jit(entropy_from_logits)(logits), entropy_from_logits(logits))

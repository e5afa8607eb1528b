"""Tests for fm.stats: hand-worked values, jit, fixed keys, no retracing, import isolation."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from fm import stats

LOG2 = math.log(2.0)


def _np(d):
    return {k: float(v) for k, v in d.items()}


# --------------------------------------------------------------------------- rewards


def test_reward_stats_groups():
    # groups [1,0,0,1] (std 0.5) and [1,1,1,1] (std 0) → one of two groups has zero std.
    s = _np(stats.reward_stats(jnp.array([1.0, 0, 0, 1, 1, 1, 1, 1]), group_size=4))
    assert s["reward_mean"] == pytest.approx(0.75)  # 6 / 8
    assert s["reward_std"] == pytest.approx(math.sqrt(0.75 - 0.75**2))  # E[r²] - E[r]² = 0.1875
    assert (s["reward_min"], s["reward_max"]) == (0.0, 1.0)
    # sorted [0,0,1,1,1,1,1,1]: p10 at index 0.7 → 0; p50 at 3.5 → 1; p90 at 6.3 → 1
    assert (s["reward_p10"], s["reward_p50"], s["reward_p90"]) == (0.0, 1.0, 1.0)
    assert s["frac_zero_std_groups"] == 0.5
    assert s["group_reward_std_mean"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert s["nonfinite_rewards"] == 0.0


def test_reward_percentiles_interpolate():
    # 0..10 (11 values): p10 at index 1.0 → 1, p50 at 5 → 5, p90 at 9 → 9.
    s = _np(stats.reward_stats(jnp.arange(11.0), group_size=11))
    assert s["reward_p10"] == pytest.approx(1.0, abs=1e-5)
    assert s["reward_p50"] == pytest.approx(5.0, abs=1e-5)
    assert s["reward_p90"] == pytest.approx(9.0, abs=1e-5)
    assert s["frac_zero_std_groups"] == 0.0


def test_reward_nan_is_reported_not_hidden():
    s = _np(stats.reward_stats(jnp.array([jnp.nan, 1.0, 0.0, 1.0]), group_size=2))
    assert math.isnan(s["reward_mean"]) and math.isnan(s["reward_p50"])
    assert s["nonfinite_rewards"] == 1.0
    # NaN group std is not "< 1e-6"; group [0, 1] has std 0.5.
    assert s["frac_zero_std_groups"] == 0.0


def test_bad_group_size_raises():
    with pytest.raises(ValueError, match="multiple"):
        stats.reward_stats(jnp.zeros(6), group_size=4)


# --------------------------------------------------------------------------- lengths, tokens


def test_length_stats():
    s = _np(
        stats.length_stats(
            jnp.array([2, 4, 4, 6]), jnp.array([False, False, True, True]), max_len=6
        )
    )
    assert s["length_mean"] == 4.0
    assert s["length_std"] == pytest.approx(math.sqrt(2.0))  # deviations -2,0,0,2 → var 8/4
    assert (s["length_max"], s["length_min"]) == (6.0, 2.0)
    assert s["clip_ratio"] == 0.5
    assert s["length_at_cap"] == 0.25


def test_token_stats_single_row():
    # [3,3,4,3,4]: pairs 3→3 (repeat), 3→4, 4→3, 3→4 → repetition 1/4.
    # bigrams (3,3),(3,4),(4,3),(3,4): the last (3,4) occurred before → 1/4.
    # distinct {3,4} over 5 tokens → 2/5.
    s = _np(stats.token_stats(jnp.array([[3, 3, 4, 3, 4]]), jnp.ones((1, 5))))
    assert s["repetition_ratio"] == pytest.approx(0.25)
    assert s["ngram_repeat_ratio"] == pytest.approx(0.25)
    assert s["unique_token_ratio"] == pytest.approx(0.4)


def test_token_stats_alternating_bigrams():
    # [1,2,1,2,1,2]: no immediate repeats; bigrams (1,2),(2,1),(1,2),(2,1),(1,2) → 2 distinct,
    # 3 of 5 seen before; 2 distinct tokens / 6.
    s = _np(stats.token_stats(jnp.array([[1, 2, 1, 2, 1, 2]]), jnp.ones((1, 6))))
    assert s["repetition_ratio"] == 0.0
    assert s["ngram_repeat_ratio"] == pytest.approx(3 / 5)
    assert s["unique_token_ratio"] == pytest.approx(2 / 6)


def test_token_stats_mask_holes_and_pooling():
    # Row B [3,9,3,4,4] with mask [1,0,1,1,0] → valid sequence [3,3,4]: 1 repeat of 2 pairs,
    # bigrams (3,3),(3,4) all new, 2 distinct / 3. Row A is [3,3,4,3,4] (1/4, 1/4, 2/5).
    # Pooled: repetition (1+1)/(4+2), bigrams (1+0)/(4+2); unique = mean(2/5, 2/3).
    # Row C is empty: it adds no pairs and is left out of the unique-token mean.
    tokens = jnp.array([[3, 3, 4, 3, 4], [3, 9, 3, 4, 4], [7, 7, 7, 7, 7]])
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
    s = _np(stats.token_stats(tokens, mask))
    assert s["repetition_ratio"] == pytest.approx(2 / 6)
    assert s["ngram_repeat_ratio"] == pytest.approx(1 / 6)
    assert s["unique_token_ratio"] == pytest.approx((2 / 5 + 2 / 3) / 2)


def test_token_stats_empty_mask_is_zero():
    s = _np(stats.token_stats(jnp.ones((2, 4), jnp.int32), jnp.zeros((2, 4))))
    assert s == {"repetition_ratio": 0.0, "ngram_repeat_ratio": 0.0, "unique_token_ratio": 0.0}


def _token_stats_reference(tokens, mask):
    """Direct O(T²) loops, the definition the sorted implementation must match."""
    rep = pairs = bigram_rep = 0
    uniq = []
    for row, m in zip(tokens, mask, strict=True):
        seq = [int(t) for t, v in zip(row, m, strict=True) if v]
        grams = list(zip(seq, seq[1:], strict=False))
        rep += sum(a == b for a, b in grams)
        pairs += len(grams)
        bigram_rep += sum(g in grams[:j] for j, g in enumerate(grams))
        if seq:
            uniq.append(len(set(seq)) / len(seq))
    return rep / max(pairs, 1), bigram_rep / max(pairs, 1), float(np.mean(uniq)) if uniq else 0.0


def test_token_stats_matches_direct_definition():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, size=(16, 12))
    mask = rng.random((16, 12)) < 0.7
    s = _np(jax.jit(stats.token_stats)(jnp.asarray(tokens), jnp.asarray(mask)))
    ref = _token_stats_reference(tokens, mask)
    got = (s["repetition_ratio"], s["ngram_repeat_ratio"], s["unique_token_ratio"])
    np.testing.assert_allclose(got, ref, rtol=1e-6)


# --------------------------------------------------------------------------- advantages


def test_shadow_advantages():
    # group [1,0,0,1]: mean 0.5, std 0.5 → ±0.5 / (0.5 + eps); group of equal rewards → 0.
    adv = stats.shadow_advantages(jnp.array([1.0, 0, 0, 1, 1, 1, 1, 1]), group_size=4, eps=0.0)
    np.testing.assert_allclose(adv[:4], [1, -1, -1, 1])
    assert jnp.all(jnp.isnan(adv[4:]))  # 0 / 0 with eps=0: eps is what guards the division
    adv = stats.shadow_advantages(jnp.array([1.0, 1, 1, 1]), group_size=4)
    np.testing.assert_array_equal(adv, 0.0)


REWARDS = jnp.array([1.0, 0.0, 0.0, 1.0])  # groups of 2 → shadow ≈ [1, -1, -1, 1]
ADV_MASK = jnp.array([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]], jnp.float32)


def _token_adv(seq):
    # Broadcast sequence advantages over T=3; a NaN in the padding must stay invisible.
    a = jnp.broadcast_to(jnp.asarray(seq, jnp.float32)[:, None], (4, 3))
    return a.at[0, 2].set(jnp.nan)


def test_advantage_stats_healthy():
    s = _np(stats.advantage_stats(_token_adv([1, -1, -1, 1]), ADV_MASK, REWARDS, group_size=2))
    # valid tokens: 2×(+1), 3×(-1), 3×(-1), 1×(+1) → mean (3 - 6)/9 = -1/3, E[a²] = 1
    assert s["adv_mean"] == pytest.approx(-1 / 3)
    assert s["adv_std"] == pytest.approx(math.sqrt(1 - 1 / 9))
    assert s["adv_max_abs"] == 1.0
    assert s["adv_group_mean_max_abs"] == 0.0
    assert s["adv_shadow_corr"] == pytest.approx(1.0)
    assert s["adv_shadow_sign_agree"] == 1.0
    assert s["adv_scale_ratio"] == pytest.approx(1.0, abs=1e-5)  # shadow is ±1/(1 + 2e-6)
    assert (s["check_adv_sign"], s["check_adv_group_mean"], s["check_adv_flip"]) == (0, 0, 0)


def test_advantage_sign_flip():
    s = _np(stats.advantage_stats(_token_adv([-1, 1, 1, -1]), ADV_MASK, REWARDS, group_size=2))
    assert s["adv_shadow_corr"] == pytest.approx(-1.0)
    assert s["adv_shadow_sign_agree"] == 0.0
    assert s["check_adv_sign"] == 1.0
    assert s["check_adv_flip"] == 4.0  # every row against the shadow


def test_advantage_flip_counts_rows_and_ignores_scale_and_clipping():
    # rewards [1,0,0,0 | 1,1,0,0]: shadow signs [+,-,-,- | +,+,-,-].
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    clipped = jnp.array([1.0, -0.5, -0.5, -0.5, 1.0, 1.0, -1.0, -1.0])  # any scale, clipped
    s = _np(stats.advantage_stats(clipped[:, None], jnp.ones((8, 1)), rewards, group_size=4))
    assert s["check_adv_flip"] == 0.0 and s["check_adv_sign"] == 0.0
    one_group = clipped.at[4:].multiply(-1.0)  # one of the two groups negated
    s = _np(stats.advantage_stats(one_group[:, None], jnp.ones((8, 1)), rewards, group_size=4))
    assert (
        s["check_adv_flip"] == 4.0 and s["check_adv_sign"] == 0.0
    )  # corr > -0.5: sign check silent
    zeroed = clipped.at[1].set(0.0)  # a live row with no advantage disagrees too
    s = _np(stats.advantage_stats(zeroed[:, None], jnp.ones((8, 1)), rewards, group_size=4))
    assert s["check_adv_flip"] == 1.0
    # ... unless it has no token in the loss (a completion masked out): nothing to compare.
    masked = jnp.ones((8, 1)).at[1].set(0.0)
    s = _np(stats.advantage_stats(zeroed[:, None], masked, rewards, group_size=4))
    assert s["check_adv_flip"] == 0.0 and s["adv_shadow_sign_agree"] == 1.0


def test_reward_shadow_gap():
    verifier = jnp.array([1.0, 0.0, 1.0, 0.0])
    s = _np(stats.reward_shadow_stats(verifier, verifier))
    assert s["reward_shadow_gap"] == 0.0
    flipped = jnp.array([0.0, 0.0, 1.0, 1.0])  # two of four labels flipped
    assert _np(stats.reward_shadow_stats(flipped, verifier))["reward_shadow_gap"] == 0.5
    bonus = verifier + 0.2  # a constant bonus on every sample
    gap = _np(stats.reward_shadow_stats(bonus, verifier))["reward_shadow_gap"]
    assert gap == pytest.approx(0.2)


def test_advantage_silent_shrink():
    s = _np(stats.advantage_stats(_token_adv([0.01, -0.01, -0.01, 0.01]), ADV_MASK, REWARDS,
                                  group_size=2))  # fmt: skip
    assert s["adv_scale_ratio"] == pytest.approx(0.01, rel=1e-4)
    assert s["adv_shadow_corr"] == pytest.approx(1.0)
    assert s["check_adv_sign"] == 0.0


def test_advantage_group_mean_and_partial_signs():
    # rewards [1,0 | 0.5,0.5]: shadow [+1,-1 | 0,0] (second group has no signal).
    # seq advantages [1,1 | 5,-5]: group means 1 and 0 → max 1 → check fires.
    # non-zero shadow rows 0,1: row 0 agrees, row 1 does not → 1/2.
    # corr: seq − mean(0.5) = [.5,.5,4.5,-5.5]; shadow [1,-1,0,0] → cov (.5 - .5)/4 = 0.
    rewards = jnp.array([1.0, 0.0, 0.5, 0.5])
    seq = jnp.array([1.0, 1.0, 5.0, -5.0])
    s = _np(stats.advantage_stats(seq[:, None], jnp.ones((4, 1)), rewards, group_size=2))
    assert s["adv_group_mean_max_abs"] == 1.0
    assert s["check_adv_group_mean"] == 1.0
    assert s["adv_shadow_sign_agree"] == 0.5
    assert s["adv_shadow_corr"] == pytest.approx(0.0, abs=1e-6)


def test_advantage_no_signal():
    # All groups have equal rewards: shadow ≡ 0 → corr 0, agreement 1, scale 1 when adv ≡ 0.
    rewards = jnp.full((6,), 0.1)  # 0.1 is inexact in f32: rounding noise must not leak in
    s = _np(stats.advantage_stats(jnp.zeros((6, 2)), jnp.ones((6, 2)), rewards, group_size=3))
    assert (s["adv_shadow_corr"], s["adv_shadow_sign_agree"], s["adv_scale_ratio"]) == (0, 1, 1)
    assert (s["check_adv_sign"], s["check_adv_group_mean"]) == (0.0, 0.0)
    noisy = jnp.array([[1e-3], [-1e-3], [0.0], [2e-3], [0.0], [-2e-3]])
    s = _np(stats.advantage_stats(noisy, jnp.ones((6, 1)), rewards, group_size=3))
    assert s["adv_shadow_corr"] == 0.0 and s["check_adv_sign"] == 0.0
    assert s["adv_scale_ratio"] > 100  # advantages without any reward signal: std / eps


# --------------------------------------------------------------------------- log-probs


def test_mismatch_identical():
    lp = jnp.array([[-1.0, -2.0], [-0.5, -3.0]])
    s = _np(stats.mismatch_stats(lp, lp, jnp.ones((2, 2))))
    assert s == {"mismatch_k3": 0, "mismatch_max_abs": 0, "is_ratio_mean": 1, "is_ratio_max": 1,
                 "is_ess": 1}  # fmt: skip


def test_mismatch_one_token_ess():
    # Δ = trainer - sampler = +log 2 on one token of row 0 → w = [2, 1]:
    # ESS = (2+1)² / (2·(4+1)) = 0.9. Token ratios [2,1,1,1] → mean 1.25, max 2.
    # k3 = r - log r - 1 = 2 - log 2 - 1 on one of 4 tokens. A huge Δ at a masked token is ignored.
    sampler = jnp.full((2, 3), -1.0)
    trainer = sampler.at[0, 0].add(LOG2).at[1, 2].add(50.0)
    mask = jnp.array([[1, 1, 0], [1, 1, 0]])
    s = _np(stats.mismatch_stats(sampler, trainer, mask))
    assert s["is_ess"] == pytest.approx(0.9)
    assert s["is_ratio_mean"] == pytest.approx(1.25)
    assert s["is_ratio_max"] == pytest.approx(2.0)
    assert s["mismatch_k3"] == pytest.approx((1 - LOG2) / 4)
    assert s["mismatch_max_abs"] == pytest.approx(LOG2)


def test_mismatch_dominant_sequence_is_stable():
    # Σ Δ = 200 on row 0: w = [e^200, 1] overflows f32 directly; in log space ESS = 1/B = 0.5.
    sampler = jnp.zeros((2, 4))
    trainer = sampler.at[0].set(50.0)
    s = _np(stats.mismatch_stats(sampler, trainer, jnp.ones((2, 4))))
    assert s["is_ess"] == pytest.approx(0.5)
    assert math.isfinite(s["mismatch_k3"]) and s["is_ratio_max"] == pytest.approx(math.exp(20))


def test_mismatch_nan_propagates():
    trainer = jnp.zeros((1, 2)).at[0, 1].set(jnp.nan)
    s = stats.mismatch_stats(jnp.zeros((1, 2)), trainer, jnp.ones((1, 2)))
    assert math.isnan(float(s["mismatch_k3"])) and float(stats.nonfinite_count(s)) >= 1


def test_kl_stats():
    # logp - ref = [0, log 2] → k1 = log2 / 2; log r = ref - logp = [0, -log 2] → r = 1/2:
    # k3 = 0.5 + log 2 - 1 ≈ 0.1931 on one of two tokens. The masked third token is ignored.
    logp = jnp.array([[-1.0, -1.0, -9.0]])
    ref = jnp.array([[-1.0, -1.0 - LOG2, 0.0]])
    s = _np(stats.kl_stats(logp, ref, jnp.array([[1, 1, 0]])))
    assert s["kl_ref_k1"] == pytest.approx(LOG2 / 2)
    assert s["kl_ref_k3"] == pytest.approx((LOG2 - 0.5) / 2)
    assert s["kl_ref_max"] == pytest.approx(LOG2 - 0.5)


def test_entropy_stats():
    # rows: mean(1,2) = 1.5, mean(4) = 4, third row empty (left out of the min).
    e = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    s = _np(stats.entropy_stats(e, mask))
    assert s["entropy_mean"] == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    assert s["entropy_min_seq"] == 1.5
    assert _np(stats.entropy_stats(e, jnp.zeros((3, 3)))) == {
        "entropy_mean": 0.0,
        "entropy_min_seq": 0.0,
    }


# --------------------------------------------------------------------------- optimization


def _grads(nan=False):
    g = {
        "lm_head": {"weight": jnp.array([[2.0]])},
        "model": {
            "embed_tokens": {"weight": jnp.array([3.0, 4.0])},
            "layers": [{"w": jnp.array([1.0, 2.0, 2.0])}, {"w": jnp.zeros(2)}],
            "norm": {"weight": jnp.zeros(1)},
        },
        "step": jnp.array(7, jnp.int32),  # integer leaves carry no gradient: ignored
    }
    if nan:
        g["model"]["layers"][1]["w"] = jnp.array([jnp.nan, jnp.inf])
    return g


def test_default_groups():
    p = DictKey
    assert stats.default_groups((p("model"), p("layers"), p(0), p("mlp"))) == "layer_0"
    assert stats.default_groups((GetAttrKey("layers"), SequenceKey(3))) == "layer_3"
    assert stats.default_groups((p("layers"), p("12"), p("input_layernorm"))) == "layer_12"
    assert stats.default_groups((p("model"), p("embed_tokens"), p("weight"))) == "embed"
    assert stats.default_groups((p("lm_head"), p("weight"), GetAttrKey("value"))) == "head"
    assert stats.default_groups((p("model"), p("norm"), p("weight"))) == "norm"
    assert stats.default_groups((p("other_thing"),)) == "other"


def test_group_names_of():
    names = stats.group_names_of(_grads())
    assert names == ("embed", "head", "layer_0", "layer_1", "norm", "other")
    many = {"layers": [jnp.zeros(1)] * 11}
    assert stats.group_names_of(many)[-2:] == ("layer_9", "layer_10")


def test_optimization_stats_norms_and_groups():
    names = ("embed", "layer_0", "layer_1", "norm", "head", "other", "unused")
    updates = {"a": jnp.array([0.3, 0.4])}  # norm 0.5
    params = {"a": jnp.array([6.0, 8.0])}  # norm 10
    s = _np(stats.optimization_stats(_grads(), updates, params, lr=1e-3, group_names=names))
    # 2² + (3² + 4²) + (1² + 2² + 2²) = 4 + 25 + 9 = 38
    assert s["grad_norm"] == pytest.approx(math.sqrt(38))
    assert (s["update_norm"], s["param_norm"]) == (pytest.approx(0.5), 10.0)
    assert s["update_param_ratio"] == pytest.approx(0.05)
    assert s["lr"] == pytest.approx(1e-3)
    assert s["grad_norm/embed"] == 5.0 and s["grad_norm/layer_0"] == 3.0
    assert s["grad_norm/head"] == 2.0
    for empty in ("layer_1", "norm", "other", "unused"):
        assert s[f"grad_norm/{empty}"] == 0.0
    assert s["nonfinite_grads"] == s["nonfinite_updates"] == s["nonfinite_params"] == 0.0


def test_optimization_stats_nonfinite_gradient():
    s = _np(stats.optimization_stats(_grads(nan=True), {}, {"w": jnp.ones(2)}, lr=0.1,
                                     groups=stats.default_groups))  # fmt: skip
    assert math.isnan(s["grad_norm"]) and math.isnan(s["grad_norm/layer_1"])
    assert s["nonfinite_grads"] == 2.0
    assert s["grad_norm/embed"] == 5.0  # other groups stay readable
    assert s["update_norm"] == 0.0 and s["update_param_ratio"] == 0.0


def test_optimization_stats_unknown_group_raises():
    with pytest.raises(ValueError, match="not in group_names"):
        stats.optimization_stats(_grads(), {}, {}, lr=0.1, group_names=("embed",))


# --------------------------------------------------------------------------- tools, checks


def test_tool_stats():
    s = _np(
        stats.tool_stats(
            calls=jnp.array([2.0, 0, 3, 1]),
            errors=jnp.array([1.0, 0, 3, 0]),
            turns=jnp.array([3.0, 1, 4, 2]),
            aborted=jnp.array([False, False, True, False]),
        )
    )
    assert s["tool_calls_mean"] == 1.5  # 6 / 4
    assert s["tool_error_rate"] == pytest.approx(4 / 6)
    assert s["tool_turns_mean"] == 2.5
    assert s["tool_aborted_frac"] == 0.25
    zero = stats.tool_stats(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, bool))
    assert float(zero["tool_error_rate"]) == 0.0


def test_consistency_stats():
    # row sums 2, 3, 0 against lengths 2, 2, 0 → one mismatch; mean masked tokens 5/3.
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    s = _np(stats.consistency_stats(mask, jnp.array([2, 2, 0])))
    assert s["check_mask_length"] == 1.0
    assert s["masked_tokens_mean"] == pytest.approx(5 / 3)


def test_nonfinite_count_and_merge():
    d = {"a": jnp.array(jnp.nan), "b": jnp.array(1.0), "c": jnp.array(-jnp.inf)}
    assert float(stats.nonfinite_count(d)) == 2.0
    assert stats.merge({"a": 1}, {"b": 2}) == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="duplicate"):
        stats.merge({"a": 1}, {"b": 2}, {"a": 3})


# --------------------------------------------------------------------------- jit contract

B, T, G = 8, 6, 4


def _cases(seed):
    k = jax.random.split(jax.random.key(seed), 6)
    r = jax.random.bernoulli(k[0], 0.5, (B,)).astype(jnp.float32)
    mask = jax.random.bernoulli(k[1], 0.8, (B, T))
    lp = -jax.random.uniform(k[2], (B, T)) * 3
    lp2 = lp + 0.1 * jax.random.normal(k[3], (B, T))
    lengths = jnp.sum(mask, axis=1)
    toks = jax.random.randint(k[4], (B, T), 0, 5)
    tree = {"model": {"embed": lp[0], "layers": [lp[1], lp[2]]}, "lm_head": lp2}
    groups = stats.group_names_of(tree)
    opt = lambda g, u, p, lr: stats.optimization_stats(g, u, p, lr=lr, group_names=groups)
    return {
        "reward": (lambda r: stats.reward_stats(r, group_size=G), (r,)),
        "reward_shadow": (stats.reward_shadow_stats, (r, 1.0 - r)),
        "length": (lambda n, t: stats.length_stats(n, t, max_len=T), (lengths, lengths > 4)),
        "token": (stats.token_stats, (toks, mask)),
        "advantage": (
            lambda a, m, r: stats.advantage_stats(a, m, r, group_size=G),
            (lp, mask, r),
        ),
        "mismatch": (stats.mismatch_stats, (lp, lp2, mask)),
        "kl": (stats.kl_stats, (lp, lp2, mask)),
        "entropy": (stats.entropy_stats, (-lp, mask)),
        "optimization": (opt, (tree, tree, tree, jnp.float32(seed + 1))),
        "tool": (stats.tool_stats, (r, r, r + 1, r > 0)),
        "consistency": (stats.consistency_stats, (mask, lengths)),
    }


@pytest.mark.parametrize("name", list(_cases(0)))
def test_jit_fixed_keys_and_no_retrace(name):
    fn, args0 = _cases(0)[name]
    traces = []

    def counted(*args):
        traces.append(1)
        return fn(*args)

    jitted = jax.jit(counted)
    out0 = jitted(*args0)
    out1 = jitted(*_cases(1)[name][1])
    assert len(traces) == 1, "a second call with new values retraced"
    eager = fn(*args0)
    assert list(eager) == list(fn(*_cases(1)[name][1]))  # same keys, same order, new values
    assert sorted(out0) == sorted(out1) == sorted(eager)
    for k in out0:
        assert out0[k].shape == () and out0[k].dtype == jnp.float32, k
    for k in out0:
        np.testing.assert_allclose(out0[k], eager[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(stats.nonfinite_count(out0)) == 0.0


def test_all_keys_are_distinct():
    merged = stats.merge(*(fn(*args) for fn, args in _cases(0).values()))
    assert len(merged) == sum(len(fn(*args)) for fn, args in _cases(0).values())


def test_fm_stats_imports_no_project_packages():
    code = (
        "import fm.stats, sys; "
        "assert not any(m.split('.')[0] in ('rftjax', 'faults') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

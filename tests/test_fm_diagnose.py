"""fm.diagnose: the rule diagnoser ranks the taxonomy's types from hand-made statistics."""

import math

import numpy as np
import pytest

from fm import diagnose, taxonomy


def _records(n=40, alarm=30, **moves):
    """Healthy-looking statistics with small noise; from `alarm` on, each named statistic
    takes its given value (a number or a function of the step)."""
    rng = np.random.default_rng(0)
    base = {
        "reward_mean": 0.5,
        "reward_std": 0.3,
        "kl_ref_k1": 0.05,
        "entropy_mean": 0.8,
        "length_mean": 4.0,
        "grad_norm": 5.0,
        "update_param_ratio": 1e-3,
        "mismatch_k3": 1e-12,
        "mismatch_max_abs": 1e-6,
        "is_ratio_max": 1.0,
        "is_ess": 1.0,
        "frac_zero_std_groups": 0.2,
        "tool_error_rate": 0.0,
        "tool_calls_mean": 1.0,
        "tool_aborted_frac": 0.0,
        "nonfinite_grads": 0.0,
    }
    out = []
    for step in range(n):
        r = {k: v * (1 + 0.02 * rng.standard_normal()) for k, v in base.items()}
        if step >= alarm:
            r.update({k: v(step) if callable(v) else v for k, v in moves.items()})
        out.append(r)
    return out


def test_ranking_is_a_distribution_over_all_types_with_evidence_in_words():
    d = diagnose.diagnose(_records(mismatch_k3=0.5, is_ratio_max=3.0, is_ess=0.6), 30)
    assert len(d.ranking) == len(taxonomy.CATALOG)
    assert sum(p for _, p in d.ranking) == pytest.approx(1.0)
    assert [p for _, p in d.ranking] == sorted((p for _, p in d.ranking), reverse=True)
    assert d.family == "policy-generation" and d.top in ("PG1", "PG2")
    assert d.evidence[0].z > 10 and "against" in d.evidence[0].text
    assert d.top in d.summary()


def test_nonfinite_gradients_name_od2_with_certainty():
    d = diagnose.diagnose(_records(nonfinite_grads=3.0, grad_norm=math.nan), 30)
    assert d.top == "OD2" and d.ranking[0][1] > 0.99
    assert any("non-finite" in e.text for e in d.evidence)


def test_tool_errors_name_the_tool_family():
    d = diagnose.diagnose(_records(tool_error_rate=0.4, reward_mean=0.3), 30)
    assert d.top == "TE1" and d.family == "tool-environment"
    d = diagnose.diagnose(_records(tool_aborted_frac=0.5, reward_mean=0.35), 30)
    assert d.top == "TE2"


def test_a_flagged_signal_breaks_a_tie_and_nothing_moving_gives_a_flat_ranking():
    calm = diagnose.diagnose(_records(), 30)
    assert calm.ranking[0][1] < 0.2  # no evidence: no confident guess
    flagged = diagnose.diagnose(_records(), 30, flagged=["tool_error_rate"])
    assert flagged.top == "TE1"


def test_shift_uses_a_robust_scale_with_a_floor():
    before = np.array([1.0, 1.0, 1.0, 1.0, 100.0])  # one outlier does not set the scale
    center, mean, z = diagnose.shift(before, np.array([2.0]), floor=0.1)
    assert (center, mean) == (1.0, 2.0) and z == pytest.approx(10.0)
    assert diagnose.shift(before, np.array([math.nan]))[2] == math.inf


def test_alarm_index_must_leave_a_baseline_and_evidence():
    with pytest.raises(ValueError, match="alarm_index"):
        diagnose.diagnose(_records(), 0)
    with pytest.raises(ValueError, match="alarm_index"):
        diagnose.diagnose(_records(n=10), 10)


@pytest.mark.parametrize(
    "check,type_id",
    [("check_weights", "OD3"), ("check_reference", "OD3"), ("check_coefficients", "OD4")],
)
def test_a_broken_integrity_check_names_its_type_in_both_diagnosers(check, type_id):
    # The statistics move like a learning-rate spike (OD1's signature); the integrity check
    # that broke outweighs them, in the rules and in the shipped learned model alike.
    moves = dict(update_param_ratio=1e-2, grad_norm=20.0, kl_ref_k1=0.5)
    records = _records(**moves, **{check: 1.0})
    for r in records[:30]:
        r[check] = 0.0
    assert diagnose.diagnose(_records(**moves), 30).top == "OD1"  # without the check
    rules = diagnose.diagnose(records, 30)
    assert rules.top == type_id and rules.ranking[0][1] > 0.99
    assert rules.evidence[0].text == f"{check} 1 (must be 0)"
    assert diagnose.Learned()(records, 30, types=["OD1", "OD3", "OD4"]).top == type_id

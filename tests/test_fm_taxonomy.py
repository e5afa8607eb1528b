"""The failure taxonomy: 16 types in 5 families, each naming signals that fm.stats produces."""

import collections

import jax.numpy as jnp
import pytest

from fm import stats as fs
from fm import taxonomy


def _stat_keys() -> set[str]:
    b, t = 4, 3
    ones, mask = jnp.ones((b,)), jnp.ones((b, t))
    tree = {"w": jnp.ones((2,))}
    return set(
        fs.merge(
            fs.reward_stats(ones, group_size=2),
            fs.reward_shadow_stats(ones, ones),
            fs.length_stats(ones, ones > 0, max_len=t),
            fs.token_stats(jnp.ones((b, t), jnp.int32), mask),
            fs.advantage_stats(mask, mask, ones, group_size=2),
            fs.mismatch_stats(mask, mask, mask),
            fs.kl_stats(mask, mask, mask),
            fs.entropy_stats(mask, mask),
            fs.optimization_stats(tree, tree, tree, lr=1.0),
            fs.tool_stats(ones, ones, ones, ones > 0),
            fs.consistency_stats(mask, ones),
            fs.integrity_stats(*jnp.zeros((4,), jnp.uint32)),
            fs.coefficient_stats({"kl_coef": ones[0]}, {"kl_coef": ones[0]}),
        )
    )


def test_sixteen_types_in_five_families():
    assert len(taxonomy.CATALOG) == 16 and len(taxonomy.BY_ID) == 16
    per_family = collections.Counter(f.family for f in taxonomy.CATALOG)
    assert per_family == {
        "reward": 3,
        "policy-generation": 3,
        "optimization-dynamics": 4,
        "credit-assignment": 4,
        "tool-environment": 2,
    }
    assert all(
        f.id[:2]
        == {
            "reward": "RF",
            "policy-generation": "PG",
            "optimization-dynamics": "OD",
            "credit-assignment": "CA",
            "tool-environment": "TE",
        }[f.family]
        for f in taxonomy.CATALOG
    )


def test_entries_use_known_hooks_remedies_and_real_statistics():
    keys = _stat_keys()
    for f in taxonomy.CATALOG:
        assert f.hook in taxonomy.HOOKS, f.id
        assert f.remedies and set(f.remedies) <= set(taxonomy.REMEDIES), f.id
        assert f.signals and f.description, f.id
        for name, direction in f.signals:
            assert name in keys, (f.id, name)
            assert direction in ("+", "-", "~"), (f.id, direction)


def test_unknown_id_lists_the_known_ones():
    assert taxonomy.family_of("PG1") == "policy-generation"
    with pytest.raises(ValueError, match="RF1, RF2"):
        taxonomy.get("XX9")

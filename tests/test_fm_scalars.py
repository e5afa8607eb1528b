"""fm.scalars: named scalars packed into one array per dtype, read back unchanged."""

import jax
import jax.numpy as jnp
import numpy as np

from fm import scalars


def _values(x):
    return {
        "loss": x * 1.5,
        "alarm": x > 1.0,
        "count": jnp.int32(7) + x.astype(jnp.int32),
        "rows": jnp.stack([x, x + 1.0]),
        "nested": {"a": x},
    }


def test_pack_keeps_values_dtypes_and_the_sorted_order():
    step = jax.jit(lambda x: scalars.pack(_values(x)))
    x = jnp.float32(2.25)
    out = step(x)
    expected = jax.device_get(jax.jit(_values)(x))
    fetched = jax.device_get(out)
    assert list(fetched) == sorted(expected) == list(expected)  # a jitted dict's order
    for name in ("loss", "alarm", "count"):
        value = fetched[name]
        assert value.dtype == expected[name].dtype, name
        assert value.shape == ()
        assert value == expected[name], name
    np.testing.assert_array_equal(fetched["rows"], [2.25, 3.25])
    assert fetched["nested"]["a"] == 2.25
    assert {k: float(fetched[k]) for k in ("alarm", "count", "loss")} == {
        "alarm": 1.0,
        "count": 9.0,
        "loss": 3.375,
    }
    # One buffer per dtype (bool, float32, int32) plus the two entries left unpacked.
    assert len(jax.tree.leaves(out)) == 3 + 2
    assert len(jax.tree.leaves(jax.jit(_values)(x))) == 5  # the dict: one per entry
    assert not bool(step(jnp.float32(0.5))["alarm"])
    assert step._cache_size() == 1  # new values, no recompile


def test_values_read_on_device_and_through_vmap():
    out = scalars.pack({"b": jnp.float32(1.0), "a": jnp.float32(-2.0)})
    assert isinstance(out["a"], jax.Array) and float(out["a"]) == -2.0
    assert len(out) == 2 and "b" in out and "c" not in out
    batched = jax.vmap(lambda x: scalars.pack({"x": x, "twice": 2 * x}))(jnp.arange(3.0))
    np.testing.assert_array_equal(batched["twice"], [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(batched["x"], [0.0, 1.0, 2.0])


def test_an_empty_mapping_packs_to_nothing():
    out = jax.jit(lambda: scalars.pack({}))()
    assert len(out) == 0 and jax.tree.leaves(out) == []

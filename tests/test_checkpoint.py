"""Checkpoints: bit-identical round trip, keep-last-N with pinned steps."""

import jax
import numpy as np
import pytest
import small_shapes

from rftjax import models
from rftjax.checkpoint import Checkpointer
from rftjax.config import RLConfig
from rftjax.train.step import init_state

MODEL = small_shapes.MODEL


def _state(seed, algo="ppo"):
    _, params = models.create(MODEL, seed)
    return init_state(params, RLConfig(algo=algo, group_size=2), seed)


def test_save_restore_is_bit_identical(tmp_path):
    state = _state(0)
    # Non-trivial optimizer moments, so that their restore is checked too.
    state = state._replace(opt_state=jax.tree.map(lambda x: x + x.dtype.type(3), state.opt_state))
    meta = {"knobs": {"lr": 1e-4}, "data_cursor": 7}
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
    ckpt.save(7, state, meta)
    restored, restored_meta = ckpt.restore(None, _state(1))
    ckpt.close()
    assert restored_meta == meta
    leaves, restored_leaves = jax.tree.leaves(state), jax.tree.leaves(restored)
    assert len(leaves) == len(restored_leaves)
    for a, b in zip(leaves, restored_leaves, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(state) == jax.tree.structure(restored)


def test_keeps_last_n_and_pinned_steps(tmp_path):
    state = _state(0, algo="grpo")
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, {"step": step})
    ckpt.pin(2)
    for step in (4, 5, 6):
        ckpt.save(step, state, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    ckpt.close()
    # Pins survive a restart; unpinning lets the step go at the next save.
    again = Checkpointer(str(tmp_path), max_to_keep=2)
    assert again.pinned == [2]
    again.unpin(2)
    again.save(7, state, {"step": 7})
    again.wait()
    assert again.all_steps() == [6, 7]
    _, meta = again.restore(6, state)
    assert meta == {"step": 6}
    with pytest.raises(ValueError, match="kept steps: \\[6, 7\\]"):
        again.restore(2, state)
    again.close()

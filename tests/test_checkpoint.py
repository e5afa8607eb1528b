"""Checkpoints: bit-identical round trip, keep-last-N with pinned steps."""

import os
import re

import jax
import numpy as np
import pytest
import small_shapes

from rftjax import models
from rftjax.checkpoint import Checkpointer, CorruptCheckpoint, checksums
from rftjax.checkpoint.manager import damage
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


def _data_file(step_dir):
    """The largest array-data file of a saved step (Orbax OCDBT chunks)."""
    files = [
        os.path.join(root, f)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for f in names
        if os.path.basename(root) == "d"
    ]
    return max(files, key=os.path.getsize)


def _flip_middle_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _truncate_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble_meta(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        f.write('{"knobs": ')


def _damaged(step_dir, kind):
    """Damages a saved step; returns the sentence (a regex) its restore must give."""
    path = _data_file(step_dir)
    rel = re.escape(os.path.relpath(path, step_dir))
    size = os.path.getsize(path)
    if kind == "bit_flip":
        _flip_middle_byte(path)
        return (
            "the array data in state/ does not match the checksums written with it "
            "\\(1 array\\(s\\) differ: \\.\\S+; a flipped bit or a rewritten file\\)"
        )
    if kind == "truncated":
        _truncate_half(path)
        return f"file {rel} is truncated \\({size // 2:,} of {size:,} bytes\\)"
    if kind == "missing_file":
        os.remove(path)
        return f"file {rel} is missing"
    meta = os.path.join(step_dir, "meta", "metadata")
    size = os.path.getsize(meta)
    _garble_meta(step_dir)
    return f"file meta/metadata is (truncated|longer than saved) \\(10 of {size} bytes\\)"


@pytest.mark.parametrize("kind", ["bit_flip", "truncated", "missing_file", "garbled_meta"])
def test_corrupt_step_is_detected_and_latest_falls_back(tmp_path, kind):
    state = _state(0, algo="grpo")
    later = state._replace(step=state.step + 5)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3)
    ckpt.save(1, state, {"step": 1})
    ckpt.save(2, later, {"step": 2})
    ckpt.wait()
    expected = _damaged(str(tmp_path / "ckpt" / "2"), kind)
    # One sentence: which step, which file and what is wrong with it.
    with pytest.raises(CorruptCheckpoint, match=f"^checkpoint step 2 in .*: {expected}$"):
        ckpt.read_meta(2)
        ckpt.restore(2, state)
    step, restored, meta, skipped = ckpt.restore_latest(state)
    assert (step, meta) == (1, {"step": 1})
    ((bad, why),) = skipped
    assert bad == 2 and re.search(expected, why), why
    assert why.endswith("; restored step 1 instead") and "\n" not in why  # what came instead
    assert "tensorstore" not in why.lower() and len(why) - 2 * len(str(tmp_path)) < 300, why
    np.testing.assert_array_equal(np.asarray(restored.step), np.asarray(state.step))
    # The corrupt step is moved aside: not listed, kept for inspection, and step 2 can be
    # written again.
    assert ckpt.all_steps() == [1]
    assert len(os.listdir(str(tmp_path / "ckpt.corrupt"))) == 1
    ckpt.save(2, later, {"step": 2})
    ckpt.wait()
    assert ckpt.restore(2, state)[1] == {"step": 2}
    ckpt.close()


def test_damage_without_a_record_of_sizes_names_the_storage_error_line():
    inner = RuntimeError(
        'OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database: Requested byte range [7, 9) '
        'is not valid for value of size 8 [tensorstore_spec=\'{"driver": "zarr"}\']'
    )
    try:
        raise ValueError("Encountered error while reading array index") from inner
    except ValueError as e:
        error = e
    why = damage(None, {"a": 1}, error)
    assert why == (
        'it cannot be read (OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database: Requested '
        "byte range [7, 9) is not valid for value of size 8)"
    )
    # Sizes that match say nothing: the error's line again; a grown file is named.
    assert damage({"a": 1}, {"a": 1}, error) == why
    assert damage({"a": 1}, {"a": 3}, error) == "file a is longer than saved (3 of 1 bytes)"


def test_all_steps_corrupt_is_an_error_naming_them(tmp_path):
    state = _state(0, algo="grpo")
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, state, {"step": 1})
    ckpt.wait()
    _flip_middle_byte(_data_file(str(tmp_path / "ckpt" / "1")))
    with pytest.raises(CorruptCheckpoint, match="no checkpoint .* restores intact.*step 1"):
        ckpt.restore_latest(state)
    ckpt.close()


def test_checksums_see_one_bit():
    state = _state(0, algo="grpo")
    before = checksums(state)
    leaf = state.params["policy"]
    flat, tree = jax.tree.flatten(leaf)
    bits = np.asarray(flat[0]).view(np.uint32).copy()
    bits.flat[bits.size // 2] ^= 1
    flat[0] = jax.numpy.asarray(bits.view(np.float32))
    after = checksums(
        state._replace(params={**state.params, "policy": jax.tree.unflatten(tree, flat)})
    )
    assert sum(before[k] != after[k] for k in before) == 1


def test_checksums_compile_once_per_tree_structure():
    from rftjax.checkpoint import manager

    first, second = _state(0, algo="grpo"), _state(1, algo="grpo")
    checksums(first)
    size = manager._checksums._cache_size()
    assert checksums(second) != checksums(first)  # new values: new sums, same program
    assert manager._checksums._cache_size() == size

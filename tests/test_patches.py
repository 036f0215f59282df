"""Patchify, patch dropout and MAE masking on hand-built inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacophony_jax.audio import patches as P


def coded_logmel(batch: int, frames: int) -> np.ndarray:
    """logmel[b, t, f] = 1e5 b + 128 t + f: every value names its own position."""
    b, t, f = np.meshgrid(np.arange(batch), np.arange(frames), np.arange(128), indexing="ij")
    return (1e5 * b + 128 * t + f).astype(np.float32)


def sequence(batch: int, length: int, valid: list[int]):
    """Patches [B, N, 2] holding (row, position), indices of an 8-wide grid, prefix masks."""
    k = np.arange(length)
    patches = np.stack(np.broadcast_arrays(np.arange(batch)[:, None], k[None]), -1)
    time = np.broadcast_to(k // 8, (batch, length)).astype(np.int32)
    freq = np.broadcast_to(k % 8, (batch, length)).astype(np.int32)
    mask = k[None] < np.array(valid)[:, None]
    patches = jnp.asarray(patches, jnp.float32)
    return patches, jnp.asarray(time), jnp.asarray(freq), jnp.asarray(mask)


def test_num_patches():
    assert [P.num_patches(f) for f in (0, 15, 16, 33, 1000)] == [0, 0, 8, 16, 496]


def test_num_visible_for():
    assert P.num_visible_for(496, 0.8) == 99
    assert P.num_visible_for(10, 0.8) == 2  # 10 * (1 - 0.8) is 1.9999999999999996
    assert P.num_visible_for(3, 0.9) == 1  # at least one visible patch
    assert P.num_visible_for(4, 0.01) == 3  # at least one masked patch
    for ratio in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="mask_ratio"):
            P.num_visible_for(496, ratio)
    with pytest.raises(ValueError, match="at least 2 patches"):
        P.num_visible_for(1, 0.5)


def test_patchify_order_and_indices():
    logmel = coded_logmel(2, 40)  # 2 full time steps; frames 32..39 are dropped
    valid = np.ones((2, 40), bool)
    patches, time, freq, mask = jax.jit(P.patchify)(logmel, valid)
    assert patches.shape == (2, 16, 256) and time.dtype == freq.dtype == jnp.int32
    np.testing.assert_array_equal(time[1], np.repeat([0, 1], 8))
    np.testing.assert_array_equal(freq[0], np.tile(np.arange(8), 2))
    assert mask.all()
    patches = np.asarray(patches)
    for b in range(2):
        for k in range(16):
            for t in range(16):
                for f in (0, 7, 15):
                    frame, mel = (k // 8) * 16 + t, (k % 8) * 16 + f
                    assert patches[b, k, t * 16 + f] == 1e5 * b + 128 * frame + mel
    # Patch 9 (time 1, freq 1) starts at frame 16, mel bin 16: 128 * 16 + 16.
    assert patches[0, 9, 0] == 2064 and patches[0, 9, 17] == 2064 + 128 + 1


def test_patchify_mask_needs_all_16_frames():
    valid = np.ones((3, 48), bool)
    valid[0, 20:] = False  # time step 0 valid, 1 and 2 cut
    valid[1, 32:] = False  # exactly two full steps
    valid[2, 5] = False  # one bad frame spoils its step only
    _, _, _, mask = P.patchify(coded_logmel(3, 48), valid)
    np.testing.assert_array_equal(mask[0], np.repeat([True, False, False], 8))
    np.testing.assert_array_equal(mask[1], np.repeat([True, True, False], 8))
    np.testing.assert_array_equal(mask[2], np.repeat([False, True, True], 8))


def test_patchify_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logmel"):
        P.patchify(np.zeros((2, 32, 64), np.float32), np.ones((2, 32), bool))
    with pytest.raises(ValueError, match="frame_valid"):
        P.patchify(np.zeros((2, 32, 128), np.float32), np.ones((2, 31), bool))


dropout = jax.jit(P.patch_dropout, static_argnums=5)


def test_patch_dropout_keeps_valid_subset_in_order():
    seq = sequence(2, 16, valid=[16, 5])
    patches, time, freq, mask = dropout(jax.random.key(0), *seq, 6)
    assert patches.shape == (2, 6, 2) and mask.shape == (2, 6)
    position = np.asarray(patches[..., 1]).astype(int)
    np.testing.assert_array_equal(patches[..., 0], [[0] * 6, [1] * 6])
    # True indices travel with their patch.
    np.testing.assert_array_equal(time, position // 8)
    np.testing.assert_array_equal(freq, position % 8)
    # Row 0: six distinct valid patches in sequence order.
    assert mask[0].all() and np.all(np.diff(position[0]) > 0)
    # Row 1 has only 5 valid patches: all survive, in order, then one padding slot.
    np.testing.assert_array_equal(position[1, :5], np.arange(5))
    np.testing.assert_array_equal(mask[1], [True] * 5 + [False])


def test_patch_dropout_is_deterministic_and_uniform():
    seq = sequence(1, 16, valid=[12])
    first = dropout(jax.random.key(1), *seq, 4)
    again = dropout(jax.random.key(1), *seq, 4)
    other = dropout(jax.random.key(2), *seq, 4)
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])
    keys = jax.random.split(jax.random.key(3), 3000)
    kept = jax.vmap(lambda k: dropout(k, *seq, 4)[0][0, :, 1])(keys)
    counts = np.bincount(np.asarray(kept).astype(int).ravel(), minlength=16) / 3000
    np.testing.assert_allclose(counts[:12], 4 / 12, atol=0.04)  # std ~0.009
    assert not counts[12:].any()  # padding never survives while valid patches remain


def test_patch_dropout_noop_when_long_enough():
    seq = sequence(2, 16, valid=[16, 3])
    for size in (16, 20):
        out = P.patch_dropout(jax.random.key(0), *seq, size)
        for got, want in zip(out, seq, strict=True):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="max_patches"):
        P.patch_dropout(jax.random.key(0), *seq, 0)


masking = jax.jit(P.mae_mask, static_argnums=5)


def test_mae_mask_partitions_and_hides_padding():
    seq = sequence(2, 16, valid=[16, 10])
    out = masking(jax.random.key(0), *seq, 4)
    assert out.visible_patches.shape == (2, 4, 2) and out.masked_target.shape == (2, 12, 2)
    for b in range(2):
        visible = np.asarray(out.visible_index[b])
        masked = np.asarray(out.masked_index[b])
        assert sorted(np.concatenate([visible, masked])) == list(range(16))
        assert np.all(np.diff(visible) > 0)
        np.testing.assert_array_equal(out.visible_patches[b, :, 1], visible)
        np.testing.assert_array_equal(out.masked_target[b, :, 1], masked)
        np.testing.assert_array_equal(out.visible_time[b], visible // 8)
        np.testing.assert_array_equal(out.visible_freq[b], visible % 8)
        np.testing.assert_array_equal(out.masked_time[b], masked // 8)
        np.testing.assert_array_equal(out.masked_freq[b], masked % 8)
    assert out.visible_mask.all()
    # Row 1: visible patches are valid (< 10); the 6 valid masked ones come first
    # and count in the loss, the 6 padding patches follow with masked_mask False.
    assert np.all(np.asarray(out.visible_index[1]) < 10)
    np.testing.assert_array_equal(out.masked_mask[1], [True] * 6 + [False] * 6)
    np.testing.assert_array_equal(out.masked_index[1, 6:], np.arange(10, 16))
    assert out.masked_mask[0].all()


def test_mae_mask_is_deterministic_and_uniform():
    seq = sequence(1, 16, valid=[10])
    first = masking(jax.random.key(5), *seq, 3)
    again = masking(jax.random.key(5), *seq, 3)
    other = masking(jax.random.key(6), *seq, 3)
    np.testing.assert_array_equal(first.visible_index, again.visible_index)
    assert not np.array_equal(first.visible_index, other.visible_index)
    keys = jax.random.split(jax.random.key(7), 3000)
    visible = jax.vmap(lambda k: masking(k, *seq, 3).visible_index[0])(keys)
    counts = np.bincount(np.asarray(visible).ravel(), minlength=16) / 3000
    np.testing.assert_allclose(counts[:10], 3 / 10, atol=0.04)
    assert not counts[10:].any()  # padded patches are never visible


def test_mae_mask_with_a_key_per_example_does_not_depend_on_the_row():
    seq = sequence(3, 16, valid=[16, 10, 12])
    keys = jax.random.split(jax.random.key(9), 3)
    out = masking(keys, *seq, 4)
    order = np.array([2, 0, 1])
    moved = masking(keys[order], *(x[order] for x in seq), 4)
    np.testing.assert_array_equal(moved.visible_index, np.asarray(out.visible_index)[order])
    np.testing.assert_array_equal(moved.masked_mask, np.asarray(out.masked_mask)[order])
    # One key for the batch: a row's mask changes with its place.
    one = masking(jax.random.key(9), *seq, 4)
    shifted = masking(jax.random.key(9), *(x[order] for x in seq), 4)
    assert not np.array_equal(shifted.visible_index, np.asarray(one.visible_index)[order])


def test_mae_mask_with_too_few_valid_patches():
    out = P.mae_mask(jax.random.key(0), *sequence(1, 16, valid=[2]), 4)
    np.testing.assert_array_equal(out.visible_mask[0], [True, True, False, False])
    assert not out.masked_mask.any()
    with pytest.raises(ValueError, match="num_visible"):
        P.mae_mask(jax.random.key(0), *sequence(1, 16, valid=[2]), 16)


def test_mae_mask_hides_the_same_share_of_a_short_clip():
    # V = 4 slots of 16 at ratio 0.75. Row 1 has 10 valid patches: 2 shown (not 4),
    # the other 8 masked and scored; row 2 has 2: 1 shown, 1 masked.
    seq = sequence(3, 16, valid=[16, 10, 2])
    masking_at = jax.jit(P.mae_mask, static_argnums=(5, 6))
    for key in range(5):
        out = masking_at(jax.random.key(key), *seq, 4, 0.75)
        assert out.visible_patches.shape == (3, 4, 2) and out.masked_target.shape == (3, 12, 2)
        for b, (valid, shown) in enumerate([(16, 4), (10, 2), (2, 1)]):
            vis = np.asarray(out.visible_index[b])[np.asarray(out.visible_mask[b])]
            hid = np.asarray(out.masked_index[b])[np.asarray(out.masked_mask[b])]
            assert len(vis) == shown and len(hid) == valid - shown
            assert sorted(np.concatenate([vis, hid])) == list(range(valid))
            np.testing.assert_array_equal(out.masked_target[b, :len(hid), 1], hid)
            # Empty visible slots carry no patch: the encoder cannot see a masked one.
            assert not np.asarray(out.visible_patches[b])[~np.asarray(out.visible_mask[b])].any()
    assert P.visible_counts(16, 0.75) == [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    counts = P.visible_counts(496, 0.8)
    assert counts[496] == P.num_visible_for(496, 0.8) == 99 and counts[248] == 49
    hidden = [n - k for n, k in enumerate(counts)]
    assert all(np.diff(counts) >= 0) and all(np.diff(hidden) >= 0)
    with pytest.raises(ValueError, match="num_visible=6 is not num_visible_for"):
        P.mae_mask(jax.random.key(0), *seq, 6, 0.75)  # the masked group would be short

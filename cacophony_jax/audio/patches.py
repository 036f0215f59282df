"""Log-mel patches: patchify, patch dropout and MAE masking, in jnp.

A clip's log-mel [F, 128] is cut into 16 x 16 patches (16 frames x 16 mel bins), 8
frequency patches per time step; trailing frames that do not fill a patch are
dropped. A patch vector is time-major inside the patch (element t * 16 + f) and the
sequence is time-major (patch k has time index k // 8 and frequency index k % 8).
Every sequence travels with its (time index, frequency index, valid mask), so
patches can be dropped or reordered and still be placed correctly by the encoder.

All functions are jit-able with static shapes and deterministic given a PRNG key.
Subsets are drawn by ranking one uniform draw per patch, with padding patches ranked
last; the survivors of each group are then put back in sequence order, valid first.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

PATCH = 16
FREQ_PATCHES = 8
PATCH_DIM = PATCH * PATCH
N_MELS = PATCH * FREQ_PATCHES


class MaskedPatches(NamedTuple):
    """A patch sequence split into the MAE's visible and masked groups.

    Within each group patches are in sequence order with valid patches first.
    Entries whose mask is False are padding and must be ignored (attention key
    padding for the visible group, the loss for the masked group).

    Attributes:
      visible_patches: float [B, V, 256] patches the encoder sees.
      visible_time: int32 [B, V] time index of each visible patch.
      visible_freq: int32 [B, V] frequency index of each visible patch.
      visible_mask: bool [B, V] True for real (non-padding) patches.
      visible_index: int32 [B, V] position of each visible patch in the input.
      masked_time: int32 [B, N - V] time index of each masked patch.
      masked_freq: int32 [B, N - V] frequency index of each masked patch.
      masked_mask: bool [B, N - V] True where the patch counts in the loss.
      masked_index: int32 [B, N - V] position of each masked patch in the input.
      masked_target: float [B, N - V, 256] the masked patches (reconstruction target).
    """

    visible_patches: jax.Array
    visible_time: jax.Array
    visible_freq: jax.Array
    visible_mask: jax.Array
    visible_index: jax.Array
    masked_time: jax.Array
    masked_freq: jax.Array
    masked_mask: jax.Array
    masked_index: jax.Array
    masked_target: jax.Array


def num_patches(num_frames: int) -> int:
    """Patches of a clip with `num_frames` frames: (num_frames // 16) * 8.

    Args:
      num_frames: log-mel frames of the clip.

    Returns:
      The patch count (a 10 s clip, 1000 frames, gives 496).
    """
    return (int(num_frames) // PATCH) * FREQ_PATCHES


def num_visible_for(num_patches: int, mask_ratio: float) -> int:
    """Visible patches of an MAE sequence: floor(num_patches * (1 - mask_ratio)).

    Args:
      num_patches: length of the patch sequence.
      mask_ratio: fraction of patches to mask, in (0, 1).

    Returns:
      A Python int in [1, num_patches - 1].

    Raises:
      ValueError: if mask_ratio is outside (0, 1) or the sequence has < 2 patches.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if num_patches < 2:
        raise ValueError(
            f"MAE masking needs at least 2 patches, got {num_patches}; use longer clips"
        )
    # The epsilon keeps e.g. 10 * (1 - 0.8) = 1.9999999999999996 from flooring to 1.
    visible = math.floor(num_patches * (1.0 - mask_ratio) + 1e-6)
    return min(max(visible, 1), num_patches - 1)


def patchify(
    logmel: jax.Array, frame_valid: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Cuts a log-mel batch into time-major 16 x 16 patches.

    Args:
      logmel: float [B, F, 128].
      frame_valid: bool [B, F].

    Returns:
      patches: [B, N, 256] with N = (F // 16) * 8, element t * 16 + f of a patch is
        frame t, mel bin f within it.
      time_idx: int32 [B, N], k // 8.
      freq_idx: int32 [B, N], k % 8.
      mask: bool [B, N], True iff all 16 frames of the patch are valid.

    Raises:
      ValueError: if the shapes do not match [B, F, 128] and [B, F].
    """
    if logmel.ndim != 3 or logmel.shape[-1] != N_MELS:
        raise ValueError(f"patchify expects logmel [batch, frames, {N_MELS}], got {logmel.shape}")
    if frame_valid.shape != logmel.shape[:2]:
        raise ValueError(
            f"patchify expects frame_valid of shape {logmel.shape[:2]}, got {frame_valid.shape}"
        )
    batch, frames, _ = logmel.shape
    steps = frames // PATCH
    x = logmel[:, : steps * PATCH].reshape(batch, steps, PATCH, FREQ_PATCHES, PATCH)
    # [B, time, t, freq, f] -> [B, time, freq, t, f]: time-major patches of time-major pixels.
    patches = x.transpose(0, 1, 3, 2, 4).reshape(batch, steps * FREQ_PATCHES, PATCH_DIM)
    step_valid = frame_valid[:, : steps * PATCH].reshape(batch, steps, PATCH).all(axis=-1)
    mask = jnp.repeat(step_valid, FREQ_PATCHES, axis=1)
    k = jnp.arange(steps * FREQ_PATCHES, dtype=jnp.int32)
    time_idx = jnp.broadcast_to(k // FREQ_PATCHES, (batch, k.shape[0]))
    freq_idx = jnp.broadcast_to(k % FREQ_PATCHES, (batch, k.shape[0]))
    return patches, time_idx, freq_idx, mask


def _random_rank(rng: jax.Array, mask: jax.Array) -> jax.Array:
    """Patch positions [B, N] in a uniformly random order, padding patches last.
    `rng`: one key, or one typed key per example ([B]: each row's order is its own)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1:
        draw = jax.vmap(lambda key: jax.random.uniform(key, mask.shape[1:]))(rng)
    else:
        draw = jax.random.uniform(rng, mask.shape)
    return jnp.argsort(jnp.where(mask, draw, 2.0), axis=-1).astype(jnp.int32)


def _in_sequence_order(index: jax.Array, valid: jax.Array,
                       length: int) -> tuple[jax.Array, jax.Array]:
    """Sorts chosen positions [B, K] (each < length) into sequence order, valid first.

    Returns the sorted positions and their validity.
    """
    # One sort on a combined key: position, plus `length` for invalid ones.
    key = jnp.sort(index + length * (~valid).astype(index.dtype), axis=-1)
    return key % length, key < length


def gather_rows(values: jax.Array, index: jax.Array) -> jax.Array:
    """values [B, N, ...] at positions index [B, K] -> [B, K, ...]."""
    index = index.reshape(index.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def patch_dropout(
    rng: jax.Array,
    patches: jax.Array,
    time_idx: jax.Array,
    freq_idx: jax.Array,
    mask: jax.Array,
    max_patches: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Keeps a uniformly random subset of at most `max_patches` valid patches.

    Survivors keep their true indices and their sequence order; when a clip has
    fewer valid patches than `max_patches` all of them survive and the remaining
    slots are padding (mask False).

    Args:
      rng: PRNG key.
      patches: [B, N, D].
      time_idx: int32 [B, N].
      freq_idx: int32 [B, N].
      mask: bool [B, N], True on valid patches.
      max_patches: static length N' of the result.

    Returns:
      (patches, time_idx, freq_idx, mask) with length N' = max_patches, or the inputs
      unchanged when max_patches >= N.

    Raises:
      ValueError: if max_patches < 1.
    """
    if max_patches < 1:
        raise ValueError(f"max_patches must be at least 1, got {max_patches}")
    if max_patches >= patches.shape[1]:
        return patches, time_idx, freq_idx, mask
    chosen = _random_rank(rng, mask)[:, :max_patches]
    index, valid = _in_sequence_order(chosen, jnp.take_along_axis(mask, chosen, axis=1),
                                      mask.shape[1])
    return (
        gather_rows(patches, index),
        gather_rows(time_idx, index),
        gather_rows(freq_idx, index),
        valid,
    )


def visible_counts(num_patches: int, mask_ratio: float) -> list[int]:
    """Visible patches of an example with n valid patches, for n = 0 .. num_patches.

    `num_visible_for(n, mask_ratio)` for n >= 2 (1 below): the same share is hidden
    from a short clip as from a full one. Non-decreasing in n, so an example with fewer
    valid patches never has more visible or more masked ones than a full example.
    """
    return [1] + [num_visible_for(n, mask_ratio) if n >= 2 else 1
                  for n in range(1, num_patches + 1)]


def mae_mask(
    rng: jax.Array,
    patches: jax.Array,
    time_idx: jax.Array,
    freq_idx: jax.Array,
    mask: jax.Array,
    num_visible: int,
    mask_ratio: float | None = None,
) -> MaskedPatches:
    """Splits patches into a visible group and a masked group for the MAE.

    The visible patches are a uniformly random subset of the valid patches; padding
    patches go to the masked group with masked_mask False, so they never count in
    the loss. With `mask_ratio`, an example with n valid patches shows
    `num_visible_for(n, mask_ratio)` of them (a short clip is masked at the same
    ratio as a full one) and its other visible slots are empty (visible_mask False,
    zero patches); without it every example shows up to `num_visible`. Either way
    the shapes are static: V visible and N - V masked entries.

    Args:
      rng: PRNG key, or typed keys [B], one per example (jax.random.key): then an
        example's mask does not depend on the rows around it.
      patches: [B, N, D].
      time_idx: int32 [B, N].
      freq_idx: int32 [B, N].
      mask: bool [B, N], True on valid patches.
      num_visible: static number of visible slots V, 1 <= V < N
        (`num_visible_for(N, mask_ratio)`).
      mask_ratio: the share of each example's valid patches to mask, or None.

    Returns:
      MaskedPatches with V visible and N - V masked entries.

    Raises:
      ValueError: if num_visible is outside [1, N - 1].
    """
    length = patches.shape[1]
    if not 1 <= num_visible < length:
        raise ValueError(
            f"num_visible must be in [1, {length - 1}] for {length} patches, got {num_visible}"
        )
    if mask_ratio is not None and num_visible != num_visible_for(length, mask_ratio):
        raise ValueError(f"num_visible={num_visible} is not num_visible_for({length}, "
                         f"{mask_ratio}) = {num_visible_for(length, mask_ratio)}: the masked "
                         "group would not hold every hidden patch")
    rank = _random_rank(rng, mask)  # valid patches first, in random order
    chosen = rank[:, :num_visible]
    chosen_valid = jnp.take_along_axis(mask, chosen, axis=1)
    if mask_ratio is None:
        hidden = rank[:, num_visible:]
    else:
        table = jnp.asarray(visible_counts(length, mask_ratio), jnp.int32)
        shown = jnp.minimum(table[jnp.sum(mask, axis=1)], num_visible)  # [B]
        slots = jnp.arange(num_visible, dtype=jnp.int32)
        chosen_valid &= slots < shown[:, None]
        # The masked group starts right after the shown patches in the ranking: it
        # holds every other valid patch (at most N - V of them, as counts only grow).
        start = shown[:, None] + jnp.arange(length - num_visible, dtype=jnp.int32)
        hidden = jnp.take_along_axis(rank, jnp.minimum(start, length - 1), axis=1)
    visible_index, visible_mask = _in_sequence_order(chosen, chosen_valid, length)
    masked_index, masked_mask = _in_sequence_order(
        hidden, jnp.take_along_axis(mask, hidden, axis=1), length)
    visible_patches = gather_rows(patches, visible_index)
    return MaskedPatches(
        # An empty slot may hold a patch that is masked: the encoder must not see it.
        visible_patches=jnp.where(visible_mask[..., None], visible_patches, 0),
        visible_time=gather_rows(time_idx, visible_index),
        visible_freq=gather_rows(freq_idx, visible_index),
        visible_mask=visible_mask,
        visible_index=visible_index,
        masked_time=gather_rows(time_idx, masked_index),
        masked_freq=gather_rows(freq_idx, masked_index),
        masked_mask=masked_mask,
        masked_index=masked_index,
        masked_target=gather_rows(patches, masked_index),
    )

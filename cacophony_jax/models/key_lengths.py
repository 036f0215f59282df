"""Key-padding masks as lengths, the form cuDNN's fastest attention kernels take.

Given a boolean mask, JAX hands cuDNN an additive bias of the full [B, 1, Q, S]
extent, and cuDNN runs its bias kernel, which reads that tensor in every head's
tiles. A mask whose valid positions come first is described exactly by one length
per example; given lengths (``key_value_seq_lengths``) cuDNN runs its padding-mask
kernel instead, with no bias tensor at all. Audio patch sequences are laid out
valid-first (`audio/patches.py`): the audio stacks and the caption decoder's
attention to the audio take their masks as lengths. The MAE decoder's [visible,
masked] sequence is not valid-first, and is put in that order for its stack by a
permutation (`valid_first_order`, `permute_rows`). Text is padded at the end, so
the text towers' causal self-attention takes lengths too (cuDNN's padding-causal
kernel), except in cached decoding.

`attention_ops.attend` accepts either form: int32 lengths [B] or a boolean mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cacophony_jax.audio.patches import gather_rows


def valid_lengths(mask: jax.Array) -> jax.Array:
    """[B, S] validity (nonzero on valid positions, which come first) -> int32 [B]."""
    return jnp.sum(mask.astype(bool).astype(jnp.int32), axis=-1)


def prefix_mask(lengths: jax.Array, length: int) -> jax.Array:
    """int32 [B] lengths -> boolean key-padding mask [B, 1, 1, length]."""
    return (jnp.arange(length)[None, :] < lengths[:, None])[:, None, None, :]


def valid_first_order(mask: jax.Array) -> jax.Array:
    """int32 [B, S] positions that put each row's valid entries first, in order.

    A stable order: valid positions keep their relative order, then the invalid ones.
    """
    length = mask.shape[-1]
    key = jnp.arange(length, dtype=jnp.int32) + length * (~mask.astype(bool)).astype(jnp.int32)
    return jnp.argsort(key, axis=-1).astype(jnp.int32)


@jax.custom_vjp
def permute_rows(x: jax.Array, order: jax.Array) -> jax.Array:
    """x [B, S, ...] with each row's positions reordered: out[b, i] = x[b, order[b, i]].

    `order` must be a permutation of 0..S-1 in every row. Its gradient is the inverse
    permutation's gather, not the scatter-add that a general gather's gradient is.
    """
    return gather_rows(x, order)


def _permute_fwd(x: jax.Array, order: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gather_rows(x, order), order


def _permute_bwd(order: jax.Array, grad: jax.Array) -> tuple[jax.Array, None]:
    return gather_rows(grad, jnp.argsort(order, axis=-1)), None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def inverse_order(order: jax.Array) -> jax.Array:
    """The permutation that undoes `order` row by row (``permute_rows`` with it)."""
    return jnp.argsort(order, axis=-1).astype(jnp.int32)

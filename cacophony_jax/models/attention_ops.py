"""Scaled dot-product attention for the towers: masks, key lengths, and cuDNN's rules.

`attend` takes a boolean mask or int32 key lengths (`key_lengths`) and runs XLA's
attention or cuDNN's flash attention through ``jax.nn.dot_product_attention``,
shaping each call to what cuDNN accepts: lengths go to its padding (or
padding-causal) kernel, boolean masks become a full-extent bias with even lengths,
and single-query calls stay on XLA. `even_length_for_cudnn` pads an odd stack once
instead of every call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cacophony_jax.models import axes, key_lengths

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    implementation: str,
    causal: bool = False,
) -> jax.Array:
    """Scaled (1/sqrt(head_dim)) dot-product attention with a mask.

    Args:
      query: [B, Q, heads, head_dim].
      key: [B, S, heads, head_dim].
      value: [B, S, heads, head_dim].
      mask: boolean, broadcastable to [B, heads, Q, S] (True attends), or int32
        lengths [B]: every query attends to keys 0 .. length - 1 (`key_lengths`; the
        caller guarantees that the valid keys come first). cuDNN gets lengths as
        lengths (its padding-mask kernel), XLA as the equal boolean mask.
      implementation: "xla", "cudnn" or "auto" (let JAX choose).
      causal: with lengths only: query i also sees only keys 0 .. i (a causal
        self-attention over a valid-first sequence; cuDNN's padding-causal kernel).
        A boolean mask carries any causality itself.

    Returns:
      [B, Q, heads, head_dim] in the query's dtype.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention={implementation!r} is not supported; use one of "
            f"{ATTENTION_IMPLEMENTATIONS}"
        )
    lengths = mask is not None and jnp.issubdtype(mask.dtype, jnp.integer)
    if causal and not lengths:
        raise ValueError("causal=True takes the mask as int32 key lengths [B]; a boolean "
                         "mask carries its causality itself")
    impl = None if implementation == "auto" else implementation
    if impl == "cudnn":
        if query.shape[1] == 1:
            # One query row (attention pools, cached decoding steps) has nothing for a
            # fused kernel to fuse, and cuDNN's flash attention rejects it.
            impl = "xla"
        elif lengths:
            return _cudnn_prefix_attention(query, key, value, mask, causal)
        elif mask is not None:
            return _cudnn_masked_attention(query, key, value, mask)
    if lengths:
        mask = key_lengths.prefix_mask(mask, key.shape[1])
        if causal:
            mask = mask & jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=impl)


def _cudnn_prefix_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, lengths: jax.Array, causal: bool
) -> jax.Array:
    """Attention to each example's first `lengths` keys through cuDNN's padding kernel
    (padding-causal kernel when `causal`).

    Odd lengths get one padding position as in `_cudnn_masked_attention` (a key past
    every length; a query whose output is dropped). A length of 0 (an all-padding
    example, whose outputs nobody reads) is raised to 1 so that no softmax is empty.
    """
    q_len, s_len = query.shape[1], key.shape[1]
    pad_q, pad_s = q_len % 2, s_len % 2
    if pad_q or pad_s:
        query = jnp.pad(query, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
        key = jnp.pad(key, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
        value = jnp.pad(value, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
    lengths = jnp.clip(lengths.astype(jnp.int32), 1, s_len)
    out = jax.nn.dot_product_attention(query, key, value, key_value_seq_lengths=lengths,
                                       is_causal=causal, implementation="cudnn")
    return out[:, :q_len]


def _cudnn_masked_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array
) -> jax.Array:
    """Masked attention in the form cuDNN's flash attention accepts.

    cuDNN takes the mask as a bias of full [B|1, H|1, Q, S] extent, and in training
    with a bias it needs even Q and S. Odd lengths (the MAE encoder's 99 visible
    patches) get one padding position: a key no query attends to, and a query that
    attends to every real key (so its softmax is finite) and whose output is
    dropped, so that it sends no gradient back either.
    """
    q_len, s_len = query.shape[1], key.shape[1]
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, s_len))
    pad_q, pad_s = q_len % 2, s_len % 2
    if pad_q or pad_s:
        query = jnp.pad(query, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
        key = jnp.pad(key, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
        value = jnp.pad(value, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, pad_s)))
        if pad_q:
            mask = mask.at[:, :, q_len, :s_len].set(True)
    out = jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn")
    return out[:, :q_len]


def even_length_for_cudnn(
    x: jax.Array, mask: jax.Array, implementation: str
) -> tuple[jax.Array, jax.Array]:
    """Pads a key-padding-masked [B, N, D] sequence by one position when N is odd.

    cuDNN's masked attention needs even lengths, and `attend` pads every call's
    query, key and value for it. A stack of blocks is cheaper padded once: the extra
    position is a masked key (no query sees it) and its own output is sliced off after
    the stack, so the real positions' outputs and gradients are unchanged. Does nothing
    for other implementations or even lengths.

    Args:
      x: [B, N, D] block input.
      mask: [B, N] validity (nonzero on real positions).
      implementation: the attention implementation of the stack.

    Returns:
      (x, mask), with N + 1 positions where padded; slice the stack's output back to N.
    """
    if implementation != "cudnn" or x.shape[1] % 2 == 0:
        return x, mask
    x = axes.constrain(jnp.pad(x, ((0, 0), (0, 1), (0, 0))), axes.BLE)
    return x, jnp.pad(mask, ((0, 0), (0, 1)))

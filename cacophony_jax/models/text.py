"""Causal RoBERTa-shaped text tower and the CoCa-style captioning decoder.

Numerics follow the release: post-LayerNorm blocks (epsilon from TextConfig),
exact (erf) GELU, attention scaled by 1/sqrt(head_dim) under a causal mask
combined with the key-padding mask, position ids 0, 1, 2, ... (not offset by the
pad id), and token-type embedding 0 added to every token.

Both modules take ``decode=True`` for incremental decoding: keys/values of past
tokens live in the 'cache' collection (``models/decoding.py`` drives it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from cacophony_jax.models import axes, key_lengths
from cacophony_jax.models.audio_encoder import key_padding_mask
from cacophony_jax.models.layers import (
    BERT_NORMAL,
    MLP,
    Attention,
    Dtype,
    dense,
    layer_norm,
    partitioned,
)
from cacophony_jax.models.stack import apply_stack
from cacophony_jax.models.variants import TextConfig

gelu_exact = functools.partial(nn.gelu, approximate=False)


def causal_padding_mask(mask: jax.Array) -> jax.Array:
    """Causal mask combined with a key-padding mask.

    Args:
      mask: [B, T], nonzero on real tokens.

    Returns:
      Boolean [B, 1, T, T]: query i attends key j iff j <= i and token j is real.
    """
    length = mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None, None] & key_padding_mask(mask)


def self_attention_mask(mask: jax.Array, attention: str, decode: bool) -> jax.Array:
    """The text blocks' self-attention mask: int32 lengths [B] for cuDNN's
    padding-causal kernel (real tokens come first), else `causal_padding_mask`.

    Cached decoding keeps the boolean form: its blocks build their own masks from
    the cache index after the first call.
    """
    if attention == "cudnn" and not decode:
        return key_lengths.valid_lengths(mask)
    return causal_padding_mask(mask)


class TextBlock(nn.Module):
    """Post-LN block: LN(x + SelfAttn(x)) [; LN(x + CrossAttn(x, memory))]; LN(x + MLP(x))."""

    num_heads: int
    mlp_dim: int
    eps: float
    cross: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    fuse_qkv: bool = False
    decode: bool = False
    scanned: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        self_mask: jax.Array,
        memory: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, None]:
        """Applies the block to [B, T, H]; masks are boolean [B, 1, T|1, T|S] or int32
        key lengths [B] (`attention_ops.attend`; the self-attention is causal over them)."""
        attn = functools.partial(Attention, self.num_heads, dtype=self.dtype,
                                 implementation=self.attention, fuse_qkv=self.fuse_qkv,
                                 kernel_init=BERT_NORMAL,
                                 decode=self.decode)
        norm = functools.partial(layer_norm, self.eps, dtype=self.dtype)
        x = axes.constrain(x, axes.BLE)
        x = norm(name="attn_norm")(x + attn(causal=True, name="attn")(x, x, self_mask))
        if self.cross:
            h = attn(cross=True, name="cross_attn")(x, memory, memory_mask)
            x = norm(name="cross_norm")(x + h)
        h = MLP(self.mlp_dim, gelu_exact, dtype=self.dtype, kernel_init=BERT_NORMAL,
                name="mlp")(x)
        x = norm(name="mlp_norm")(x + h)
        return (x, None) if self.scanned else x


class TextEncoder(nn.Module):
    """Token ids -> causal contextual states (CoCa's unimodal text decoder)."""

    config: TextConfig
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention: str = "xla"
    fuse_qkv: bool = False

    @nn.compact
    def __call__(
        self, ids: jax.Array, mask: jax.Array, deterministic: bool = True, decode: bool = False
    ) -> jax.Array:
        """Encodes token ids causally.

        Args:
          ids: [B, T] int token ids (bos ... eos pad ...).
          mask: [B, T], nonzero on real tokens, which come first (a key-padding
            mask; with cuDNN attention it travels as lengths).
          deterministic: unused (no dropout); kept for a uniform tower API.
          decode: incremental mode; ``ids`` is the next chunk after the cached
            prefix (the first call with the full length only sizes the cache).

        Returns:
          [B, T, hidden] states.
        """
        del deterministic
        cfg = self.config
        embed = functools.partial(nn.Embed, dtype=self.dtype, param_dtype=jnp.float32)
        tokens = embed(cfg.vocab_size, cfg.hidden, name="token_embed",
                       embedding_init=partitioned(BERT_NORMAL, (axes.VOCAB, axes.EMBED)))
        positions = embed(cfg.max_positions, cfg.hidden, name="position_embed",
                          embedding_init=partitioned(BERT_NORMAL, (None, axes.EMBED)))
        token_type = self.param("type_embed", partitioned(BERT_NORMAL, (axes.EMBED,)),
                                (cfg.hidden,), jnp.float32)

        length = ids.shape[1]
        start = 0
        if decode:
            initialised = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if initialised:
                start = position.value
                position.value = start + length
        pos_ids = start + jnp.arange(length)[None, :]
        x = axes.constrain(axes.constrain_lookup(tokens(ids)), axes.BLE)
        x = x + positions(pos_ids) + token_type.astype(self.dtype)
        x = layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="embed_norm")(x)

        fields = dict(num_heads=cfg.heads, mlp_dim=cfg.mlp, eps=cfg.layer_norm_eps,
                      dtype=self.dtype, attention=self.attention, fuse_qkv=self.fuse_qkv,
                      decode=decode)
        return apply_stack(TextBlock, fields, x,
                           self_attention_mask(mask, self.attention, decode),
                           num_layers=cfg.layers, scan=self.scan,
                           remat="none" if decode else self.remat)


class CaptionDecoder(nn.Module):
    """Causal text states + cross-attention to audio states -> float32 vocab logits."""

    config: TextConfig
    num_layers: int
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention: str = "xla"
    fuse_qkv: bool = False

    @nn.compact
    def __call__(
        self,
        text_states: jax.Array,
        text_mask: jax.Array,
        audio_states: jax.Array,
        audio_mask: jax.Array,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """Predicts the next token at every text position.

        Args:
          text_states: [B, T, H] text-tower outputs.
          text_mask: [B, T], nonzero on real tokens, which come first.
          audio_states: [B, N, D] audio-encoder outputs.
          audio_mask: [B, N], nonzero on real patches, which come first (with cuDNN
            attention it travels as lengths).
          deterministic: unused (no dropout).
          decode: incremental mode (cached self-attention; audio keys/values
            computed on the first call and reused).

        Returns:
          [B, T, vocab] float32 logits.
        """
        del deterministic
        cfg = self.config
        fields = dict(num_heads=cfg.heads, mlp_dim=cfg.mlp, eps=cfg.layer_norm_eps, cross=True,
                      dtype=self.dtype, attention=self.attention, fuse_qkv=self.fuse_qkv,
                      decode=decode)
        # Audio states are valid-first: cuDNN takes their mask as lengths (key_lengths).
        memory_mask = (key_lengths.valid_lengths(audio_mask) if self.attention == "cudnn"
                       else key_padding_mask(audio_mask))
        x = apply_stack(TextBlock, fields, text_states,
                        self_attention_mask(text_mask, self.attention, decode),
                        audio_states, memory_mask,
                        num_layers=self.num_layers, scan=self.scan,
                        remat="none" if decode else self.remat)
        logits = dense(cfg.vocab_size, (axes.EMBED, axes.VOCAB), dtype=self.dtype,
                       kernel_init=BERT_NORMAL, name="logits")(x)
        return logits.astype(jnp.float32)

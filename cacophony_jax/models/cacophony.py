"""Stage 2: the dual audio-text model with attention pooling and a captioning decoder.

Audio embedding: one learned query split into ``audio_pool_heads`` heads attends
over the audio states (key-padding mask), then a Dense to the projection width.
Text embedding: one learned single-head query attends over the causal text states
(padding masked), then ``text_proj``. Embeddings are returned unnormalised; the
loss normalises them. ``logit_scale`` is a scalar parameter (the loss uses its exp).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cacophony_jax.models import axes
from cacophony_jax.models.audio_encoder import AudioEncoder
from cacophony_jax.models.layers import (
    BERT_NORMAL,
    XAVIER,
    Dtype,
    HeadProjection,
    Initializer,
    attend,
    dense,
    partitioned,
    project_heads,
)
from cacophony_jax.models.text import CaptionDecoder, TextEncoder
from cacophony_jax.models.variants import CacophonyConfig

LOGIT_BIAS_INIT = -10.0


class AttentionPool(nn.Module):
    """One learned query attends over a sequence; optional Dense on the result."""

    num_heads: int
    out_features: int | None = None
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    fuse_qkv: bool = False
    kernel_init: Initializer = XAVIER

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Pools [B, N, D] with validity [B, N] into [B, D] (or [B, out_features]).

        The query is not projected; keys and values are, per head; scores are
        scaled by 1/sqrt(head_dim).
        """
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by {self.num_heads} pool heads")
        head_dim = width // self.num_heads
        query = self.param("query", partitioned(nn.initializers.normal(0.02), (axes.EMBED,)),
                           (width,), jnp.float32)

        params = [HeadProjection(self.num_heads, head_dim, self.kernel_init, name=name)(width)
                  for name in ("key", "value")]
        if self.fuse_qkv:
            key, value = project_heads(x, params, self.dtype)
        else:
            key, value = (project_heads(x, [p], self.dtype)[0] for p in params)
        # Split by batch as the input is: otherwise the propagation may follow the
        # kernels' FSDP split of the width and gather the input whole (data x fsdp).
        key, value = (axes.constrain(t, (axes.BATCH, axes.LENGTH, None, None))
                      for t in (key, value))
        query = jnp.broadcast_to(query.astype(self.dtype).reshape(1, 1, self.num_heads, head_dim),
                                 (x.shape[0], 1, self.num_heads, head_dim))
        pooled = attend(query, key, value, mask.astype(bool)[:, None, None, :], self.attention)
        pooled = pooled.reshape(x.shape[0], width)
        if self.out_features is None:
            return pooled
        return dense(self.out_features, (axes.EMBED, None), dtype=self.dtype,
                     kernel_init=self.kernel_init, name="out")(pooled)


class Cacophony(nn.Module):
    """Audio tower, causal text tower, pooling/projections, captioning decoder, logit scale.

    Top-level parameters: audio_encoder, audio_pool, text_encoder, text_pool,
    text_proj, decoder, logit_scale (and logit_bias with ``sigmoid_bias``).
    """

    config: CacophonyConfig
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    drop_path: float = 0.0
    attention: str = "xla"
    fuse_qkv: bool = False
    fused_norm: bool = False  # the audio encoder's (pre-LN) LayerNorms only

    def setup(self) -> None:
        cfg = self.config
        self.audio_encoder = AudioEncoder(cfg.audio, dtype=self.dtype, scan=self.scan,
                                          remat=self.remat, drop_path=self.drop_path,
                                          attention=self.attention, fuse_qkv=self.fuse_qkv,
                                          fused_norm=self.fused_norm)
        # Pools run one query, where a fused kernel gains nothing, and the text pool's
        # single full-width head exceeds cuDNN's head-size limit: they always use XLA.
        self.audio_pool = AttentionPool(cfg.audio_pool_heads, cfg.projection, dtype=self.dtype,
                                        fuse_qkv=self.fuse_qkv)
        self.text_encoder = TextEncoder(cfg.text, dtype=self.dtype, scan=self.scan,
                                        remat=self.remat, attention=self.attention,
                                        fuse_qkv=self.fuse_qkv)
        self.text_pool = AttentionPool(1, None, dtype=self.dtype, kernel_init=BERT_NORMAL,
                                       fuse_qkv=self.fuse_qkv)
        self.text_proj = dense(cfg.projection, (axes.EMBED, None), dtype=self.dtype,
                               kernel_init=BERT_NORMAL)
        self.decoder = CaptionDecoder(cfg.text, cfg.decoder_layers, dtype=self.dtype,
                                      scan=self.scan, remat=self.remat, attention=self.attention,
                                      fuse_qkv=self.fuse_qkv)
        self.logit_scale = self.param(
            "logit_scale", partitioned(nn.initializers.constant(cfg.logit_scale_init), ()), (),
            jnp.float32)
        if cfg.sigmoid_bias:
            self.logit_bias = self.param(
                "logit_bias", partitioned(nn.initializers.constant(LOGIT_BIAS_INIT), ()), (),
                jnp.float32)

    def encode_audio(
        self,
        patches: jax.Array,
        time_idx: jax.Array,
        freq_idx: jax.Array,
        mask: jax.Array,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """Audio states and the (unnormalised) audio embedding.

        Args:
          patches: [B, N, patch_dim]; time_idx, freq_idx: [B, N] ints; mask: [B, N],
          nonzero on real patches, which come first (AudioEncoder).
          deterministic: disables drop-path (needs a 'dropout' rng otherwise).

        Returns:
          (states [B, N, D], embedding [B, projection] float32).
        """
        states = self.audio_encoder(patches, time_idx, freq_idx, mask, deterministic)
        embedding = self.audio_pool(states, mask)
        return states, embedding.astype(jnp.float32)

    def encode_text(
        self, ids: jax.Array, mask: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Causal text states and the (unnormalised) text embedding.

        Args:
          ids: [B, T] token ids; mask: [B, T], nonzero on real tokens.
          deterministic: unused by the text tower (no dropout).

        Returns:
          (states [B, T, H], embedding [B, projection] float32).
        """
        states = self.text_encoder(ids, mask, deterministic)
        embedding = self.text_proj(self.text_pool(states, mask))
        return states, embedding.astype(jnp.float32)

    def caption_logits(
        self,
        text_states: jax.Array,
        text_mask: jax.Array,
        audio_states: jax.Array,
        audio_mask: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced next-token logits [B, T, vocab] (float32).

        Args:
          text_states: [B, T, H] from ``encode_text``; text_mask: [B, T].
          audio_states: [B, N, D] from ``encode_audio``; audio_mask: [B, N].
          deterministic: unused (no dropout).

        Returns:
          Logits; position t predicts token t + 1.
        """
        return self.decoder(text_states, text_mask, audio_states, audio_mask, deterministic)

    def decode(self, ids: jax.Array, audio_states: jax.Array, audio_mask: jax.Array) -> jax.Array:
        """Incremental caption logits for the next chunk of tokens (uses the 'cache').

        The first call, with ids of the full decode length, only creates the cache
        (and stores the audio keys/values); each later call feeds the next chunk.
        Run with ``mutable=["cache"]``; see ``models/decoding.py``.

        Args:
          ids: [B, C] next token ids (C = 1 when stepping).
          audio_states: [B, N, D]; audio_mask: [B, N].

        Returns:
          [B, C, vocab] float32 logits.
        """
        text_mask = jnp.ones(ids.shape, jnp.int32)
        states = self.text_encoder(ids, text_mask, decode=True)
        return self.decoder(states, text_mask, audio_states, audio_mask, decode=True)

    def __call__(
        self,
        patches: jax.Array,
        time_idx: jax.Array,
        freq_idx: jax.Array,
        mask: jax.Array,
        ids: jax.Array,
        text_mask: jax.Array,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        """Everything the stage-2 loss needs (also the entry point for ``init``).

        Returns:
          dict with audio_embedding [B, P], text_embedding [B, P], caption_logits
          [B, T, vocab], logit_scale [] (and logit_bias [] with ``sigmoid_bias``).
        """
        audio_states, audio_embedding = self.encode_audio(patches, time_idx, freq_idx, mask,
                                                          deterministic)
        text_states, text_embedding = self.encode_text(ids, text_mask, deterministic)
        out = dict(
            audio_embedding=audio_embedding,
            text_embedding=text_embedding,
            caption_logits=self.caption_logits(text_states, text_mask, audio_states, mask,
                                               deterministic),
            logit_scale=self.logit_scale,
        )
        if self.config.sigmoid_bias:
            out["logit_bias"] = self.logit_bias
        return out


def cacophony_init_inputs(
    config: CacophonyConfig, batch: int = 1, num_patches: int = 16, text_len: int = 8
) -> tuple[np.ndarray, ...]:
    """Dummy positional inputs for ``Cacophony.init`` / ``jax.eval_shape``.

    Example: ``jax.eval_shape(model.init, {"params": key}, *cacophony_init_inputs(cfg))``.

    Args:
      config: the model config (for the patch width).
      batch: batch size.
      num_patches: audio patches per example.
      text_len: tokens per example (at most ``config.text.max_positions``).

    Returns:
      (patches, time_idx, freq_idx, mask, ids, text_mask).
    """
    return (
        np.zeros((batch, num_patches, config.audio.patch_dim), np.float32),
        np.zeros((batch, num_patches), np.int32),
        np.zeros((batch, num_patches), np.int32),
        np.ones((batch, num_patches), np.int32),
        np.zeros((batch, text_len), np.int32),
        np.ones((batch, text_len), np.int32),
    )

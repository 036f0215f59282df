"""Stage 1: masked autoencoder over spectrogram patches.

The encoder sees only the visible patches; the decoder gets the projected visible
tokens plus one learned mask token per masked patch, each with its own position,
and predicts every patch (visible tokens first, then masked ones). The encoder's
parameter tree is exactly Cacophony's ``audio_encoder`` subtree, so stage 2 is
initialised by copying it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cacophony_jax.models import axes
from cacophony_jax.models.audio_encoder import (
    LAYER_NORM_EPS,
    AudioEncoder,
    AudioPositions,
    audio_stack,
)
from cacophony_jax.models.layers import Dtype, dense, layer_norm, partitioned
from cacophony_jax.models.variants import MAEConfig, MAEDecoderConfig


class MAEDecoder(nn.Module):
    """Encoder states of the visible patches + mask tokens -> patch predictions."""

    config: MAEDecoderConfig
    patch_dim: int = 256
    freq_patches: int = 8
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention: str = "xla"
    fuse_qkv: bool = False
    fused_norm: bool = False

    @nn.compact
    def __call__(
        self,
        visible_states: jax.Array,
        visible_time: jax.Array,
        visible_freq: jax.Array,
        visible_mask: jax.Array,
        masked_time: jax.Array,
        masked_freq: jax.Array,
        masked_mask: jax.Array,
    ) -> jax.Array:
        """Decodes [B, Nv, D] visible states and Nm masked positions.

        Args:
          visible_states: encoder outputs of the visible patches.
          visible_time, visible_freq, visible_mask: [B, Nv] indices and validity.
          masked_time, masked_freq, masked_mask: [B, Nm] indices and validity.

        Returns:
          [B, Nv + Nm, patch_dim] predictions in the compute dtype.
        """
        cfg = self.config
        positions = AudioPositions(cfg.hidden, self.freq_patches, self.dtype, name="positions")
        visible = dense(cfg.hidden, (None, axes.EMBED), dtype=self.dtype, name="embed")(
            visible_states
        )
        visible = visible + positions(visible_time, visible_freq)
        token = self.param("mask_token", partitioned(nn.initializers.normal(0.02), (axes.EMBED,)),
                           (cfg.hidden,), jnp.float32)
        masked = token.astype(self.dtype) + positions(masked_time, masked_freq)
        x = jnp.concatenate([visible, masked], axis=1)
        mask = jnp.concatenate([visible_mask.astype(bool), masked_mask.astype(bool)], axis=1)
        fields = dict(num_heads=cfg.heads, mlp_dim=cfg.mlp, dtype=self.dtype,
                      attention=self.attention, fuse_qkv=self.fuse_qkv,
                      fused_norm=self.fused_norm)
        # Each group is valid-first, their concatenation is not where a group has padding.
        x = audio_stack(x, mask, fields, num_layers=cfg.layers, scan=self.scan,
                        remat=self.remat, valid_first=False)
        x = layer_norm(LAYER_NORM_EPS, dtype=self.dtype, name="final_norm")(x)
        return dense(self.patch_dim, (axes.EMBED, None), dtype=self.dtype, name="head")(x)


class MAE(nn.Module):
    """Stage-1 model: ``encoder`` (an AudioEncoder) and ``decoder`` (an MAEDecoder)."""

    config: MAEConfig
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    drop_path: float = 0.0
    attention: str = "xla"
    fuse_qkv: bool = False
    fused_norm: bool = False

    @nn.compact
    def __call__(
        self,
        visible_patches: jax.Array,
        visible_time: jax.Array,
        visible_freq: jax.Array,
        visible_mask: jax.Array,
        masked_time: jax.Array,
        masked_freq: jax.Array,
        masked_mask: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Reconstructs every patch from the visible ones.

        Args:
          visible_patches: [B, Nv, patch_dim].
          visible_time, visible_freq, visible_mask: [B, Nv].
          masked_time, masked_freq, masked_mask: [B, Nm] positions to reconstruct.
          deterministic: disables the encoder's drop-path.

        Returns:
          [B, Nv + Nm, patch_dim] float32: visible tokens first, then masked ones.
        """
        enc = self.config.encoder
        states = AudioEncoder(enc, dtype=self.dtype, scan=self.scan, remat=self.remat,
                              drop_path=self.drop_path, attention=self.attention,
                              fuse_qkv=self.fuse_qkv, fused_norm=self.fused_norm,
                              name="encoder")(visible_patches, visible_time, visible_freq,
                                              visible_mask, deterministic)
        out = MAEDecoder(self.config.decoder, patch_dim=enc.patch_dim,
                         freq_patches=enc.freq_patches, dtype=self.dtype, scan=self.scan,
                         remat=self.remat, attention=self.attention,
                         fuse_qkv=self.fuse_qkv, fused_norm=self.fused_norm,
                         name="decoder")(
            states, visible_time, visible_freq, visible_mask, masked_time, masked_freq,
            masked_mask)
        return out.astype(jnp.float32)


def mae_init_inputs(
    config: MAEConfig, batch: int = 1, visible: int = 8, masked: int = 24
) -> tuple[np.ndarray, ...]:
    """Dummy positional inputs for ``MAE.init`` / ``jax.eval_shape(MAE.init, ...)``.

    Example: ``jax.eval_shape(model.init, {"params": key}, *mae_init_inputs(cfg))``.

    Args:
      config: the model config (for the patch width).
      batch: batch size.
      visible: visible patches per example.
      masked: masked patches per example.

    Returns:
      (visible_patches, visible_time, visible_freq, visible_mask, masked_time,
      masked_freq, masked_mask), all zeros except the masks (ones).
    """
    idx = lambda n: np.zeros((batch, n), np.int32)
    return (
        np.zeros((batch, visible, config.encoder.patch_dim), np.float32),
        idx(visible), idx(visible), np.ones((batch, visible), np.int32),
        idx(masked), idx(masked), np.ones((batch, masked), np.int32),
    )

"""Spectrogram ViT encoder: patch embedding, time/frequency positions, pre-LN blocks.

Numerics follow the release: LayerNorm epsilon 1e-6, SiLU MLP, attention scaled by
1/sqrt(head_dim) with a key-padding mask (padded queries still get outputs), time
positions as a sin|cos table, frequency positions as a learned table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cacophony_jax.models import axes, key_lengths
from cacophony_jax.models.attention_ops import even_length_for_cudnn
from cacophony_jax.models.fused_norm import NormWithSkip
from cacophony_jax.models.layers import (
    MLP,
    XAVIER,
    Attention,
    DropPath,
    Dtype,
    dense,
    layer_norm,
    partitioned,
)
from cacophony_jax.models.stack import apply_stack
from cacophony_jax.models.variants import AudioEncoderConfig

LAYER_NORM_EPS = 1e-6


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
    """Sin|cos embedding of integer positions (first half sin, second half cos).

    Frequency i (of dim / 2) is exp(-2 i ln(10000) / dim).

    Args:
      positions: integer array [...].
      dim: even embedding width.

    Returns:
      float32 [..., dim].
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding width must be even, got {dim}")
    freqs = np.exp(-2.0 * np.arange(dim // 2) * np.log(10000.0) / dim).astype(np.float32)
    angles = positions.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def key_padding_mask(mask: jax.Array) -> jax.Array:
    """[B, S] validity -> boolean attention mask [B, 1, 1, S] (every query sees valid keys).

    Args:
      mask: [B, S], nonzero on valid positions.

    Returns:
      Boolean [B, 1, 1, S].
    """
    return mask.astype(bool)[:, None, None, :]


class AudioBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)); x + MLP(LN(x)), each branch with drop-path."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    fuse_qkv: bool = False
    fused_norm: bool = False
    drop_path: float = 0.0
    deterministic: bool = True
    scanned: bool = False

    def _norm(self, x: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
        """(residual input, LN(x)): the fused kernel returns its own residual input."""
        if self.fused_norm:
            return NormWithSkip(LAYER_NORM_EPS, dtype=self.dtype, name=name)(x)
        return x, layer_norm(LAYER_NORM_EPS, dtype=self.dtype, name=name)(x)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array | tuple[jax.Array, None]:
        """Applies the block to [B, N, D] with attention mask [B, 1, 1, N]."""
        x = axes.constrain(x, axes.BLE)
        x, h = self._norm(x, "attn_norm")
        h = Attention(self.num_heads, dtype=self.dtype, implementation=self.attention,
                      fuse_qkv=self.fuse_qkv, name="attn")(h, h, mask)
        x = x + DropPath(self.drop_path, name="attn_drop")(h, self.deterministic)
        x, h = self._norm(x, "mlp_norm")
        h = MLP(self.mlp_dim, nn.silu, dtype=self.dtype, name="mlp")(h)
        x = x + DropPath(self.drop_path, name="mlp_drop")(h, self.deterministic)
        return (x, None) if self.scanned else x


def audio_stack(x: jax.Array, mask: jax.Array, fields: dict, *, num_layers: int, scan: bool,
                remat: str, valid_first: bool = True) -> jax.Array:
    """``num_layers`` AudioBlocks over [B, N, D] with a key-padding mask [B, N].

    Call inside a parent's compact method. ``fields`` are AudioBlock's (see
    `stack.apply_stack`). With cuDNN attention the mask travels as one length per
    example (`key_lengths`: cuDNN's padding kernel, no bias tensor), which needs the
    valid positions first: patch sequences are built that way (``valid_first``);
    otherwise the stack runs on the sequence put in that order and the result is put
    back. An odd N is padded once for the whole stack (`even_length_for_cudnn`). The
    result has the input's N positions in the input's order.
    """
    length = x.shape[1]
    if fields["attention"] != "cudnn":
        return apply_stack(AudioBlock, fields, x, key_padding_mask(mask), num_layers=num_layers,
                           scan=scan, remat=remat)
    order = None
    if not valid_first:
        order = key_lengths.valid_first_order(mask)
        x = axes.constrain(key_lengths.permute_rows(x, order), axes.BLE)
    x, mask = even_length_for_cudnn(x, mask, fields["attention"])
    x = apply_stack(AudioBlock, fields, x, key_lengths.valid_lengths(mask),
                    num_layers=num_layers, scan=scan, remat=remat)
    x = x[:, :length]
    if order is not None:
        x = axes.constrain(key_lengths.permute_rows(x, key_lengths.inverse_order(order)),
                           axes.BLE)
    return x


class AudioPositions(nn.Module):
    """Sinusoidal time embedding plus a learned frequency-position table."""

    dim: int
    freq_patches: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, time_idx: jax.Array, freq_idx: jax.Array) -> jax.Array:
        """Returns the position embedding [B, N, dim] of patches at (time, freq)."""
        table = self.param(
            "freq_table",
            partitioned(nn.initializers.normal(0.02), (None, axes.EMBED)),
            (self.freq_patches, self.dim),
            jnp.float32,
        )
        # Gather from a whole copy of the (tiny) table, so that the [B, N, dim] result
        # and its gradient stay split by batch like every activation. Gathering from the
        # FSDP-sharded table instead yields width-sharded activations, which a mesh with
        # both data and fsdp axes can only re-lay-out by full rematerialisation.
        table = axes.constrain(table, (None, None))
        embedding = sinusoidal_embedding(time_idx, self.dim) + jnp.take(table, freq_idx, axis=0)
        return axes.constrain(embedding.astype(self.dtype), axes.BLE)


class AudioEncoder(nn.Module):
    """Patches with their (time, freq) indices -> one hidden vector per patch."""

    config: AudioEncoderConfig
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
        patches: jax.Array,
        time_idx: jax.Array,
        freq_idx: jax.Array,
        mask: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Encodes a (possibly padded) patch sequence.

        Args:
          patches: [B, N, patch_dim] log-mel patches.
          time_idx: [B, N] integer time index of each patch.
          freq_idx: [B, N] integer frequency index of each patch.
          mask: [B, N], nonzero on real patches (a key-padding mask); with cuDNN
            attention the real patches must come first (as `audio/patches.py` lays
            every sequence out), since cuDNN gets the mask as lengths.
          deterministic: disables drop-path; when False and drop_path > 0 a
            'dropout' rng is needed.

        Returns:
          [B, N, hidden] states after the final LayerNorm.
        """
        cfg = self.config
        if patches.shape[-1] != cfg.patch_dim:
            raise ValueError(
                f"audio patches have width {patches.shape[-1]}, the encoder expects "
                f"{cfg.patch_dim} (16 x 16 log-mel patches)"
            )
        x = dense(cfg.hidden, (None, axes.EMBED), dtype=self.dtype, kernel_init=XAVIER,
                  name="patch_embed")(patches)
        x = x + AudioPositions(cfg.hidden, cfg.freq_patches, self.dtype, name="positions")(
            time_idx, freq_idx
        )
        fields = dict(num_heads=cfg.heads, mlp_dim=cfg.mlp, dtype=self.dtype,
                      attention=self.attention, fuse_qkv=self.fuse_qkv,
                      fused_norm=self.fused_norm, drop_path=self.drop_path,
                      deterministic=deterministic)
        x = audio_stack(x, mask, fields, num_layers=cfg.layers, scan=self.scan, remat=self.remat)
        return layer_norm(LAYER_NORM_EPS, dtype=self.dtype, name="final_norm")(x)

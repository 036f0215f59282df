"""Model sizes: frozen config dataclasses and the named variants "tiny" and "base".

"base" is the released Cacophony. Its parameter counts, as the release reports
them, and what each one counts (checked with ``jax.eval_shape`` in the tests):

- audio encoder, 85.26 M: patch embedding, frequency table, 12 blocks and the
  final LayerNorm (the attention pool is not included).
- MAE decoder, 85.85 M: the 768 -> 768 input Dense, frequency table, mask token,
  12 blocks of width 768 / MLP 3072, final LayerNorm and the Dense -> 256 head;
  the 768-wide, 12-layer decoder is the only ViT-shaped size giving this count.
- text encoder, 125.23 M: RoBERTa-base embeddings (word, position, token type,
  LayerNorm) and 12 layers (124.06 M), plus the text attention pool (its query,
  key and value projections, 1.18 M); the pooler's 768 -> 768 ``text_proj`` is
  not included.
- text decoder, 76.46 M: 4 layers with self- and cross-attention (37.81 M) plus
  the 768 -> 50,265 vocabulary projection with its bias (38.65 M).

The audio pool's projection, ``text_proj`` and the logit scale are in none of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

Config = TypeVar("Config")


def _check_heads(name: str, hidden: int, heads: int) -> None:
    if heads <= 0 or hidden % heads:
        raise ValueError(f"{name}: hidden={hidden} must be a multiple of heads={heads}")


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """Spectrogram ViT encoder (pre-LayerNorm blocks, SiLU MLP)."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    patch_dim: int = 256  # 16 x 16 log-mel patch, time-major inside the patch
    freq_patches: int = 8  # frequency patches per time step (128 mel bins / 16)

    def __post_init__(self) -> None:
        _check_heads("AudioEncoderConfig", self.hidden, self.heads)


@dataclasses.dataclass(frozen=True)
class MAEDecoderConfig:
    """Stage-1 reconstruction decoder (blocks of the encoder's form)."""

    hidden: int
    layers: int
    heads: int
    mlp: int

    def __post_init__(self) -> None:
        _check_heads("MAEDecoderConfig", self.hidden, self.heads)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """RoBERTa-shaped text tower, run causally; the captioning decoder shares its sizes."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    max_positions: int
    pad_id: int = 1
    bos_id: int = 0
    eos_id: int = 2
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_heads("TextConfig", self.hidden, self.heads)


@dataclasses.dataclass(frozen=True)
class CacophonyConfig:
    """Stage-2 dual model: audio tower, causal text tower, captioning decoder."""

    audio: AudioEncoderConfig
    text: TextConfig
    decoder_layers: int
    audio_pool_heads: int
    projection: int
    logit_scale_init: float = 2.0
    sigmoid_bias: bool = False  # adds a scalar "logit_bias" (init -10) for the sigmoid loss

    def __post_init__(self) -> None:
        _check_heads("CacophonyConfig.audio_pool", self.audio.hidden, self.audio_pool_heads)


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """Stage-1 masked autoencoder."""

    encoder: AudioEncoderConfig
    decoder: MAEDecoderConfig


_AUDIO = {
    "tiny": AudioEncoderConfig(hidden=64, layers=2, heads=8, mlp=128),
    "base": AudioEncoderConfig(hidden=768, layers=12, heads=8, mlp=3072),
}
_MAE_DECODER = {
    "tiny": MAEDecoderConfig(hidden=48, layers=1, heads=4, mlp=96),
    # Heads do not change the count; 8 matches the encoder's blocks.
    "base": MAEDecoderConfig(hidden=768, layers=12, heads=8, mlp=3072),
}
_TEXT = {
    "tiny": TextConfig(vocab_size=500, hidden=64, layers=2, heads=4, mlp=128, max_positions=40),
    "base": TextConfig(
        vocab_size=50_265, hidden=768, layers=12, heads=12, mlp=3072, max_positions=514
    ),
}
_CACOPHONY = {
    "tiny": dict(decoder_layers=1, audio_pool_heads=8, projection=64),
    "base": dict(decoder_layers=4, audio_pool_heads=8, projection=768),
}

VARIANTS = tuple(_AUDIO)


def _variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; valid variants: {list(VARIANTS)}")
    return variant


def _override(config: Config, overrides: dict[str, Any], what: str) -> Config:
    """Replaces fields; a dict value for a nested config overrides inside it."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid fields: {sorted(fields)}")
    changes = {}
    for key, value in overrides.items():
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _override(current, value, f"{what}.{key}")
        changes[key] = value
    return dataclasses.replace(config, **changes)


def cacophony_config(variant: str, **overrides: Any) -> CacophonyConfig:
    """The stage-2 model config of a named variant.

    Args:
      variant: "tiny" (the reference-fixture sizes) or "base" (the release).
      **overrides: field replacements; for ``audio``/``text`` pass either a config
        or a dict of its fields, e.g. ``text={"layers": 4}``.

    Returns:
      The config.
    """
    v = _variant(variant)
    config = CacophonyConfig(audio=_AUDIO[v], text=_TEXT[v], **_CACOPHONY[v])
    return _override(config, overrides, "CacophonyConfig")


def mae_config(variant: str, **overrides: Any) -> MAEConfig:
    """The stage-1 model config of a named variant.

    Args:
      variant: "tiny" or "base".
      **overrides: field replacements; ``encoder``/``decoder`` take a config or a dict.

    Returns:
      The config.
    """
    v = _variant(variant)
    config = MAEConfig(encoder=_AUDIO[v], decoder=_MAE_DECODER[v])
    return _override(config, overrides, "MAEConfig")


def variant_text_heads(hidden: int, layers: int, vocab_size: int) -> int | None:
    """Text heads of the named variant with these sizes (shapes cannot tell heads).

    Args:
      hidden, layers, vocab_size: sizes read from a checkpoint.

    Returns:
      The variant's head count, or None when no variant has these sizes.
    """
    for text in _TEXT.values():
        if (text.hidden, text.layers, text.vocab_size) == (hidden, layers, vocab_size):
            return text.heads
    return None


def variant_pool_heads(hidden: int) -> int | None:
    """Audio-pool heads of the named variant whose audio width is ``hidden``.

    Args:
      hidden: audio encoder width read from a checkpoint.

    Returns:
      The variant's pool head count, or None when no variant has this width.
    """
    for name, audio in _AUDIO.items():
        if audio.hidden == hidden:
            return _CACOPHONY[name]["audio_pool_heads"]
    return None

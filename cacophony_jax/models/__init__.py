"""Flax Linen models: audio encoder, MAE, causal text tower, captioning decoder, Cacophony."""

from cacophony_jax.models.cacophony import Cacophony, cacophony_init_inputs
from cacophony_jax.models.mae import MAE, mae_init_inputs
from cacophony_jax.models.variants import (
    AudioEncoderConfig,
    CacophonyConfig,
    MAEConfig,
    MAEDecoderConfig,
    TextConfig,
    cacophony_config,
    mae_config,
)

__all__ = [
    "AudioEncoderConfig",
    "Cacophony",
    "CacophonyConfig",
    "MAE",
    "MAEConfig",
    "MAEDecoderConfig",
    "TextConfig",
    "cacophony_config",
    "cacophony_init_inputs",
    "mae_config",
    "mae_init_inputs",
]

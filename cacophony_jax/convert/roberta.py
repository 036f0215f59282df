"""Initialise the text tower from a local Hugging Face RoBERTa checkpoint.

Reads ``model.safetensors`` (PyTorch names such as
``roberta.encoder.layer.0.attention.self.query.weight``; Linear weights are
[out, in] and are transposed) into ``Cacophony``'s ``text_encoder`` subtree. The
pooler and LM head are ignored; the text pool, projections and decoder stay as
initialised. The position table is copied unchanged: like the release, the tower
uses position ids 0, 1, 2, ... (Hugging Face starts real tokens at pad_id + 1).
"""

from __future__ import annotations

import os
import re

import numpy as np

from cacophony_jax.convert import layout
from cacophony_jax.convert.layout import HF_TEXT_LAYER, Params
from cacophony_jax.models.stack import stack_layers
from cacophony_jax.models.variants import TextConfig

_PREFIXES = ("roberta.", "")


class RobertaCheckpointError(ValueError):
    """A RoBERTa file that cannot initialise the text tower (says what is wrong)."""


def _linear(name: str, d_in: int, d_out: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """torch Linear keys -> (flax key, torch shape)."""
    return {f"{name}.weight": (f"{name}/kernel", (d_out, d_in)),
            f"{name}.bias": (f"{name}/bias", (d_out,))}


def _norm(name: str, h: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {f"{name}.weight": (f"{name}/scale", (h,)), f"{name}.bias": (f"{name}/bias", (h,))}


def _expected(cfg: TextConfig) -> tuple[dict, dict]:
    """Torch key -> (flax key, torch shape), for embeddings and for one layer."""
    h = cfg.hidden
    embeddings = {
        "embeddings.word_embeddings.weight": ("word_embeddings/embedding", (cfg.vocab_size, h)),
        "embeddings.position_embeddings.weight": (
            "position_embeddings/embedding", (cfg.max_positions, h)),
        "embeddings.token_type_embeddings.weight": ("token_type_embeddings/embedding", (1, h)),
        **{f"embeddings.{k}": v for k, v in _norm("LayerNorm", h).items()},
    }
    layer = {}
    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
        layer.update(_linear(name, h, h))
    layer.update(_linear("intermediate.dense", h, cfg.mlp))
    layer.update(_linear("output.dense", cfg.mlp, h))
    layer.update(_norm("attention.output.LayerNorm", h))
    layer.update(_norm("output.LayerNorm", h))
    return embeddings, {k: (v[0].replace(".", "/"), v[1]) for k, v in layer.items()}


def _read(path: str) -> dict[str, np.ndarray]:
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise RobertaCheckpointError(
            f"RoBERTa checkpoint {path!r} does not exist; pass a model.safetensors file (or "
            "its folder) downloaded from the Hugging Face hub")
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except Exception as e:  # the Rust reader raises its own error types
        raise RobertaCheckpointError(
            f"{path!r} is not a readable safetensors file ({e}); PyTorch .bin files are "
            "not supported, save the model with safe_serialization=True") from None
    # Older checkpoints name LayerNorm parameters gamma/beta.
    return {k.replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias"): v for k, v in tensors.items()}


def load_roberta_text_tower(
    path: str | os.PathLike, text_config: TextConfig, *, scan: bool = False
) -> Params:
    """Reads Hugging Face RoBERTa weights as the ``text_encoder`` parameter subtree.

    Args:
      path: ``model.safetensors`` or the folder holding it.
      text_config: the text tower's sizes (must match the checkpoint's).
      scan: produce the scanned layout (``Cacophony(..., scan=True)``).

    Returns:
      The subtree for ``params["text_encoder"]`` (float32 numpy arrays).
    """
    name = os.fspath(path)
    tensors = _read(name)
    prefix = next((p for p in _PREFIXES if f"{p}embeddings.word_embeddings.weight" in tensors),
                  _PREFIXES[0])
    layer_ids = {int(m.group(1)) for k in tensors
                 if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))}
    if len(layer_ids) > text_config.layers:
        raise RobertaCheckpointError(
            f"{name!r} has {len(layer_ids)} layers but text_config.layers="
            f"{text_config.layers}; make the config match the checkpoint")
    embeddings, layer = _expected(text_config)
    wanted = {f"{prefix}{k}": v for k, v in embeddings.items()}
    for i in range(text_config.layers):
        wanted.update({f"{prefix}encoder.layer.{i}.{k}": v for k, v in layer.items()})
    missing = sorted(k for k in wanted if k not in tensors)
    misshaped = sorted(f"{k} {tuple(tensors[k].shape)} (expected {wanted[k][1]})"
                       for k in wanted if k in tensors and tuple(tensors[k].shape) != wanted[k][1])
    if missing or misshaped:
        parts = [f"{what}: {keys}" for what, keys in
                 (("missing", missing), ("mis-shaped", misshaped)) if keys]
        raise RobertaCheckpointError(
            f"{name!r} does not fit the text tower {text_config}; " + "; ".join(parts))

    def flax_layout(key: str) -> np.ndarray:
        value = np.asarray(tensors[key], np.float32)
        # torch Linear stores [out, in]; embedding tables are already [rows, width].
        linear = value.ndim == 2 and "_embeddings." not in key
        return value.T if linear else value

    flat = {f"embeddings/{flax}": flax_layout(f"{prefix}{k}")
            for k, (flax, _) in embeddings.items()}
    for k, (flax, _) in layer.items():
        flat[f"{HF_TEXT_LAYER}/{flax}"] = np.stack(
            [flax_layout(f"{prefix}encoder.layer.{i}.{k}") for i in range(text_config.layers)])
    spec = layout.hf_text_embeddings_spec("embeddings", (), text_config)
    spec.update(layout.hf_text_layer_spec(HF_TEXT_LAYER, (), text_config, text_config.layers,
                                          cross=False))
    params = layout.convert(flat, spec)
    return stack_layers(params) if scan else params

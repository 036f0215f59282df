r"""The HEAR 2021 API (hear-eval-kit) over an inference bundle.

    from cacophony_jax import hear

    model = hear.load_model("bundles/cacophony")             # or $CACOPHONY_BUNDLE
    scene = hear.get_scene_embeddings(audio, model)          # [n, scene_embedding_size]
    emb, ts = hear.get_timestamp_embeddings(audio, model)    # [n, T, d], [n, T] in ms

``audio`` is a batch of mono waveforms in [-1, 1] at 16 kHz, all of one length:
a numpy array or a torch tensor [n, samples]. Torch input gives torch output (on
the input's device), numpy input numpy output; embeddings are float32. Clips shorter
than one 16-frame step (2,401 samples, 0.15 s) are padded with silence to one.

Scene embedding: for a stage-2 ("cacophony") bundle the pooled audio embedding, for
a stage-1 ("mae") bundle the mean of the valid encoder states, L2-normalised either
way; clips longer than the bundle's window are windowed and averaged
(``inference.py`` documents the rule).

Timestamp embeddings: one per time step of 16 log-mel frames (160 ms), the mean over
its 8 frequency patches of the audio encoder states (``CacophonyModel.audio_states``,
so long clips are encoded in window-sized chunks). Timestamps are the step centres,
87.5 + 160 k ms (step k's frames cover 160 k to 160 k + 175 ms), evenly spaced. The
front end keeps whole steps only, so the final partial step of a clip (less than
160 ms, e.g. the last 110 ms of a 1.07 s clip: 6 steps covering 0-960 ms) has no
frame of its own; HEAR's tasks label events by their nearest timestamp, which then
is the last step.

Running the official validator (torch and hearvalidator are not project
requirements; the validator only accepts a model object that is a torch or
TensorFlow module, so ``HearModel`` subclasses ``torch.nn.Module`` when torch is
importable and is a plain object otherwise)::

    pip install hearvalidator torch
    PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false \
        hear-validator cacophony_jax.hear --model BUNDLE

run from the repository root (the validator is an installed script, so ``PYTHONPATH=.``
is what lets it import ``cacophony_jax``); BUNDLE is a folder made
by the ``export`` command. The environment variable keeps JAX from reserving most of
the GPU memory that torch also wants.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from cacophony_jax import inference
from cacophony_jax.audio import clips, patches

ENV_VAR = "CACOPHONY_BUNDLE"
STEP_MS = 160.0  # 16 frames of 10 ms
# Step k's frames (25 ms windows every 10 ms, not centred) cover 160 k ms to
# 160 k + 175 ms of the clip: its timestamp is the middle of that.
CENTRE_MS = (STEP_MS - 10.0 + 25.0) / 2

if importlib.util.find_spec("torch") is not None:
    import torch

    _Base: type = torch.nn.Module
else:
    torch = None
    _Base = object


class HearError(ValueError):
    """A HEAR call that cannot be served; the message says what to pass instead."""


class HearModel(_Base):
    """What ``load_model`` returns: a loaded bundle plus the HEAR attributes.

    Attributes:
      sample_rate: 16000.
      scene_embedding_size: width of ``get_scene_embeddings`` rows.
      timestamp_embedding_size: width of ``get_timestamp_embeddings`` rows.
      model: the ``inference.CacophonyModel``.
    """

    def __init__(self, model: inference.CacophonyModel):
        """Wraps a loaded model.

        Args:
          model: from ``inference.load``.
        """
        super().__init__()
        self.model = model
        self.sample_rate = int(model.sample_rate)
        self.scene_embedding_size = int(model.embedding_size)
        self.timestamp_embedding_size = int(model.state_size)


def load_model(model_file_path: str = "") -> HearModel:
    """Loads a bundle for HEAR.

    Args:
      model_file_path: the bundle folder; "" reads it from $CACOPHONY_BUNDLE.

    Returns:
      The HEAR model object.
    """
    path = model_file_path or os.environ.get(ENV_VAR, "")
    if not path:
        raise HearError(f"no bundle given: pass load_model(path to an exported bundle) or "
                        f"set {ENV_VAR}")
    return HearModel(inference.load(path))


def _as_numpy(audio: Any) -> tuple[np.ndarray, Any]:
    """[n, samples] float32 and the torch tensor it came from (or None)."""
    source = None
    if torch is not None and isinstance(audio, torch.Tensor):
        source = audio
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio)
    if audio.ndim != 2:
        raise HearError(f"HEAR audio must be a batch [n, samples] of mono clips, got shape "
                        f"{audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise HearError(f"HEAR audio must be float in [-1, 1], got {audio.dtype}")
    audio = audio.astype(np.float32, copy=False)
    if 0 < audio.shape[1] < clips.MIN_SAMPLES:
        # HEAR tasks choose the clip length: shorter than one patch step (0.15 s) is
        # padded with silence to one, which gives one timestamp.
        audio = np.pad(audio, ((0, 0), (0, clips.MIN_SAMPLES - audio.shape[1])))
    elif not audio.shape[1] and audio.shape[0]:
        raise HearError(f"HEAR audio of shape {audio.shape} holds no samples")
    return audio, source


def _like(value: np.ndarray, source: Any) -> Any:
    if source is None:
        return value
    return torch.from_numpy(np.ascontiguousarray(value)).to(source.device)


def _check_model(model: Any) -> inference.CacophonyModel:
    if not isinstance(model, HearModel):
        raise HearError(f"expected the object returned by load_model, got {type(model).__name__}")
    return model.model


def get_scene_embeddings(audio: Any, model: HearModel) -> Any:
    """One embedding per clip.

    Args:
      audio: [n, samples] float waveforms at 16 kHz (numpy or torch).
      model: from ``load_model``.

    Returns:
      float32 [n, scene_embedding_size] (torch if ``audio`` is torch).
    """
    inner = _check_model(model)
    wave, source = _as_numpy(audio)
    if not wave.shape[0]:  # an empty batch, of any length
        return _like(np.zeros((0, model.scene_embedding_size), np.float32), source)
    return _like(inner.embed_audio(wave, sample_rate=inner.sample_rate), source)


def get_timestamp_embeddings(audio: Any, model: HearModel) -> tuple[Any, Any]:
    """One embedding per 160 ms step of each clip, with the step centres.

    Args:
      audio: [n, samples] float waveforms at 16 kHz (numpy or torch).
      model: from ``load_model``.

    Returns:
      (embeddings float32 [n, T, timestamp_embedding_size], timestamps float32
      [n, T] in milliseconds), torch if ``audio`` is torch.
    """
    inner = _check_model(model)
    wave, source = _as_numpy(audio)
    if not wave.shape[0]:  # an empty batch, as get_scene_embeddings allows
        steps = clips.patch_steps(wave.shape[1]) if wave.shape[1] else 0  # padded above
        empty = np.zeros((0, steps, model.timestamp_embedding_size), np.float32)
        return _like(empty, source), _like(np.zeros((0, steps), np.float32), source)
    states, _, mask = inner.audio_states(wave, inner.sample_rate)
    n, length, width = states.shape
    steps = length // patches.FREQ_PATCHES
    states = states.reshape(n, steps, patches.FREQ_PATCHES, width)
    weight = mask.reshape(n, steps, patches.FREQ_PATCHES, 1).astype(np.float32)
    embeddings = (states * weight).sum(2) / np.maximum(weight.sum(2), 1.0)
    centres = (np.arange(steps, dtype=np.float32) * np.float32(STEP_MS)
               + np.float32(CENTRE_MS))
    timestamps = np.tile(centres, (n, 1))  # writable, one row per clip
    return _like(embeddings.astype(np.float32), source), _like(timestamps, source)

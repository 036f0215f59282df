r"""The HEAR 2021 API (hear-eval-kit) over an inference bundle.

    from cacophony_jax import hear

    model = hear.load_model("bundles/cacophony")             # or $CACOPHONY_BUNDLE
    scene = hear.get_scene_embeddings(audio, model)          # [n, scene_embedding_size]
    emb, ts = hear.get_timestamp_embeddings(audio, model)    # [n, T, d], [n, T] in ms

``audio`` is a batch of mono waveforms in [-1, 1] at 16 kHz, all of one length:
a numpy array or a torch tensor [n, samples]. Torch input gives torch output (on
the input's device), numpy input numpy output; embeddings are float32. The model
reads 16-bit audio, as its training data was: float input is rounded to int16 on the
way in (detail under about 3e-5 of full scale is lost).

Scene embedding: for a stage-2 ("cacophony") bundle the pooled audio embedding, for
a stage-1 ("mae") bundle the mean of the valid encoder states, L2-normalised either
way; clips longer than the bundle's window are windowed and averaged
(``inference.py`` documents the rule). Clips shorter than one 16-frame step (2,401
samples, 0.15 s) are padded with silence to one.

Timestamp embeddings: one every 40 ms, at 0, 40, 80, ... ms up to the end of the clip
(``1 + samples // 640`` of them; HEAR asks for a hop of at most 50 ms, and a task
labels a timestamp with the events whose interval contains it). The encoder's own
time step is 16 log-mel frames, 160 ms, whose frames cover 175 ms of audio; the
embedding at ``t`` is the mean over its 8 frequency patches of the encoder states
(``CacophonyModel.audio_states``) of the step whose 175 ms are centred on ``t``. To
place steps every 40 ms the clip is encoded four times, started 87.5, 47.5 and 7.5 ms
early (silence in front) and 32.5 ms late, and the four step grids are interleaved.
Each encoding reads on to the clip's end, and silence after it gives the last
timestamps all 175 ms of their steps. A timestamp embedding therefore costs four
encoder passes over the clip (long clips in window-sized chunks, as ``audio_states``
encodes them).

Running the official validator (torch, TensorFlow and hearvalidator are not project
requirements; the validator imports both frameworks and only accepts a model object
that is a torch or TensorFlow module, so ``HearModel`` subclasses ``torch.nn.Module``
when torch is importable and is a plain object otherwise; its last release declares
Python below 3.9 but runs on 3.11)::

    pip install torch tensorflow-cpu
    pip install --no-deps --ignore-requires-python hearvalidator==2021.0.6
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
from cacophony_jax.audio import clips, frontend, patches

ENV_VAR = "CACOPHONY_BUNDLE"
HOP_MS = 40.0  # timestamp spacing; HEAR asks for at most 50 ms
HOP_SAMPLES = 640
SHIFTS = clips.STEP_SAMPLES // HOP_SAMPLES  # 4 encodings interleave 160 ms steps
# Step k's frames (25 ms windows every 10 ms, not centred) cover 160 k ms to
# 160 k + 175 ms of the clip: 87.5 ms of silence in front centres step 0 on 0 ms.
CENTRE_SAMPLES = ((patches.PATCH - 1) * frontend.HOP + frontend.WINDOW) // 2  # 1400

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
    if not audio.shape[1] and audio.shape[0]:
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
    if wave.shape[1] < clips.MIN_SAMPLES:
        # HEAR tasks choose the clip length: shorter than one patch step (0.15 s) is
        # padded with silence to one.
        wave = np.pad(wave, ((0, 0), (0, clips.MIN_SAMPLES - wave.shape[1])))
    return _like(inner.embed_audio(wave, sample_rate=inner.sample_rate), source)


def timestamp_count(samples: int) -> int:
    """Timestamps of a clip of `samples` samples: 0, 40, ... ms up to its end."""
    return samples // HOP_SAMPLES + 1 if samples else 0


def _step_means(inner: inference.CacophonyModel, wave: np.ndarray) -> np.ndarray:
    """[n, steps, width]: each 160 ms step's encoder states averaged over frequency."""
    states, _, mask = inner.audio_states(wave, inner.sample_rate)
    n, length, width = states.shape
    steps = length // patches.FREQ_PATCHES
    states = states.reshape(n, steps, patches.FREQ_PATCHES, width)
    weight = mask.reshape(n, steps, patches.FREQ_PATCHES, 1).astype(np.float32)
    return (states * weight).sum(2) / np.maximum(weight.sum(2), 1.0)


def get_timestamp_embeddings(audio: Any, model: HearModel) -> tuple[Any, Any]:
    """One embedding every 40 ms of each clip, with its time.

    Args:
      audio: [n, samples] float waveforms at 16 kHz (numpy or torch).
      model: from ``load_model``.

    Returns:
      (embeddings float32 [n, T, timestamp_embedding_size], timestamps float32
      [n, T] in milliseconds: 0, 40, ... up to the clip's end, T = 1 + samples // 640),
      torch if ``audio`` is torch.
    """
    inner = _check_model(model)
    wave, source = _as_numpy(audio)
    n, samples = wave.shape
    count = timestamp_count(samples)
    timestamps = np.tile(np.arange(count, dtype=np.float32) * np.float32(HOP_MS), (n, 1))
    embeddings = np.zeros((n, count, model.timestamp_embedding_size), np.float32)
    if not n:  # an empty batch, as get_scene_embeddings allows
        return _like(embeddings, source), _like(timestamps, source)
    # Encoding k starts the clip 40 k ms later, so its step m is timestamp 4 m + k.
    # All four read the same length (one compiled shape): the whole clip, and all
    # 175 ms of the last timestamp's step.
    steps = -(-count // SHIFTS)
    length = max((steps - 1) * clips.STEP_SAMPLES + 2 * CENTRE_SAMPLES,
                 CENTRE_SAMPLES + samples)
    padded = np.zeros((n, (SHIFTS - 1) * HOP_SAMPLES + length), np.float32)
    padded[:, CENTRE_SAMPLES:CENTRE_SAMPLES + samples] = wave
    for k in range(SHIFTS):
        start = k * HOP_SAMPLES
        means = _step_means(inner, padded[:, start:start + length])
        embeddings[:, k::SHIFTS] = means[:, :len(range(k, count, SHIFTS))]
    return _like(embeddings, source), _like(timestamps, source)

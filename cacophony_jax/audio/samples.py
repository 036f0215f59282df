"""Audio samples in memory: int16 <-> float conversion and resampling.

The model's audio is 16 kHz mono int16 (`SAMPLE_RATE`); these helpers move between
that and float waveforms without touching files (`audio/io.py` reads and writes
those and re-exports everything here). A problem raises `AudioError`, a ValueError
whose message says what to do.
"""

from __future__ import annotations

import os
import unicodedata

import numpy as np
import soxr

SAMPLE_RATE = 16_000

# int16 <-> float scale of the front end: x / 32768, so int16 -> float -> int16 is exact.
_INT16_SCALE = 32768.0


class AudioError(ValueError):
    """An audio file or buffer that cannot be used; the message names it and the fix."""


def existing_form(path: str) -> str:
    """`path`, or its NFC or NFD spelling where only that one exists (accents typed in
    one Unicode form, saved in the other, as macOS spells names)."""
    if os.path.exists(path):
        return path
    for other in (unicodedata.normalize(form, path) for form in ("NFC", "NFD")):
        if other != path and os.path.exists(other):
            return other
    return path


def to_int16(wave: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to int16 (clipped, x * 32768 rounded).

    Args:
      wave: float array of any shape; int16 input is returned unchanged.

    Returns:
      int16 array of the same shape.

    Raises:
      AudioError: if the audio holds NaN or infinite values.
    """
    wave = np.asarray(wave)
    if wave.dtype == np.int16:
        return wave
    if not np.isfinite(wave).all():
        raise AudioError("audio holds NaN or infinite samples; fix or drop the clip")
    scaled = np.rint(np.clip(wave, -1.0, 1.0) * _INT16_SCALE)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def to_float32(audio: np.ndarray) -> np.ndarray:
    """int16 audio to float32 in [-1, 1) (x / 32768, exact).

    Args:
      audio: int16 array of any shape.

    Returns:
      float32 array of the same shape.

    Raises:
      AudioError: if the input is not int16.
    """
    audio = np.asarray(audio)
    if audio.dtype != np.int16:
        raise AudioError(f"to_float32 expects int16 audio, got {audio.dtype}; use to_int16 first")
    return audio.astype(np.float32) * np.float32(1.0 / _INT16_SCALE)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resamples float audio with soxr at high quality.

    Args:
      wave: float [S] or [S, channels].
      orig_sr: sample rate of `wave` in Hz.
      target_sr: wanted sample rate in Hz.

    Returns:
      float32 audio at `target_sr`, length about S * target_sr / orig_sr.

    Raises:
      AudioError: if a sample rate is not a positive integer.
    """
    for label, rate in (("orig_sr", orig_sr), ("target_sr", target_sr)):
        if int(rate) != rate or rate <= 0:
            raise AudioError(f"resample: {label} must be a positive integer in Hz, got {rate}")
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr or wave.shape[0] == 0:
        return wave
    return np.asarray(soxr.resample(wave, int(orig_sr), int(target_sr), quality="HQ"), np.float32)


def resampled_length(frames: int, orig_sr: int, target_sr: int) -> int:
    """Samples `resample` makes of `frames` samples: frames * target / orig, rounded
    half up (as soxr rounds)."""
    return (2 * frames * target_sr + orig_sr) // (2 * orig_sr)

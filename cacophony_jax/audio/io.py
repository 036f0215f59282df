"""Host-side audio decoding and encoding (numpy, soundfile, soxr).

Everything the model sees is 16 kHz mono int16: `load_audio` and
`decode_audio_bytes` decode WAV/FLAC/OGG/MP3, average channels to mono, resample with
soxr (high quality), clip to [-1, 1] and convert to int16. A 16 kHz mono 16-bit file
is read straight into int16 with no float round trip, which keeps the common case
(pre-converted corpora) cheap.

Every problem a user can cause (missing path, unreadable or corrupt file, no
samples, non-finite samples, unknown suffix) raises `AudioError`, a ValueError whose
message names the file and says what to do.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000

# int16 <-> float scale of the front end: x / 32768, so int16 -> float -> int16 is exact.
_INT16_SCALE = 32768.0

_FORMATS_HINT = "WAV, FLAC, OGG (Vorbis/Opus) or MP3"
_CONVERT_HINT = "convert it to 16 kHz mono WAV (e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`)"
_MP3_SUPPORTED = "MP3" in sf.available_formats()

# Output container and encoding for each suffix `write_audio` accepts.
_WRITE_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}
if _MP3_SUPPORTED:
    _WRITE_FORMATS[".mp3"] = ("MP3", "MPEG_LAYER_III")


class AudioError(ValueError):
    """An audio file or buffer that cannot be used; the message names it and the fix."""


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


def _check_request(sample_rate: int, max_seconds: float | None) -> None:
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise AudioError(f"sample_rate must be a positive integer in Hz, got {sample_rate}")
    if max_seconds is not None and not max_seconds > 0:
        raise AudioError(f"max_seconds must be positive or None, got {max_seconds}")


def _decode(
    source: str | io.BytesIO | BinaryIO, name: str, sample_rate: int, max_seconds: float | None
) -> np.ndarray:
    """Decodes an opened source (path or buffer) to mono int16 at `sample_rate`."""
    try:
        with sf.SoundFile(source) as handle:
            rate = handle.samplerate
            limit = -1 if max_seconds is None else math.ceil(max_seconds * rate)
            if rate == sample_rate and handle.channels == 1 and handle.subtype == "PCM_16":
                audio = handle.read(limit, dtype="int16")
                if audio.size == 0:
                    raise AudioError(f"{name} contains no audio samples; replace or drop it")
                return audio
            wave = handle.read(limit, dtype="float32", always_2d=True)
    except sf.SoundFileError as err:
        # libsndfile says "does not exist or is not a regular file" for some files it
        # cannot parse (e.g. a damaged MP3); the file is there (checked before).
        why = str(err).replace("File does not exist or is not a regular file (possibly a "
                               "pipe?)", "not a file it can parse")
        raise AudioError(
            f"cannot decode {name} ({why}); it may be corrupt or not {_FORMATS_HINT}: "
            f"{_CONVERT_HINT}, or drop it"
        ) from err
    if wave.size == 0:
        raise AudioError(f"{name} contains no audio samples; replace or drop it")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name} holds NaN or infinite samples; re-export or drop it")
    mono = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    mono = resample(mono, rate, sample_rate)
    if max_seconds is not None:
        mono = mono[: math.ceil(max_seconds * sample_rate)]
    return to_int16(mono)


def load_audio(
    path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """Reads an audio file as mono int16 at `sample_rate`.

    Args:
      path: a WAV, FLAC, OGG or MP3 file (anything libsndfile reads).
      sample_rate: output rate in Hz; other rates are resampled with soxr.
      max_seconds: if set, only the first `max_seconds` of the file are decoded.

    Returns:
      int16 [S] waveform.

    Raises:
      AudioError: if the file is missing, unreadable, corrupt, empty or non-finite.
    """
    _check_request(sample_rate, max_seconds)
    path = pathlib.Path(path)
    if not path.exists():
        raise AudioError(f"audio file {path} does not exist; check the path")
    if path.is_dir():
        raise AudioError(f"{path} is a folder, not an audio file; pass a file path")
    if not os.access(path, os.R_OK):
        raise AudioError(f"audio file {path} is not readable; check its permissions")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file {path} is empty (0 bytes); replace or drop it")
    if path.suffix.lower() == ".mp3" and not _MP3_SUPPORTED:
        raise AudioError(f"this libsndfile build cannot decode MP3 ({path}); {_CONVERT_HINT}")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        # A name that is not UTF-8 (e.g. Latin-1 bytes from an old archive): libsndfile
        # only takes UTF-8 names, so it reads the file through Python instead.
        with open(path, "rb") as f:
            return _decode(f, os.fsencode(path).decode("utf-8", "backslashreplace"),
                           sample_rate, max_seconds)
    return _decode(str(path), str(path), sample_rate, max_seconds)


def decode_audio_bytes(
    data: bytes, name: str, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """Decodes an encoded audio file held in memory as mono int16 at `sample_rate`.

    Args:
      data: the bytes of a WAV, FLAC, OGG or MP3 file.
      name: what to call the data in error messages (its file name or record id).
      sample_rate: output rate in Hz; other rates are resampled with soxr.
      max_seconds: if set, only the first `max_seconds` are decoded.

    Returns:
      int16 [S] waveform.

    Raises:
      AudioError: if the data is empty, corrupt or holds no or non-finite samples.
    """
    _check_request(sample_rate, max_seconds)
    if not data:
        raise AudioError(f"audio {name} is empty (0 bytes); replace or drop it")
    return _decode(io.BytesIO(data), name, sample_rate, max_seconds)


def write_audio(
    path: str | os.PathLike, audio_int16: np.ndarray, sample_rate: int = SAMPLE_RATE
) -> None:
    """Writes int16 audio, choosing the format from the suffix.

    .wav and .flac are 16-bit PCM (lossless); .ogg is Vorbis; .mp3 (where libsndfile
    can encode it) is MPEG layer III. The lossy formats do not round-trip exactly.

    Args:
      path: output file; its suffix picks the format.
      audio_int16: int16 [S] (mono) or [S, channels].
      sample_rate: sample rate in Hz stored in the file.

    Raises:
      AudioError: on an unknown suffix, non-int16 audio or a failed write.
    """
    _check_request(sample_rate, None)
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITE_FORMATS:
        raise AudioError(
            f"cannot write {path}: unknown suffix {suffix!r}; use one of {sorted(_WRITE_FORMATS)}"
        )
    audio = np.asarray(audio_int16)
    if audio.dtype != np.int16 or audio.ndim not in (1, 2):
        raise AudioError(
            f"write_audio({path}) expects int16 [samples] or [samples, channels], got "
            f"{audio.dtype} {audio.shape}; convert float audio with to_int16"
        )
    container, subtype = _WRITE_FORMATS[suffix]
    try:
        sf.write(str(path), audio, int(sample_rate), format=container, subtype=subtype)
    except (sf.SoundFileError, OSError) as err:
        raise AudioError(
            f"cannot write {path} ({err}); check that its folder exists and is writable"
        ) from err

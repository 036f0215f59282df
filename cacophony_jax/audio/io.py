"""Host-side audio decoding and encoding of files and encoded bytes (soundfile).

Everything the model sees is 16 kHz mono int16: `load_audio` and
`decode_audio_bytes` decode WAV/FLAC/OGG/MP3, average channels to mono, resample with
soxr (high quality), clip to [-1, 1] and convert to int16. A 16 kHz mono 16-bit file
is read straight into int16 with no float round trip, which keeps the common case
(pre-converted corpora) cheap. `load_audio_clip` decodes one clip of a long file,
only its window. The conversions of samples in memory (`to_int16`, `to_float32`,
`resample`, `resampled_length`) and `AudioError` are `audio/samples.py`'s, and
importable from here too.

Every problem a user can cause (missing path, unreadable or corrupt file, no
samples, non-finite samples, unknown suffix) raises `AudioError`, a ValueError whose
message names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
from absl import logging

from cacophony_jax.audio.samples import (  # noqa: F401 - part of this module's API
    SAMPLE_RATE,
    AudioError,
    existing_form,
    resample,
    resampled_length,
    to_float32,
    to_int16,
)

_FORMATS_HINT = "WAV, FLAC, OGG (Vorbis/Opus) or MP3"
_CONVERT_HINT = "convert it to 16 kHz mono WAV (e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`)"
_MP3_SUPPORTED = "MP3" in sf.available_formats()
# A damaged MP3 makes libmpg123 (inside libsndfile) write lines of its own to the
# process's stderr. They cannot be silenced from here: libsndfile gives no way to set
# its quiet flag, and redirecting file descriptor 2 around a decode would also take
# what other threads (Grain's readers, the trainer) write meanwhile. The error says
# whose lines they are; training decodes such a file only once per process.
_MP3_NOISE = "libmpg123 may have printed lines about it on stderr"

# Output container and encoding for each suffix `write_audio` accepts.
_WRITE_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}
if _MP3_SUPPORTED:
    _WRITE_FORMATS[".mp3"] = ("MP3", "MPEG_LAYER_III")


def _check_request(sample_rate: int, max_seconds: float | None) -> None:
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise AudioError(f"sample_rate must be a positive integer in Hz, got {sample_rate}")
    if max_seconds is not None and not max_seconds > 0:
        raise AudioError(f"max_seconds must be positive or None, got {max_seconds}")


@contextlib.contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """Turns libsndfile's errors into an AudioError that names the file and the fix."""
    try:
        yield
    except sf.SoundFileError as err:
        # libsndfile says "does not exist or is not a regular file" for some files it
        # cannot parse (e.g. a damaged MP3); the file is there (checked before).
        why = str(err).replace("File does not exist or is not a regular file (possibly a "
                               "pipe?)", "not a file it can parse")
        if name.lower().endswith(".mp3"):
            why += f"; {_MP3_NOISE}"
        raise AudioError(
            f"cannot decode {name} ({why}); it may be corrupt or not {_FORMATS_HINT}: "
            f"{_CONVERT_HINT}, or drop it"
        ) from err


def _to_mono_int16(wave: np.ndarray, name: str, rate: int, sample_rate: int) -> np.ndarray:
    # float [S, channels] at `rate` -> mono int16 at `sample_rate`.
    if wave.size == 0:
        raise AudioError(f"{name} contains no audio samples; replace or drop it")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name} holds NaN or infinite samples; re-export or drop it")
    mono = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    return to_int16(resample(mono, rate, sample_rate))


def _is_native(handle: sf.SoundFile, sample_rate: int) -> bool:
    # Read straight into int16, no float round trip.
    return handle.samplerate == sample_rate and handle.channels == 1 and handle.subtype == "PCM_16"


# libsndfile reports a length of 2**63 - 1 frames for a stream whose header does not
# say (e.g. a FLAC piped out of ffmpeg); such files are read block by block.
_UNKNOWN_FRAMES = 2**62
_BLOCK_FRAMES = 1 << 20


def _known_length(handle: sf.SoundFile) -> bool:
    return 0 < handle.frames < _UNKNOWN_FRAMES


def _read_frames(handle: sf.SoundFile, frames: int, name: str, **kw: Any) -> np.ndarray:
    # handle.read, except that "to the end" of a file of unknown length reads blocks
    # until the end instead of allocating 2**63 frames.
    if frames >= 0 or _known_length(handle):
        return handle.read(frames, **kw)
    blocks = []
    try:
        while True:
            block = handle.read(_BLOCK_FRAMES, **kw)
            blocks.append(block)
            if len(block) < _BLOCK_FRAMES:
                return np.concatenate(blocks)
    except sf.SoundFileError as err:  # libsndfile cannot step through such a FLAC
        raise AudioError(
            f"cannot decode {name}: its header does not give its length (e.g. a FLAC "
            f"written to a pipe) and libsndfile cannot read it ({err}); re-encode it "
            "to a file (`ffmpeg -i IN OUT.flac`) or drop it") from None


def _read(handle: sf.SoundFile, name: str, sample_rate: int, frames: int = -1) -> np.ndarray:
    # Up to `frames` input frames (-1: to the end) from the handle's position, as mono
    # int16 at `sample_rate`.
    if _is_native(handle, sample_rate):
        audio = _read_frames(handle, frames, name, dtype="int16")
        if audio.size == 0:
            raise AudioError(f"{name} contains no audio samples; replace or drop it")
        return audio
    wave = _read_frames(handle, frames, name, dtype="float32", always_2d=True)
    return _to_mono_int16(wave, name, handle.samplerate, sample_rate)


def _decode(
    source: str | io.BytesIO | BinaryIO, name: str, sample_rate: int, max_seconds: float | None
) -> np.ndarray:
    """Decodes an opened source (path or buffer) to mono int16 at `sample_rate`."""
    with _decode_errors(name), sf.SoundFile(source) as handle:
        limit = -1 if max_seconds is None else math.ceil(max_seconds * handle.samplerate)
        audio = _read(handle, name, sample_rate, limit)
    if max_seconds is not None:
        audio = audio[: math.ceil(max_seconds * sample_rate)]
    return _not_empty(audio, name, sample_rate)


def _not_empty(audio: np.ndarray, name: str, sample_rate: int) -> np.ndarray:
    # A whole decode: frames that make less than one sample at `sample_rate` (one frame
    # at 48 kHz) are no audio either.
    if audio.size == 0:
        raise AudioError(f"{name} contains no audio samples at {sample_rate} Hz (it is too "
                         "short); replace or drop it")
    return audio


# Only files at least this many times longer than the wanted clip are decoded in a
# window; shorter ones are decoded whole and cropped (exactly as `load_audio` + slice).
WINDOW_FACTOR = 2
# Extra audio decoded on each side of a resampled window, so that the resampling
# filter's edges fall outside the clip (50 ms; soxr's HQ filters are far shorter).
_WINDOW_MARGIN_SECONDS = 0.05
# After a seek, libmpg123 gives silence fading in until its bit reservoir refills
# (measured up to 40 ms of a VBR 48 kHz file): MP3 windows start further back.
_MP3_MARGIN_SECONDS = 0.2


def _decode_clip(source: str | BinaryIO, name: str, sample_rate: int, length: int,
                 choose_start: Callable[[int], int]) -> tuple[np.ndarray, int]:
    with _decode_errors(name), sf.SoundFile(source) as handle:
        if _windowed(handle, sample_rate, length):
            total = resampled_length(handle.frames, handle.samplerate, sample_rate)
            start = int(choose_start(total))
            clip = _window(handle, name, sample_rate, start, length)
            if clip.size >= min(length, total - start):
                return clip, total
            # Fewer samples than the header promised (a VBR MP3 without a length
            # header, a partly downloaded file): its length is found by decoding it.
            logging.debug("%s: the header says %d frames, which it lacks; decoding it "
                          "whole", name, handle.frames)
        else:
            whole = _not_empty(_read(handle, name, sample_rate), name, sample_rate)
            start = int(choose_start(whole.size))
            return whole[start:start + length], whole.size
    if not isinstance(source, str):
        source.seek(0)
    whole = _decode(source, name, sample_rate, None)
    start = int(choose_start(whole.size))
    return whole[start:start + length], whole.size


def _windowed(handle: sf.SoundFile, sample_rate: int, length: int) -> bool:
    # Whether to decode only a window: a file of known length at least WINDOW_FACTOR
    # clips long. Not MPEG-2/2.5 MP3 (under 32 kHz), whose seeks make libmpg123 print
    # "part2_3_length ... too large" on stderr (harmless, but it floods the log).
    if not _known_length(handle):
        return False
    if handle.format == "MP3" and handle.samplerate < 32000:
        return False
    return resampled_length(handle.frames, handle.samplerate, sample_rate) >= (
        WINDOW_FACTOR * length)


def _window(handle: sf.SoundFile, name: str, sample_rate: int, start: int,
            length: int) -> np.ndarray:
    # Samples [start, start + length) at `sample_rate`; fewer (maybe none) when the
    # file is shorter than its header says.
    rate, frames = handle.samplerate, handle.frames
    if _is_native(handle, sample_rate):
        in_start, in_stop, offset = start, min(frames, start + length), 0
    else:
        # Decode from a point where the input and output sample grids meet (a multiple
        # of rate / gcd), a margin before the clip, so the window's samples are those
        # of the whole file's resampling.
        g = math.gcd(rate, sample_rate)
        step_in, step_out = rate // g, sample_rate // g
        margin = math.ceil(sample_rate * (_MP3_MARGIN_SECONDS if handle.format == "MP3"
                                          else _WINDOW_MARGIN_SECONDS))
        block = max(0, start - margin) // step_out
        in_start, offset = block * step_in, start - block * step_out
        in_stop = min(frames, math.ceil((start + length + margin) * rate / sample_rate))
    empty = np.zeros(0, np.int16)
    if in_stop <= in_start:
        return empty
    try:
        handle.seek(in_start)
        audio = _read(handle, name, sample_rate, in_stop - in_start)
    except sf.SoundFileError:
        return empty  # e.g. a seek past where a truncated file ends
    except AudioError as err:
        if "no audio samples" not in str(err):
            raise
        return empty
    return audio[offset:offset + length]


def _opened(path: str | os.PathLike) -> tuple[str | BinaryIO, str]:
    """Checks an audio path; returns (what libsndfile opens, the name for messages)."""
    path = pathlib.Path(path)
    if not path.exists():  # perhaps its accents are spelt in the other Unicode form
        path = pathlib.Path(existing_form(os.fspath(path)))
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
        # only takes UTF-8 names, so the file is read through Python instead.
        return open(path, "rb"), os.fsencode(path).decode("utf-8", "backslashreplace")
    return str(path), str(path)


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
    source, name = _opened(path)
    with contextlib.ExitStack() as stack:
        if not isinstance(source, str):
            stack.enter_context(source)
        return _decode(source, name, sample_rate, max_seconds)


def load_audio_clip(path: str | os.PathLike, length: int,
                    choose_start: Callable[[int], int],
                    sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """Reads `length` samples of an audio file from a start chosen by its length.

    A file at least `WINDOW_FACTOR` times longer than `length` (by its header) has
    only that window decoded, so a training clip cut from an hour-long recording costs
    what a short file does. Shorter files are decoded whole, which gives exactly
    `load_audio(path)[start:start + length]`; a resampled window matches the whole
    file's resampling to one int16 step. Compressed formats start where their decoder
    seeks to: libsndfile's Vorbis seeks into a file's last page land a few
    milliseconds late, and an Opus window differs from the whole decode by tens of
    steps for its first second or two while the decoder settles. A file that turns
    out shorter than its header says, or whose header gives no length, is decoded
    whole; so are MP3s under 32 kHz (their seeks flood stderr with libmpg123
    warnings).

    Args:
      path: a WAV, FLAC, OGG or MP3 file.
      length: samples wanted at `sample_rate`.
      choose_start: called with the file's length in samples at `sample_rate`;
        returns where the clip starts (0 <= start; past the end gives a short clip).
        Called once, or twice when the header's length proves wrong (then with the
        real length).
      sample_rate: output rate in Hz.

    Returns:
      (int16 [<= length] audio from the start, the file's length in samples). The
      audio is shorter than `length` when the file ends first.

    Raises:
      AudioError: as `load_audio` (e.g. a truncated FLAC whose missing part the
        window or the whole decode reaches).
    """
    _check_request(sample_rate, None)
    if length < 1:
        raise AudioError(f"load_audio_clip: length must be at least 1 sample, got {length}")
    source, name = _opened(path)
    with contextlib.ExitStack() as stack:
        if not isinstance(source, str):
            stack.enter_context(source)
        return _decode_clip(source, name, sample_rate, length, choose_start)


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

"""Model input audio: paths and arrays -> 16 kHz mono int16 clips, windows, length buckets.

The rules (which inputs are accepted, how long audio is cut into windows, how lengths
and batch sizes are bucketed so jitted functions are reused) are those documented in
`cacophony_jax.inference`, whose model calls these functions on the host.
"""

from __future__ import annotations

import collections
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from cacophony_jax.audio import frontend, io, patches

SAMPLE_RATE = io.SAMPLE_RATE
STEP_SAMPLES = patches.PATCH * frontend.HOP  # one time step of patches: 2560 samples
MIN_SAMPLES = (patches.PATCH - 1) * frontend.HOP + 1  # 16 frames: ceil(n / 160) >= 16
MIN_LAST_WINDOW = SAMPLE_RATE  # a trailing partial window shorter than 1 s is dropped
MAX_CHANNELS = 8  # a 2-D array this narrow is taken for [samples, channels]
AudioInput = str | os.PathLike | np.ndarray | Sequence[Any]


def to_clips(audio: AudioInput, sample_rate: int | None) -> list[np.ndarray]:
    """Every input clip as mono int16 at 16 kHz.

    Args:
      audio: a path, a 1-D array, a 2-D [n, samples] batch, or a sequence of paths and
        1-D arrays.
      sample_rate: the rate of array inputs in Hz (required for arrays).

    Returns:
      One int16 [S] array per clip.
    """
    if not isinstance(audio, (np.ndarray, Sequence, os.PathLike)) and hasattr(audio,
                                                                              "__array__"):
        audio = np.asarray(audio)  # a JAX or other array type
    if isinstance(audio, (str, bytes, os.PathLike)):
        items: list[Any] = [audio]
    elif isinstance(audio, np.ndarray):
        if audio.ndim == 2 and audio.shape[1] <= MAX_CHANNELS:
            raise io.AudioError(
                f"an audio array of shape {audio.shape} looks like [samples, channels] "
                "multi-channel audio; average the channels to mono first "
                "(audio.mean(axis=1)); a batch of clips is [n, samples]")
        if audio.ndim not in (1, 2):
            raise io.AudioError(f"an audio array must be [samples] or [n, samples], got "
                                f"shape {audio.shape}")
        items = [audio] if audio.ndim == 1 else list(audio)
    elif isinstance(audio, Iterable):  # a list, tuple, generator, ...
        items = list(audio)
        if items and all(isinstance(x, numbers.Number) for x in items):
            raise io.AudioError(
                f"a list of {len(items)} numbers is read as a list of clips; for one clip "
                "pass its samples as an array (np.asarray(samples))")
    else:
        raise io.AudioError(f"audio must be a path, a 1-D array of samples, a 2-D [n, "
                            f"samples] array or a list of paths and arrays; got "
                            f"{type(audio).__name__}")
    sample_rate = _sample_rate(sample_rate)
    return [to_clip(item, i, sample_rate) for i, item in enumerate(items)]


def _sample_rate(sample_rate: Any) -> int | None:
    """`sample_rate` as a whole number of Hz (None stays None)."""
    if sample_rate is None:
        return None
    if (isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real)
            or not np.isfinite(sample_rate) or sample_rate <= 0
            or sample_rate != int(sample_rate)):
        raise io.AudioError(f"sample_rate must be a positive whole number of Hz, got "
                            f"{sample_rate!r} ({type(sample_rate).__name__})")
    return int(sample_rate)


def to_clip(item: Any, index: int, sample_rate: int | None) -> np.ndarray:
    """One clip (a path or a 1-D float/int16 array) as mono int16 at 16 kHz.

    Args:
      item: the clip.
      index: its position in the request (for messages).
      sample_rate: the rate of an array in Hz (required for arrays).

    Returns:
      int16 [S] with S >= MIN_SAMPLES.
    """
    if isinstance(item, (str, bytes, os.PathLike)):
        clip = io.load_audio(os.fsdecode(item), SAMPLE_RATE)
    elif not isinstance(item, (np.ndarray, Sequence)) and not hasattr(item, "__array__"):
        raise io.AudioError(f"clip {index} is a {type(item).__name__}; a clip is a path or "
                            "a 1-D array of samples")
    else:
        arr = np.asarray(item)
        if arr.ndim == 2 and min(arr.shape) <= MAX_CHANNELS:
            axis = int(np.argmin(arr.shape))
            layout = "[channels, samples]" if axis == 0 else "[samples, channels]"
            raise io.AudioError(
                f"clip {index} has shape {arr.shape}, which looks like {layout} "
                f"multi-channel audio; average the channels to mono first "
                f"(audio.mean(axis={axis}))")
        if arr.ndim != 1:
            raise io.AudioError(f"clip {index} must be a 1-D mono waveform, got shape "
                                f"{arr.shape}")
        if sample_rate is None:
            raise io.AudioError(
                f"clip {index} is an array but no sample_rate was given; pass "
                f"sample_rate= its rate in Hz (it is resampled to {SAMPLE_RATE} Hz)")
        if arr.dtype == np.int16:
            clip = arr if sample_rate == SAMPLE_RATE else io.to_int16(
                io.resample(io.to_float32(arr), sample_rate, SAMPLE_RATE))
        elif np.issubdtype(arr.dtype, np.floating):
            _check_float_range(arr, index)
            clip = io.to_int16(io.resample(arr.astype(np.float32), sample_rate, SAMPLE_RATE))
        else:
            raise io.AudioError(f"clip {index} has dtype {arr.dtype}; pass float audio in "
                                "[-1, 1] or int16")
    if clip.shape[0] < MIN_SAMPLES:
        raise io.AudioError(
            f"clip {index} is {clip.shape[0]} samples long at {SAMPLE_RATE} Hz; the model "
            f"needs at least {MIN_SAMPLES} (one 16-frame patch): pad it with silence")
    return clip


_warned_loud = False


def _check_float_range(arr: np.ndarray, index: int) -> None:
    """Warns once per process about float audio far outside [-1, 1] (it is clipped):
    most often int16 samples cast to float without scaling."""
    global _warned_loud
    if _warned_loud or not arr.size:
        return
    finite = arr[np.isfinite(arr)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak > 1.5:
        _warned_loud = True
        logging.warning("clip %d is float audio with peak %.4g; float samples should lie in "
                        "[-1, 1] and are clipped there (int16 samples cast to float need "
                        "dividing by 32768); this is said once", index, peak)


def patch_steps(samples: int) -> int:
    """Patch time steps of a clip of `samples` samples.

    Args:
      samples: the clip length at 16 kHz.

    Returns:
      Whole 16-frame steps.
    """
    return patches.num_patches(frontend.num_frames(samples)) // patches.FREQ_PATCHES


def split_windows(clip: np.ndarray, window: int) -> list[np.ndarray]:
    """Cuts a clip longer than `window` into consecutive windows (the long-audio rule).

    Args:
      clip: int16 [S].
      window: window length in samples.

    Returns:
      The clip itself when it fits one window, else its windows; a last window
      shorter than MIN_LAST_WINDOW is dropped.
    """
    if clip.shape[0] <= window:
        return [clip]
    pieces = [clip[s:s + window] for s in range(0, clip.shape[0], window)]
    if pieces[-1].shape[0] < MIN_LAST_WINDOW:
        pieces.pop()
    return pieces


def bucket_rows(rows: int, batch_size: int) -> int:
    """The batch size `rows` rows are padded to: a power of two, at most `batch_size`.

    Args:
      rows: real rows.
      batch_size: the largest batch run at once.

    Returns:
      The padded row count.
    """
    size = 1
    while size < rows:
        size *= 2
    return min(size, batch_size)


def pad_rows(chunk: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Pads arrays of equal leading size to `bucket_rows` by repeating their first row.

    Args:
      chunk: arrays [rows, ...] with at most `batch_size` rows.
      batch_size: the largest batch run at once.

    Returns:
      The arrays with the bucketed number of rows (the extra rows' results are dropped).
    """
    rows = chunk[0].shape[0]
    size = bucket_rows(rows, batch_size)
    if size <= rows:
        return chunk
    return [np.concatenate([c, np.repeat(c[:1], size - rows, 0)]) for c in chunk]


def bucket_samples(samples: int, window: int) -> int:
    """The length a clip is zero-padded to: a power of two of patch steps, topped by
    the window for clips that fit one.

    Args:
      samples: the clip length.
      window: the window length in samples.

    Returns:
      The padded length in samples.
    """
    size = STEP_SAMPLES
    while size < samples:
        size *= 2
    return min(size, window) if samples <= window else size


def length_groups(clips: Sequence[np.ndarray], window: int
                  ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Groups clips by `bucket_samples` and pads each group into one batch.

    Args:
      clips: int16 [S] clips.
      window: the window length in samples.

    Yields:
      (indices of the group's clips, int16 audio [n, bucket], int32 lengths [n]),
      shortest bucket first.
    """
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for i, clip in enumerate(clips):
        groups[bucket_samples(clip.shape[0], window)].append(i)
    for samples, index in sorted(groups.items()):
        audio = np.zeros((len(index), samples), np.int16)
        lengths = np.zeros(len(index), np.int32)
        for row, i in enumerate(index):
            audio[row, :clips[i].shape[0]] = clips[i]
            lengths[row] = clips[i].shape[0]
        yield index, audio, lengths

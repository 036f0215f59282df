"""Audio files in bulk: find them under folders, decode them in threads, and run a
model over batches of clips (or of a source's records) without letting one bad clip
sink the batch.

Used by the command line (embed, caption), synthetic captioning and the dataset
evaluation runner. Decoding failures are returned, not raised, so callers can count
and skip unreadable files.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import soundfile as sf

from cacophony_jax.audio.io import AudioError, load_audio, to_float32

AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3")


def find_audio_files(inputs: Sequence[str], extensions: Sequence[str] = AUDIO_EXTENSIONS
                     ) -> list[tuple[str, str]]:
    """Audio files named directly or found (recursively, sorted) under folders.

    Args:
      inputs: files and folders.
      extensions: suffixes to collect from folders (case-insensitive, no dot); files
        named directly are taken whatever their suffix.

    Returns:
      (path, name) pairs: name is the path relative to its folder, or the path itself
      for a file named directly. A file reached twice (named and also in a folder
      given, a folder given twice, or through a link) comes once, where it was first
      reached.
    """
    suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)
    found = []
    taken: set[str] = set()

    def add(path: str, name: str) -> None:
        key = os.path.realpath(path)
        if key not in taken:
            taken.add(key)
            found.append((path, name))

    for item in inputs:
        if os.path.isfile(item):
            add(item, item)
        elif os.path.isdir(item):
            seen = set()  # linked folders are followed, each real folder once
            for folder, subfolders, files in os.walk(item, followlinks=True):
                real = os.path.realpath(folder)
                if real in seen:
                    subfolders.clear()
                    continue
                seen.add(real)
                subfolders.sort()
                for name in sorted(files):
                    if name.lower().endswith(suffixes) and not name.startswith("."):
                        path = os.path.join(folder, name)
                        add(path, os.path.relpath(path, item))
        else:
            raise AudioError(f"{item} does not exist; pass audio files or folders")
    return found


def decode_file(path: str) -> np.ndarray | Exception:
    """A file as float32 audio at 16 kHz, or the error that stopped its decoding.

    Args:
      path: the audio file.

    Returns:
      float32 [S], or the AudioError/OSError.
    """
    try:
        return to_float32(load_audio(path))
    except (AudioError, OSError) as e:
        return e


def decode_record(record: dict[str, Any]) -> np.ndarray | Exception:
    """A source record's audio (inline int16 "audio" or "audio_path") as float32.

    Args:
      record: a record of a data source.

    Returns:
      float32 [S] at 16 kHz, or the AudioError/OSError that stopped its decoding.
    """
    if "audio" not in record:
        return decode_file(record["audio_path"])
    try:
        return to_float32(np.asarray(record["audio"]))
    except AudioError as e:
        return e


def _seconds(path: str) -> float:
    """The length of an audio file from its header (0 where it cannot be read)."""
    try:
        return float(sf.info(path).duration)
    except Exception:  # noqa: BLE001 - decoding it reports what is wrong
        return 0.0


def _batches(paths: Sequence[str], batch_size: int, max_seconds: float) -> Iterator[list[str]]:
    # Up to batch_size files, and fewer when they add up to more than max_seconds of
    # audio: an archive of hour-long recordings must not be decoded 32 at a time.
    batch: list[str] = []
    seconds = 0.0
    for path in paths:
        length = _seconds(path)
        if batch and (len(batch) >= batch_size or seconds + length > max_seconds):
            yield batch
            batch, seconds = [], 0.0
        batch.append(path)
        seconds += length
    if batch:
        yield batch


def decode_files(paths: Sequence[str], batch_size: int, workers: int = 4,
                 max_seconds: float = 1800.0
                 ) -> Iterator[list[tuple[str, np.ndarray | Exception]]]:
    """Decodes files to float32 at 16 kHz in threads, one batch ahead of the consumer.

    Args:
      paths: audio files.
      batch_size: files per yielded batch.
      workers: decoding threads.
      max_seconds: audio per batch at most (by the files' headers; a longer file comes
        alone), which bounds the memory two decoded batches take.

    Yields:
      Lists of (path, float32 audio or the error that stopped its decoding).
    """
    batches = _batches(paths, max(1, batch_size), max_seconds)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ahead: collections.deque = collections.deque()
        for batch in batches:
            ahead.append((batch, [pool.submit(decode_file, p) for p in batch]))
            if len(ahead) > 1:
                done, futures = ahead.popleft()
                yield list(zip(done, (f.result() for f in futures), strict=True))
        while ahead:
            done, futures = ahead.popleft()
            yield list(zip(done, (f.result() for f in futures), strict=True))


def per_clip(fn: Callable[[list], Sequence], clips: list) -> list:
    """`fn` over a batch; if the batch is refused (ValueError), clip by clip.

    One bad clip (too short for a patch, say) then costs only itself.

    Args:
      fn: a batch function, e.g. `model.embed_audio` with its options bound.
      clips: its inputs.

    Returns:
      Per clip, its result or the ValueError it raised.
    """
    if not clips:
        return []
    try:
        return list(fn(clips))
    except ValueError:
        results = []
        for clip in clips:
            try:
                results.append(fn([clip])[0])
            except ValueError as e:
                # Alone in its call, the clip is "clip 0" there: not its place in the batch.
                text = str(e)
                results.append(type(e)("the clip" + text[6:]) if text.startswith("clip 0 ")
                               else e)
        return results


def map_records(fn: Callable[[list], Sequence], source: Any, count: int, batch_size: int,
                workers: int = 1) -> Iterator[tuple[list[dict[str, Any]], list]]:
    """`fn` over the decoded audio of a source's first `count` records, batch by batch.

    Args:
      fn: a batch function of float32 16 kHz clips (see `per_clip`).
      source: a data source (records with "audio" or "audio_path").
      count: records to run.
      batch_size: records per batch.
      workers: threads decoding audio.

    Yields:
      (records, results) per batch: per record, `fn`'s result on it or the error that
      stopped its decoding or its model call.
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, count, batch_size):
            records = [source[i] for i in range(start, min(start + batch_size, count))]
            results = list(pool.map(decode_record, records))
            keep = [i for i, a in enumerate(results) if not isinstance(a, Exception)]
            for i, out in zip(keep, per_clip(fn, [results[i] for i in keep]), strict=True):
                results[i] = out
            yield records, results

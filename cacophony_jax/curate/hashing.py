"""Content hashing of clips: the identity `curate build` deduplicates by, and its cache.

A clip's identity is the SHA-256 of its 16 kHz mono int16 samples (`audio_hash`), so
one recording stored twice, even as WAV and FLAC, hashes alike. Decoding is the slow
part, so file hashes are kept in an append-only `HashCache` keyed by path, size and
modification time: a rerun decodes only what is new or changed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cacophony_jax.audio.io import AudioError, existing_form, load_audio
from cacophony_jax.progress import Progress


def audio_hash(audio: np.ndarray) -> str:
    """SHA-256 (hex) of int16 samples as little-endian bytes: the clip's identity.

    Args:
      audio: int16 [S] at 16 kHz.

    Returns:
      64 hex digits.
    """
    return hashlib.sha256(np.asarray(audio, "<i2").tobytes()).hexdigest()


class HashCache:
    """Append-only JSONL cache of file hashes keyed by (path, size, mtime); thread-safe."""

    def __init__(self, path: str):
        """Loads the cache (dropping a line cut off by an interruption) and opens it.

        Args:
          path: the cache file (created if missing).
        """
        self._entries: dict[tuple[str, int, int], dict[str, Any]] = {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                with open(path, "rb+") as f:
                    f.truncate(keep)
            for line in data[:keep].splitlines():
                try:
                    entry = json.loads(line)
                    self._entries[(entry["path"], entry["size"], entry["mtime_ns"])] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged line only costs one redecode
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> dict[str, Any] | None:
        """The cached entry for (path, size, mtime_ns), or None."""
        return self._entries.get(key)

    def put(self, key: tuple[str, int, int], value: dict[str, Any]) -> None:
        """Stores {"sha256", "samples"} or {"error"} (of a readable file) for a key,
        flushed at once."""
        entry = {"path": key[0], "size": key[1], "mtime_ns": key[2], **value}
        with self._lock:
            self._entries[key] = entry
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Closes the file."""
        self._file.close()


def hash_record(record: dict[str, Any], cache: HashCache) -> dict[str, Any]:
    """Hashes one record's audio (inline int16 "audio" or "audio_path", through the cache).

    Args:
      record: a source record.
      cache: where file hashes are looked up and stored.

    Returns:
      {"sha256", "samples"}, or {"error": message} when the audio cannot be read.
    """
    if "audio" in record:
        audio = np.asarray(record["audio"])
        if audio.dtype != np.int16 or audio.ndim != 1 or not audio.size:
            return {"error": f"inline audio is {audio.dtype} {audio.shape}, not int16 samples"}
        return {"sha256": audio_hash(audio), "samples": int(audio.size)}
    path = record["audio_path"]
    try:
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # accents spelt in the other Unicode form, say
            path = existing_form(path)  # as load_audio finds it
            stat = os.stat(path)
    except OSError as e:
        return {"error": f"{path}: {e.strerror or e}"}
    key = (path, stat.st_size, stat.st_mtime_ns)
    cached = cache.get(key)
    if cached is not None:
        return cached
    try:
        audio = load_audio(path)
        value: dict[str, Any] = {"sha256": audio_hash(audio), "samples": int(audio.size)}
    except (AudioError, OSError) as e:
        value = {"error": str(e)}
        # Not the content's fault (a file this process may not read, an I/O error):
        # not cached, so a rerun after the fix (`chmod` keeps size and mtime) reads it.
        if isinstance(e, OSError) or not os.access(path, os.R_OK):
            return value
    cache.put(key, value)
    return value


def _ordered(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    # Bounded look-ahead: at most `window` items in flight, results in input order.
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def hash_source(source: Any, label: str, pool: ThreadPoolExecutor, cache: HashCache,
                window: int, progress: Progress | None) -> list[dict[str, Any]]:
    """Hashes every record of a source in the pool's threads, in source order.

    Args:
      source: the source.
      label: progress label.
      pool: the threads.
      cache: the hash cache.
      window: records in flight at most.
      progress: called as progress(label, done, total).

    Returns:
      Per record, `hash_record`'s entry plus "record" (its metadata, inline audio
      dropped) and "index".
    """
    total = len(source)
    results = []

    def work(index: int) -> dict[str, Any]:
        record = source[index]
        value = hash_record(record, cache)
        # Keep the metadata only: inline audio is read again when the split is written.
        record = {k: v for k, v in record.items() if k != "audio"}
        return {**value, "record": record, "index": index}

    for done, entry in enumerate(_ordered(pool, work, range(total), window), 1):
        results.append(entry)
        if progress:
            progress(f"hash {label}", done, total)
    return results

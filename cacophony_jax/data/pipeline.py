"""Grain input pipelines: per-host, numpy only, deterministic and resumable.

Train: record indices -> seeded global shuffle, repeated with a new order per epoch
-> random crop of the record's audio, decoding only that window of a long file (a
record that fails, or is shorter than one patch, is replaced by another and counted)
-> pad to the clip length, caption choice, tokenise -> this
host's rows of every global batch of that one stream (`HostRows`) -> batch. The
iterator's state (`get_state`/`set_state`) resumes exactly. How a record is
drawn (decoded, cropped, or replaced) is `data/records.py`.

Eval: every record exactly once, in order, split over hosts; every host yields the
same number of batches, the last padded with rows whose `valid` is 0. A record that
fails, or is shorter than one patch, is a row whose `valid` is 0 too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from cacophony_jax.audio import io
from cacophony_jax.audio.clips import MIN_SAMPLES
from cacophony_jax.data.records import (  # noqa: F401 - part of this module's API
    DecodedSource,
    check_captions,
    choose_caption,
    crop_or_pad,
)
from cacophony_jax.data.sources import SourceError, metadata_rows


@dataclasses.dataclass(frozen=True)
class ExampleFormat:
    """How a record becomes a fixed-shape example.

    Attributes:
      clip_samples: samples per clip at 16 kHz (crop or zero-pad).
      text_length: tokens per caption; 0 for audio-only tasks (stage 1).
      synthetic_prob: chance of using a synthetic caption when the clip has one.
      tokenizer: a picklable tokenizer with `encode(texts, length, eos_when_cut=...)`
        (see data/tokenizer.py); None if no text.
    """

    clip_samples: int
    text_length: int = 0
    synthetic_prob: float = 0.0
    tokenizer: Any = None


class PrepareTrain(grain.transforms.RandomMap):
    """Draw `index`: decode (a random crop), caption choice and tokenisation."""

    def __init__(self, fmt: ExampleFormat, decoded: DecodedSource):
        self.fmt = fmt
        self.decoded = decoded

    def random_map(self, index: int, rng: np.random.Generator) -> dict:
        return self.example(self.decoded.draw(int(index), self.fmt.clip_samples, rng), rng)

    def example(self, record: dict[str, Any], rng: np.random.Generator) -> dict:
        """The example of a drawn record (its `audio` already cropped)."""
        clip, length = crop_or_pad(record["audio"], self.fmt.clip_samples, 0)
        out = {
            "audio": clip,
            "audio_len": np.int32(length),
            "valid": np.float32(1.0),
            "num_failed": np.int32(record["num_failed"]),
        }
        if self.fmt.text_length:
            caption = choose_caption(record, self.fmt.synthetic_prob, rng)
            ids, mask = self.fmt.tokenizer.encode([caption], self.fmt.text_length,
                                                  eos_when_cut=False)
            out["text_ids"] = ids[0].astype(np.int32)
            out["text_mask"] = mask[0].astype(np.int32)
        return out


def host_batch_size(global_batch_size: int) -> int:
    """This host's share of the global batch (the global batch must divide evenly)."""
    count = jax.process_count()
    if global_batch_size % count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{count} processes; choose a multiple of {count}"
        )
    return global_batch_size // count


class HostRows(grain.MapDataset):
    """Host `index`'s rows of every global batch of a stream from global batch `first`
    on: its element j is the stream's element ((j // P + first) * count + index) * P +
    j % P, with P rows per host."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, per_host: int,
                 first: int = 0):
        super().__init__(parent)
        self._index, self._count, self._per_host, self._first = index, count, per_host, first
        self._length = max(0, len(parent) // count // per_host - first) * per_host

    def __len__(self) -> int:
        return self._length

    def _position(self, j: int) -> int:
        batch, row = divmod(j, self._per_host)
        return ((batch + self._first) * self._count + self._index) * self._per_host + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            raise TypeError("HostRows cannot be sliced")
        return self._parent[self._position(index)]

    def __str__(self) -> str:
        return (f"HostRows(host {self._index} of {self._count}, {self._per_host} rows each, "
                f"from batch {self._first})")


def train_dataset(source: Any, fmt: ExampleFormat, *, global_batch_size: int, seed: int,
                  num_workers: int = 0, read_threads: int = 4,
                  prefetch_batches: int = 2, first_batch: int = 0) -> grain.IterDataset:
    """The infinite, shuffled, batched training dataset of this host.

    Args:
      source: a random-access source (see data/sources.py).
      fmt: how records become examples.
      global_batch_size: examples per step over all hosts.
      seed: shuffle and augmentation seed.
      num_workers: Grain worker processes (0 = threads in this process).
      read_threads: reader threads per process.
      prefetch_batches: batches buffered per worker.
      first_batch: the global batch to start from: the stream from there is the same
        as that of an iterator started at 0 after `first_batch` batches (used to resume
        where a saved iterator state cannot be restored).

    Returns:
      A Grain IterDataset; `iter()` of it is a checkpointable DatasetIterator.
    """
    if len(source) == 0:
        raise ValueError(f"training source {getattr(source, 'name', source)!r} is empty")
    if fmt.text_length > 0:
        check_captions(source)
    decoded = DecodedSource(source, needs_captions=fmt.text_length > 0)
    index, count = jax.process_index(), jax.process_count()
    if len(decoded) < count:
        raise ValueError(f"{len(decoded)} training records cannot feed {count} hosts")
    # One global stream (a new order every epoch, crops keyed by the position in it);
    # global batch b is the stream's run [b * G, (b + 1) * G) in that order, host i
    # holding its rows [i * P, (i + 1) * P): the same batches, rows in the same order,
    # whatever the number of hosts, and no two hosts share crops or groups.
    # The records are decoded in `PrepareTrain`, once the crop is drawn, so that only
    # the crop of a long file is decoded.
    ds = grain.MapDataset.range(len(decoded)).seed(seed).shuffle().repeat(None)
    ds = ds.random_map(PrepareTrain(fmt, decoded))
    per_host = host_batch_size(global_batch_size)
    if first_batch < 0:
        raise ValueError(f"first_batch must be at least 0, got {first_batch}")
    if count > 1 or first_batch:
        ds = HostRows(ds, index, count, per_host, first_batch)
    # Records are decoded by `read_threads` threads in parallel, then batched.
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads,
        prefetch_buffer_size=max(read_threads, per_host * max(1, prefetch_batches))))
    iter_ds = iter_ds.batch(per_host, drop_remainder=True)
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # used from Python, not the command line:
            flags.FLAGS.mark_as_parsed()  # Grain's workers read its flags' defaults
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(1, prefetch_batches)),
            worker_init_fn=_leave_interrupts_to_the_trainer)
    return iter_ds


def _leave_interrupts_to_the_trainer(worker_index: int, worker_count: int) -> None:
    """Grain workers ignore Ctrl-C: the training process saves and then stops them.

    A worker whose training process is gone (killed with SIGKILL, or by the OOM
    killer, which leaves no chance to stop it) exits by itself within a second or two
    instead of running on, holding memory and shared-memory segments."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def exit_when_orphaned() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=exit_when_orphaned, name="orphan-watch", daemon=True).start()


def release_shared_memory() -> None:
    """Frees the shared memory of batches the trainer has consumed, before exit.

    With worker processes, Grain unlinks the shared memory of each consumed batch in
    a background thread; batches still queued there at exit were reported by Python's
    resource tracker as "leaked shared_memory objects". Waiting for that thread
    (private Grain attributes, so only where they exist) removes them properly."""
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return
    lock = getattr(SharedMemoryArray, "_lock", None)
    if lock is None or getattr(SharedMemoryArray, "_del_thread_pool", None) is None:
        return
    with lock:  # detach the pool: later frees unlink at once (a later stage's workers
        pool = SharedMemoryArray._del_thread_pool  # start a new pool)
        SharedMemoryArray._del_thread_pool = None
    pool.close()
    pool.join()  # the queued unlinks still release the semaphore, so it goes last
    SharedMemoryArray._outstanding_del_requests = None


# (source name, record) of unusable evaluation records already named in this process.
_EVAL_WARNED: set[tuple[str, int]] = set()


class PrepareEval(grain.transforms.Map):
    """Deterministic example: the clip's start, padded; failures (and clips shorter
    than one patch, which would have no patch to embed) become invalid rows."""

    def __init__(self, source: Any, clip_samples: int):
        self.decoded = DecodedSource(source)
        self.clip_samples = clip_samples

    def map(self, index: int) -> dict:
        labels = ()
        try:
            record = self.decoded.load(int(index), self.clip_samples,
                                       min_samples=MIN_SAMPLES)
            clip, length = crop_or_pad(record["audio"], self.clip_samples, 0)
            valid = 1.0
            labels = record.get("labels") or ()
        except (io.AudioError, OSError, SourceError) as e:
            key = (str(getattr(self.decoded, "name", "")), int(index))
            if key not in _EVAL_WARNED:  # named once; every evaluation counts them
                _EVAL_WARNED.add(key)
                logging.warning("evaluation record %d unusable: %s", index, e)
            clip, length, valid = np.zeros(self.clip_samples, np.int16), 0, 0.0
        return {
            "audio": clip,
            "audio_len": np.int32(length),
            "valid": np.float32(valid),
            "example_id": np.int32(index),
            "label": np.int32(labels[0] if labels else -1),
        }


def eval_batches(source: Any, clip_samples: int, global_batch_size: int,
                 read_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """Yields this host's evaluation batches; together the hosts cover each record once.

    Args:
      source: a random-access source.
      clip_samples: samples per clip.
      global_batch_size: rows per global batch (padding rows have valid == 0).
      read_threads: decoding threads.

    Yields:
      Host batches with the TRAIN_KEYS audio fields plus example_id and label.
    """
    per_host = host_batch_size(global_batch_size)
    index, count = jax.process_index(), jax.process_count()
    mine = list(range(index, len(source), count))
    # Every host must run the same number of device steps.
    num_batches = math.ceil(math.ceil(len(source) / count) / per_host)
    ds = grain.MapDataset.source(mine).map(PrepareEval(source, clip_samples))
    it = iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=max(read_threads, 2 * per_host))))
    for _ in range(num_batches):
        rows = []
        for _ in range(per_host):
            row = next(it, None)
            if row is None:
                row = {
                    "audio": np.zeros(clip_samples, np.int16), "audio_len": np.int32(0),
                    "valid": np.float32(0.0), "example_id": np.int32(-1),
                    "label": np.int32(-1),
                }
            rows.append(row)
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@dataclasses.dataclass
class EvalTexts:
    """Every caption of an evaluation set, with the clip it belongs to."""

    captions: list[str]
    caption_clip: np.ndarray  # [num_captions] index of the clip
    labels: list[Sequence[int]]  # per clip
    class_names: tuple[str, ...]

    def subset(self, clips: np.ndarray) -> EvalTexts:
        """The captions and labels of these clips (sorted indices), renumbered 0..n-1."""
        index = np.full(len(self.labels), -1)
        index[clips] = np.arange(len(clips))
        ours = [i for i, c in enumerate(self.caption_clip) if index[c] >= 0]
        return EvalTexts([self.captions[i] for i in ours],
                         index[np.asarray(self.caption_clip)[ours]].astype(np.int64),
                         [self.labels[c] for c in clips], self.class_names)


def eval_texts(source: Any) -> EvalTexts:
    """Collects captions and labels of an evaluation source (no audio decoding
    when the source stores paths)."""
    captions, clip_of, labels = [], [], []
    for i, record in enumerate(metadata_rows(source)):
        for caption in record.get("captions") or ():
            captions.append(caption)
            clip_of.append(i)
        labels.append(tuple(record.get("labels") or ()))
    return EvalTexts(captions, np.asarray(clip_of, np.int32), labels,
                     tuple(getattr(source, "class_names", ()) or ()))


def text_batches(texts: Sequence[str], tokenizer: Any, length: int,
                 global_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Tokenised caption batches, split over hosts like `eval_batches`.

    Every host tokenises the whole list (cheap) and keeps its rows of each global
    batch, so the global arrays hold the captions in order.
    """
    per_host = host_batch_size(global_batch_size)
    index = jax.process_index()
    for start in range(0, len(texts), global_batch_size):
        chunk = list(texts[start:start + global_batch_size])
        valid = np.zeros(global_batch_size, np.float32)
        valid[:len(chunk)] = 1.0
        chunk += [""] * (global_batch_size - len(chunk))
        ids, mask = tokenizer.encode(chunk, length)
        rows = slice(index * per_host, (index + 1) * per_host)
        yield {
            "text_ids": np.asarray(ids, np.int32)[rows],
            "text_mask": np.asarray(mask, np.int32)[rows],
            "valid": valid[rows],
        }


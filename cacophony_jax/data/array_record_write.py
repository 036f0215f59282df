"""Writing clips as one split of a TFDS array_record dataset (read by `ArrayRecordSource`).

`write_array_record` serialises source records (see `cacophony_jax.data.sources`)
into balanced array_record shards, the split's texts file and the TFDS metadata files
(dataset_info.json, features.json, metadata.json); `cacophony_jax.data.array_record`
describes what they hold. Audio files are decoded here in a few threads.

Records are dealt to the shards in turn (record k -> shard k % n), which keeps the
shards balanced without knowing the record count in advance.

Atomicity: shards and metadata are written in a hidden staging folder inside the
dataset folder; the split becomes visible only when dataset_info.json, which lists
it, replaces the old one in a single rename. An interrupted write leaves at most a
hidden folder, never a readable half split. Rewriting a split (`overwrite=True`) gives
its new shards and texts file new names (``...-r<N>-<shard>-of-<n>``), so the old split stays
readable until that same rename; its files are deleted after it. One writer per
dataset folder at a time: two processes writing the same folder are not coordinated.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from absl import logging

from cacophony_jax.data.array_record import (
    DATASET_NAME,
    SHARD_ORDER,
    SPLIT_NAME,
    ArrayRecordError,
    import_tfds,
    open_builder,
    split_files,
    texts_name,
)

_VERSION = "1.0.0"
_INFO_FILES = ("features.json", "metadata.json", "dataset_info.json")  # commit file last

# The fields of a record besides its audio (the texts file's fields).
_TEXT_FIELDS = ("id", "captions", "synthetic_captions", "labels")


def _features():
    tfds = import_tfds()
    text_list = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "audio": tfds.features.Tensor(shape=(), dtype=np.object_),
        "num_samples": tfds.features.Scalar(dtype=np.int64),
        "captions": text_list,
        "synthetic_captions": text_list,
        "labels": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    })


def _template(split: str, revision: int) -> str:
    # TFDS's default file names; a rewritten split's revision keeps its names apart.
    tag = f"r{revision}-" if revision else ""
    return f"{{DATASET}}-{{SPLIT}}.{{FILEFORMAT}}-{tag}{{SHARD_X_OF_Y}}"


def _shard_name(split: str, shard: int, num_shards: int, revision: int = 0) -> str:
    return (_template(split, revision).format(DATASET=DATASET_NAME, SPLIT=split,
                                              FILEFORMAT="array_record", SHARD_X_OF_Y="")
            + f"{shard:05d}-of-{num_shards:05d}")


def write_array_record(
    records: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    split: str,
    num_shards: int,
    class_names: Sequence[str] = (),
    *,
    num_workers: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
    total: int = 0,
    overwrite: bool = False,
    before_commit: Callable[[str], None] | None = None,
) -> str:
    """Writes records as one split of a TFDS array_record dataset.

    Args:
      records: source records; each has "audio" (int16 [S], 16 kHz) or "audio_path"
        (decoded here with `load_audio`; clips that fail to decode are skipped, counted
        and reported in one warning).
      out_dir: the dataset folder (created if needed; may already hold other splits).
      split: the split name (letters, digits, underscores); must not exist yet unless
        `overwrite`.
      num_shards: the number of shards (fewer when there are fewer records).
      class_names: the label vocabulary that "labels" index into.
      num_workers: threads decoding audio files.
      progress: called as progress(label, done, total) as records are written.
      total: the number of records (for progress).
      overwrite: replace the split if it exists (the old one stays readable until the
        new one is complete).
      before_commit: called with the staging folder once the split's files are
        written there: files it writes into that folder (`curate build`'s hash list
        and summary) are moved into the dataset folder with the shards, just before
        the commit, so only a kill within those last few renames can leave them next
        to the old split.

    Returns:
      The dataset folder.
    """
    tfds = import_tfds()
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not re.fullmatch(SPLIT_NAME, split):
        raise ArrayRecordError(f"split name {split!r} may only use letters, digits and '_'")
    if num_shards < 1:
        raise ArrayRecordError(f"num_shards must be at least 1, got {num_shards}")
    class_names = [str(c) for c in class_names]
    splits = []
    if os.path.isfile(os.path.join(out_dir, "dataset_info.json")):
        info = open_builder(out_dir).info
        if split in info.splits and not overwrite:
            raise ArrayRecordError(
                f"{out_dir} already holds split {split!r}; write to another folder or split "
                f"name, or pass overwrite=True (`curate build --overwrite`) to replace it"
            )
        splits = [s for name, s in info.splits.items() if name != split]
        if splits and list(info.metadata.get("class_names", [])) != class_names:
            raise ArrayRecordError(
                f"{out_dir} has class names {list(info.metadata['class_names'])}; every split "
                f"of a dataset must use the same class names, got {class_names}"
            )
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), f".incomplete-{split}-*")):
        # Left by a writer that was killed: never part of the dataset.
        logging.warning("removing %s, left by an interrupted write of split %r", stale, split)
        shutil.rmtree(stale, ignore_errors=True)
    # New names unlike any there (the split's current shards, or a killed write's):
    # nothing readable is overwritten before the commit.
    revision = max(split_files(out_dir, split).values(), default=-1) + 1
    staging = tempfile.mkdtemp(prefix=f".incomplete-{split}-", dir=out_dir)
    try:
        features = _features()
        shard_lengths, failures = _write_shards(
            features, _decoded(records, num_workers), staging, split, num_shards, class_names,
            lambda done: progress(f"write {split}", done, total) if progress else None,
            revision)
        if failures:
            shown = "\n  ".join(failures[:5])
            logging.warning("%s/%s: skipped %d clip(s) whose audio failed to decode:\n  %s",
                            out_dir, split, len(failures), shown)
        if not sum(shard_lengths):
            raise ArrayRecordError(f"no clips were written to {out_dir} split {split!r}: the "
                                   f"records were empty or none of their audio decoded")
        template = tfds.core.ShardedFileTemplate(
            data_dir=out_dir, template=_template(split, revision),
            dataset_name=DATASET_NAME, split=split, filetype_suffix="array_record")
        num_bytes = sum(os.path.getsize(os.path.join(staging, f)) for f in os.listdir(staging))
        splits.append(tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths,
                                          num_bytes=num_bytes, filename_template=template))
        identity = tfds.core.DatasetIdentity(name=DATASET_NAME, version=tfds.core.Version(_VERSION),
                                             data_dir=out_dir, module_name="")
        info = tfds.core.DatasetInfo(
            builder=identity, features=features,
            description="Audio clips (int16 PCM, 16 kHz) with captions and labels.",
            metadata=tfds.core.MetadataDict(class_names=class_names, shard_order=SHARD_ORDER))
        info.set_file_format("array_record")
        info.set_splits(tfds.core.SplitDict(splits))
        info.write_to_directory(staging)
        if before_commit is not None:
            before_commit(staging)
        for name in os.listdir(staging):
            if name not in _INFO_FILES:
                os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        for name in _INFO_FILES:  # dataset_info.json last: the commit point
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        # Committed: the split's other shard files (the replaced ones, or a killed
        # write's) are no longer part of the dataset.
        written = {_shard_name(split, k, len(shard_lengths), revision)
                   for k in range(len(shard_lengths))} | {texts_name(split, revision)}
        for name in sorted(set(split_files(out_dir, split)) - written):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_shards(features, records, staging, split, num_shards, class_names, report,
                  revision):
    from array_record.python.array_record_module import ArrayRecordWriter

    # "group_size:1" keeps every record individually addressable (what TFDS writes);
    # int16 audio barely compresses, and the default brotli halves read speed
    # (benchmarks/RESULTS.md), so records are stored uncompressed.
    writers = [ArrayRecordWriter(os.path.join(staging, _shard_name(split, s, num_shards,
                                                                  revision)),
                                 "group_size:1,uncompressed") for s in range(num_shards)]
    count, failures = 0, []
    with open(os.path.join(staging, texts_name(split, revision)), "w",
              encoding="ascii") as texts:
        try:
            for record, audio in records:
                report(count + len(failures))
                if isinstance(audio, Exception):
                    failures.append(f"{record.get('audio_path')}: {audio}")
                    continue
                example = _example(record, audio, class_names)
                writers[count % num_shards].write(features.serialize_example(example))
                row = {key: example[key] for key in _TEXT_FIELDS}
                row["labels"] = row["labels"].tolist()
                texts.write(json.dumps(row) + "\n")
                count += 1
            report(count + len(failures))
        finally:
            for writer in writers:
                writer.close()
    used = min(count, num_shards)
    lengths = [count // num_shards + (s < count % num_shards) for s in range(used)]
    # Round-robin leaves any empty shards last; drop them and renumber the others.
    for s in range(num_shards):
        old = os.path.join(staging, _shard_name(split, s, num_shards, revision))
        if s < used:
            os.replace(old, os.path.join(staging, _shard_name(split, s, used, revision)))
        else:
            os.remove(old)
    return lengths, failures


def _example(record: dict, audio: np.ndarray, class_names: Sequence[str]) -> dict:
    clip_id = record.get("id")
    if not isinstance(clip_id, str) or not clip_id:
        raise ArrayRecordError(f"record has no string 'id': {sorted(record)}")
    fields = {}
    for key in ("captions", "synthetic_captions"):
        value = record.get(key, [])
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ArrayRecordError(f"record {clip_id!r}: {key!r} must be a list of strings")
        fields[key] = list(value)
    labels = [int(v) for v in record.get("labels", [])]
    if any(not 0 <= v < len(class_names) for v in labels):
        raise ArrayRecordError(f"record {clip_id!r}: labels {labels} do not index the "
                               f"{len(class_names)} class names given to write_array_record")
    return {"id": clip_id, "audio": audio.astype("<i2").tobytes(), "num_samples": audio.size,
            "labels": np.asarray(labels, np.int64), **fields}


def _audio_of(record: dict) -> np.ndarray | Exception:
    if "audio" in record:
        audio = np.asarray(record["audio"])
        if audio.dtype != np.int16 or audio.ndim != 1:
            return ArrayRecordError(f"inline audio must be int16 [samples], got "
                                    f"{audio.dtype} {audio.shape}")
        return audio
    from cacophony_jax.audio.io import AudioError, load_audio

    try:
        return load_audio(record["audio_path"])
    except (AudioError, OSError) as error:
        return error


def _decoded(records: Iterable[dict], num_workers: int) -> Iterator[tuple[dict, Any]]:
    # Decode a bounded window of clips ahead in threads, yielding in input order.
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        window: collections.deque[tuple[dict, Future]] = collections.deque()
        for record in records:
            if "audio" not in record and "audio_path" not in record:
                raise ArrayRecordError(f"record {record.get('id')!r} has neither 'audio' nor "
                                       f"'audio_path'")
            window.append((record, pool.submit(_audio_of, record)))
            if len(window) >= 4 * max(1, num_workers):
                record, future = window.popleft()
                yield record, _raise_bad_inline(record, future.result())
        while window:
            record, future = window.popleft()
            yield record, _raise_bad_inline(record, future.result())


def _raise_bad_inline(record: dict, audio: Any) -> Any:
    # A wrong inline array is the caller's bug, not a bad file: stop instead of skipping.
    if isinstance(audio, ArrayRecordError):
        raise ArrayRecordError(f"record {record.get('id')!r}: {audio}")
    return audio

"""Clips as a TFDS array_record dataset, written and read without TensorFlow.

`write_array_record` serialises source records (see `cacophony_jax.data.sources`)
into balanced array_record shards plus the TFDS metadata files (dataset_info.json,
features.json, metadata.json), so `tfds.builder_from_directory(path)` and its
`as_data_source(split)` read the result with random access and no TensorFlow.
`ArrayRecordSource` is that reader as a source with the audio inline.

Stored features per clip: ``id`` (text), ``audio`` (the int16 samples as raw
little-endian bytes: a tf.Example int64 list would take up to 10 bytes per sample),
``num_samples``, ``captions`` and ``synthetic_captions`` (lists of text) and
``labels`` (int64 list). The class names live in metadata.json. Each split also has
a texts file (``cacophony_clips-<split>.texts-r<N>.jsonl``: id, captions and labels,
one JSON line per record in index order), so training a tokenizer or collecting the
evaluation captions reads kilobytes instead of every clip's audio.

Records are dealt to the shards in turn (record k -> shard k % n), which keeps the
shards balanced without knowing the record count in advance; `ArrayRecordSource`
undoes the interleave, so its index k is the k-th record written.

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

from cacophony_jax.data.sources import SourceError

DATASET_NAME = "cacophony_clips"
_VERSION = "1.0.0"
_ORDER = "round_robin"
SPLIT_NAME = r"[A-Za-z0-9_]+"  # what TFDS accepts as a split name
_INFO_FILES = ("features.json", "metadata.json", "dataset_info.json")  # commit file last


# The fields of a record besides its audio (the texts file's fields).
_TEXT_FIELDS = ("id", "captions", "synthetic_captions", "labels")


class ArrayRecordError(SourceError):
    """An array_record dataset is missing, foreign, corrupt, or a record is malformed."""


def _tfds():
    # Why lazy: tensorflow_datasets is only needed by this file format.
    import tensorflow_datasets as tfds

    return tfds


def _features():
    tfds = _tfds()
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


def _texts_name(split: str, revision: int = 0) -> str:
    # The split's captions and labels without audio, one JSON line per record in index
    # order: what tokenizer training and evaluation texts read (see `iter_metadata`).
    return f"{DATASET_NAME}-{split}.texts-r{revision}.jsonl"


def _split_files(out_dir: str, split: str) -> dict[str, int]:
    # Every shard and texts file name of `split` there -> its revision.
    shard = re.compile(re.escape(f"{DATASET_NAME}-{split}.array_record-")
                       + r"(?:r(\d+)-)?\d{5,}-of-\d{5,}")
    texts = re.compile(re.escape(f"{DATASET_NAME}-{split}.texts-r") + r"(\d+)\.jsonl")
    found = {n: shard.fullmatch(n) or texts.fullmatch(n) for n in os.listdir(out_dir)}
    return {n: int(m.group(1) or 0) for n, m in found.items() if m}


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

    Returns:
      The dataset folder.
    """
    tfds = _tfds()
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not re.fullmatch(SPLIT_NAME, split):
        raise ArrayRecordError(f"split name {split!r} may only use letters, digits and '_'")
    if num_shards < 1:
        raise ArrayRecordError(f"num_shards must be at least 1, got {num_shards}")
    class_names = [str(c) for c in class_names]
    splits = []
    if os.path.isfile(os.path.join(out_dir, "dataset_info.json")):
        info = _open_builder(out_dir).info
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
    revision = max(_split_files(out_dir, split).values(), default=-1) + 1
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
            metadata=tfds.core.MetadataDict(class_names=class_names, shard_order=_ORDER))
        info.set_file_format("array_record")
        info.set_splits(tfds.core.SplitDict(splits))
        info.write_to_directory(staging)
        for name in os.listdir(staging):
            if name not in _INFO_FILES:
                os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        for name in _INFO_FILES:  # dataset_info.json last: the commit point
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        # Committed: the split's other shard files (the replaced ones, or a killed
        # write's) are no longer part of the dataset.
        written = {_shard_name(split, k, len(shard_lengths), revision)
                   for k in range(len(shard_lengths))} | {_texts_name(split, revision)}
        for name in sorted(set(_split_files(out_dir, split)) - written):
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
    with open(os.path.join(staging, _texts_name(split, revision)), "w",
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


def _open_builder(path: str):
    tfds = _tfds()
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise ArrayRecordError(
            f"{path} is not an array_record dataset (no dataset_info.json); write one with "
            f"`python -m cacophony_jax.cli curate build` (or write_array_record)"
        )
    try:
        builder = tfds.builder_from_directory(path)
    except Exception as error:  # TFDS raises many kinds for unreadable metadata
        raise ArrayRecordError(f"cannot read the TFDS metadata in {path} ({error})") from None
    if builder.info.name != DATASET_NAME:
        raise ArrayRecordError(
            f"{path} holds TFDS dataset {builder.info.name!r}, not one written by "
            f"write_array_record ({DATASET_NAME!r})"
        )
    return builder


class ArrayRecordSource:
    """One split of a `write_array_record` dataset as a source (audio inline)."""

    def __init__(self, path: str | os.PathLike, split: str):
        """Opens the split for random access.

        Args:
          path: the dataset folder written by `write_array_record`.
          split: the split name.
        """
        path = os.path.abspath(os.fspath(path))
        builder = _open_builder(path)
        splits = builder.info.splits
        if split not in splits:
            raise ArrayRecordError(f"{path} has splits {sorted(splits)}, not {split!r}")
        self.name = f"{os.path.basename(path)}/{split}"
        self.class_names = tuple(builder.info.metadata.get("class_names", ()))
        self._path = path
        try:
            self._data = builder.as_data_source(split)
        except Exception as error:  # array_record raises plain errors for bad shards
            raise ArrayRecordError(f"cannot open split {split!r} of {path} ({error}); the "
                                   f"shards are missing or corrupt: rewrite the split") from None
        lengths = list(splits[split].shard_lengths)
        self._num_shards = len(lengths)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._round_robin = builder.info.metadata.get("shard_order") == _ORDER
        # The data source opens shards lazily: check each one now (a throwaway reader,
        # closed again, in a few threads), so a deleted or truncated shard stops the run
        # here, not at its first batch after compiling.
        paths = [str(p) for p in splits[split].filepaths]
        revision = _split_files(path, split).get(os.path.basename(paths[0]), 0) if paths else 0
        texts = os.path.join(path, _texts_name(split, revision))
        self._texts_path = texts if os.path.isfile(texts) else None
        with ThreadPoolExecutor(min(16, max(1, len(paths)))) as pool:
            problems = list(pool.map(_shard_problem, paths, lengths))
        for shard, problem in enumerate(problems):
            if problem:
                raise ArrayRecordError(f"shard {shard} of split {split!r} of {path} cannot be "
                                       f"read ({problem})")

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name} has {len(self)} clips; index {index} is out of range")
        if self._round_robin:
            shard, position = index % self._num_shards, index // self._num_shards
            index = int(self._offsets[shard]) + position
        try:
            example = self._data[index]
        except Exception as error:  # noqa: BLE001 - a damaged chunk: this record is lost
            raise ArrayRecordError(f"{self.name} record {index} cannot be read "
                                   f"({_first_line(error)})") from None
        audio = np.frombuffer(example["audio"], "<i2")
        if audio.size != example["num_samples"]:
            raise ArrayRecordError(f"{self.name} record {index} is corrupt: {audio.size} audio "
                                   f"samples, {example['num_samples']} expected")
        return {
            "id": _text(example["id"]),
            "captions": [_text(c) for c in example["captions"]],
            "synthetic_captions": [_text(c) for c in example["synthetic_captions"]],
            "labels": [int(v) for v in example["labels"]],
            "audio": audio.astype(np.int16),  # native order, and a writable copy
        }

    def iter_metadata(self) -> Iterator[dict[str, Any]]:
        """Every record in index order without its audio (id, captions, labels).

        Read from the split's texts file, so a caption-only pass (tokenizer training,
        evaluation captions) does not read the audio. A split written before texts
        files existed, or whose texts file does not match it, is read record by
        record instead (with a warning)."""
        rows = self._texts_rows()
        if rows is None:
            for i in range(len(self)):
                record = self[i]
                del record["audio"]
                yield record
            return
        yield from rows

    def _texts_rows(self) -> Iterator[dict[str, Any]] | None:
        # The texts file's rows, streamed, once it is known to match the split; None
        # (after a warning) when it does not.
        path, problem = self._texts_path, None
        if path is None:
            problem = "it has no texts file (written by an older version)"
        else:
            try:
                count, first, last = 0, None, None
                with open(path, encoding="ascii") as f:
                    for line in f:  # every row must parse
                        last = _row(line)
                        first = first or last
                        count += 1
                if count != len(self):
                    problem = f"{path} holds {count} rows for {len(self)} records"
                elif count and (first["id"] != self[0]["id"]
                                or last["id"] != self[count - 1]["id"]):
                    problem = f"the ids in {path} are not the records' ids"
            except (OSError, ValueError) as error:
                problem = f"{path} cannot be read ({_first_line(error)})"
        if problem is not None:
            logging.warning("%s: reading captions and labels from the records, audio "
                            "included, because %s; rewrite the split (`curate build "
                            "--overwrite`) to make caption-only passes fast", self.name,
                            problem)
            return None

        def rows() -> Iterator[dict[str, Any]]:
            with open(path, encoding="ascii") as f:
                for line in f:
                    yield _row(line)

        return rows()

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self._path!r}, {len(self)} clips)"


def _shard_problem(path: str, length: int) -> str | None:
    """Why shard `path` (`length` records) cannot be read, or None when it can."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not os.path.isfile(path):
        return ("the file is missing: rebuild the split (`curate build --overwrite`) or "
                "restore the file")
    reader = None
    try:
        reader = ArrayRecordReader(path, "readahead_buffer_size:0")
        if reader.num_records() != length:
            return (f"it holds {reader.num_records()} records, the metadata says {length}: "
                    "rebuild the split (`curate build --overwrite`) or restore the file")
        if length:
            reader.read([0])
    except OSError as error:  # e.g. too many open files: not the shard's fault
        return f"{_first_line(error)}; check the open-file limit (ulimit -n)"
    except Exception as error:  # noqa: BLE001 - array_record raises plain errors
        return (f"{_first_line(error)}; it is damaged: rebuild the split "
                "(`curate build --overwrite`) or restore the file")
    finally:
        if reader is not None:
            with contextlib.suppress(Exception):  # closing a damaged file raises too
                reader.close()
    return None


def _row(line: str) -> dict[str, Any]:
    # One texts-file line as a record without audio; ValueError when malformed.
    try:
        row = json.loads(line)
        return {"id": str(row["id"]), "captions": list(row["captions"]),
                "synthetic_captions": list(row["synthetic_captions"]),
                "labels": [int(v) for v in row["labels"]]}
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"malformed row: {error!r}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value

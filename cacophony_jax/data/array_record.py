"""Clips as a TFDS array_record dataset, read without TensorFlow: the format and its reader.

`cacophony_jax.data.array_record_write.write_array_record` writes a dataset: array_record
shards plus the TFDS metadata files (dataset_info.json, features.json, metadata.json),
so `tfds.builder_from_directory(path)` and its `as_data_source(split)` read it with
random access and no TensorFlow. `ArrayRecordSource` is that reader as a source with
the audio inline.

Stored features per clip: ``id`` (text), ``audio`` (the int16 samples as raw
little-endian bytes: a tf.Example int64 list would take up to 10 bytes per sample),
``num_samples``, ``captions`` and ``synthetic_captions`` (lists of text) and
``labels`` (int64 list). The class names live in metadata.json. Each split also has
a texts file (``cacophony_clips-<split>.texts-r<N>.jsonl``: id, captions and labels,
one JSON line per record in index order), so training a tokenizer or collecting the
evaluation captions reads kilobytes instead of every clip's audio.

Records are dealt to the shards in turn (record k -> shard k % n, `SHARD_ORDER`);
`ArrayRecordSource` undoes the interleave, so its index k is the k-th record written.
A rewritten split's shards and texts file carry a revision in their names
(``...-r<N>-<shard>-of-<n>``), so the old split stays readable while the new one is
written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from absl import logging

from cacophony_jax.data.sources import SourceError

DATASET_NAME = "cacophony_clips"
SHARD_ORDER = "round_robin"  # how records are dealt to shards (metadata "shard_order")
SPLIT_NAME = r"[A-Za-z0-9_]+"  # what TFDS accepts as a split name


class ArrayRecordError(SourceError):
    """An array_record dataset is missing, foreign, corrupt, or a record is malformed."""


def import_tfds():
    """tensorflow_datasets, imported on first use (only this file format needs it)."""
    import tensorflow_datasets as tfds

    return tfds


def texts_name(split: str, revision: int = 0) -> str:
    """The name of the texts file of `split` at `revision`: the split's captions and
    labels without audio, one JSON line per record in index order (what tokenizer
    training and evaluation texts read, see `ArrayRecordSource.iter_metadata`)."""
    return f"{DATASET_NAME}-{split}.texts-r{revision}.jsonl"


def split_files(out_dir: str, split: str) -> dict[str, int]:
    """Every shard and texts file name of `split` in `out_dir` -> its revision."""
    shard = re.compile(re.escape(f"{DATASET_NAME}-{split}.array_record-")
                       + r"(?:r(\d+)-)?\d{5,}-of-\d{5,}")
    texts = re.compile(re.escape(f"{DATASET_NAME}-{split}.texts-r") + r"(\d+)\.jsonl")
    found = {n: shard.fullmatch(n) or texts.fullmatch(n) for n in os.listdir(out_dir)}
    return {n: int(m.group(1) or 0) for n, m in found.items() if m}


def open_builder(path: str):
    """The TFDS builder of the dataset folder `path` (ArrayRecordError if it is not one)."""
    tfds = import_tfds()
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
        builder = open_builder(path)
        splits = builder.info.splits
        if split not in splits:
            raise ArrayRecordError(
                f"{path} has splits {sorted(splits)}, not {split!r}: name one (PATH:SPLIT "
                "in extra_evals and cli eval, or the block's split, e.g. "
                "--config.data.eval.split=test)")
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
        self._round_robin = builder.info.metadata.get("shard_order") == SHARD_ORDER
        # The data source opens shards lazily: check each one now (a throwaway reader,
        # closed again, in a few threads), so a deleted or truncated shard stops the run
        # here, not at its first batch after compiling.
        paths = [str(p) for p in splits[split].filepaths]
        self._shard_files = [os.path.basename(p) for p in paths]
        revision = split_files(path, split).get(os.path.basename(paths[0]), 0) if paths else 0
        texts = os.path.join(path, texts_name(split, revision))
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
        else:
            shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
            position = index - int(self._offsets[shard])
        # Named by the caller's index and by its place in a shard file, so a damaged
        # entry can be found both in the training log and on disk.
        where = f"{self.name} record {index} (entry {position} of {self._shard_files[shard]})"
        try:
            example = self._data[int(self._offsets[shard]) + position]
        except Exception as error:  # noqa: BLE001 - a damaged chunk: this record is lost
            raise ArrayRecordError(f"{where} cannot be read ({_first_line(error)})") from None
        audio = np.frombuffer(example["audio"], "<i2")
        if audio.size != example["num_samples"]:
            raise ArrayRecordError(f"{where} is corrupt: {audio.size} audio samples, "
                                   f"{example['num_samples']} expected")
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

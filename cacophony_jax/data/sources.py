"""Data sources: the project's manifest format, `ClipSource`, and `open_source`.

A source is what the Grain pipeline and the evaluators index: it has `__len__`,
`__getitem__(i) -> record`, `name: str` and `class_names: tuple[str, ...]` (empty when
unlabelled). A record is a plain picklable dict::

    {"id": str, "captions": [str], "synthetic_captions": [str],
     "labels": [int],                       # indices into class_names; [] if none
     "audio_path": str}                     # absolute; or "audio": int16 [S] inline

Sources never decode audio files: the pipeline decodes `audio_path` in its workers
and counts and skips clips that fail. The public dataset layouts (AudioCaps, Clotho,
ESC-50, UrbanSound8K) are read by `cacophony_jax.data.layouts`.

Manifest format (what every tool of this project writes)
--------------------------------------------------------
JSONL (``.jsonl`` / ``.json``), one object per line::

    {"audio": "clips/a.flac", "captions": ["a dog barks", "a dog barking"],
     "synthetic_captions": ["dog barking outdoors"], "label": "dog", "id": "a"}

- ``audio`` (required): path relative to the manifest's folder, or absolute.
- ``captions``: list of strings, or ``caption``: one string (both may be given).
- ``synthetic_captions`` (optional): list of strings from a captioning model.
- ``label`` (optional): one class name or a list of them.
- ``id`` (optional): defaults to the ``audio`` string.
Other keys are ignored (one that looks like a misspelt key above gets a warning).
Empty captions are dropped; a clip may have no captions. A leading byte-order mark
is allowed.

CSV (``.csv``) with a header: columns ``audio``, ``caption``, optional ``label``
(spaces around the names are ignored). Rows with the same ``audio`` are merged into
one clip with several captions.

Labels: a ``classes.txt`` next to the manifest (one name per line) fixes the class
order; without it the class names are the sorted label strings.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from absl import logging

_SHOW_BAD_ROWS = 5


class SourceError(ValueError):
    """A dataset folder or file is missing or does not follow its layout."""


class ManifestError(SourceError):
    """A manifest file is missing, unreadable, or has bad rows."""


class _Texts:
    """Many strings in one utf-8 buffer: compact, and cheap to pickle to workers."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("q")

    def append(self, text: str) -> None:
        self._data += text.encode("utf-8")
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i else 0
        return self._data[start : self._ends[i]].decode("utf-8")


class _Ragged:
    """Rows of variable length over one flat column."""

    def __init__(self, values: _Texts | array) -> None:
        self.values = values
        self._ends = array("q")

    def append(self, row: Iterable) -> None:
        for value in row:
            self.values.append(value)
        self._ends.append(len(self.values))

    def __getitem__(self, i: int) -> list:
        start = self._ends[i - 1] if i else 0
        return [self.values[j] for j in range(start, self._ends[i])]


class ClipSource:
    """A source over clips whose audio lives in files (records carry `audio_path`)."""

    num_missing = 0  # clips of a public layout skipped because their audio is absent
    missing_ids: Sequence[str] = ()  # their ids

    def __init__(self, name: str, root: str, class_names: Sequence[str] = ()):
        """Creates an empty source; fill it with `add`.

        Args:
          name: the source's name, e.g. "clotho/evaluation".
          root: folder that relative audio paths are joined to.
          class_names: the label vocabulary (empty when unlabelled).
        """
        self.name = name
        self.class_names = tuple(class_names)
        self._root = os.path.abspath(root)
        self._audio = _Texts()
        self._ids = _Texts()  # "" means "same as the audio string"
        self._captions = _Ragged(_Texts())
        self._synthetic = _Ragged(_Texts())
        self._labels = _Ragged(array("i"))

    def add(
        self,
        audio: str,
        captions: Iterable[str] = (),
        synthetic_captions: Iterable[str] = (),
        labels: Iterable[int] = (),
        clip_id: str = "",
    ) -> None:
        """Appends one clip (empty captions are dropped).

        Args:
          audio: audio path, relative to the root or absolute.
          captions: human captions.
          synthetic_captions: model-written captions.
          labels: class indices into `class_names`.
          clip_id: the clip's id; defaults to `audio`.
        """
        self._audio.append(audio)
        self._ids.append("" if clip_id == audio else clip_id)
        self._captions.append(c for c in captions if c.strip())
        self._synthetic.append(c for c in synthetic_captions if c.strip())
        self._labels.append(labels)

    def __len__(self) -> int:
        return len(self._audio)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name} has {len(self)} clips; index {index} is out of range")
        audio = self._audio[index]
        return {
            "id": self._ids[index] or audio,
            "captions": self._captions[index],
            "synthetic_captions": self._synthetic[index],
            "labels": self._labels[index],
            "audio_path": os.path.join(self._root, audio),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} clips)"


class ManifestSource(ClipSource):
    """A manifest (JSONL or CSV, see the module docstring) as a source."""

    def __init__(self, path: str | os.PathLike, skip_bad_rows: bool = False):
        """Reads and validates the whole manifest.

        Args:
          path: the `.jsonl`/`.json` or `.csv` manifest.
          skip_bad_rows: skip (and count in `num_skipped`) bad rows instead of raising
            ManifestError.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ManifestError(f"manifest {path} does not exist; check the path")
        kind = os.path.splitext(path)[1].lower()
        if kind not in (".jsonl", ".json", ".csv"):
            raise ManifestError(
                f"manifest {path} has an unknown extension {kind!r}; use .jsonl (one JSON "
                f"object per line) or .csv (columns audio, caption[, label])"
            )
        stem = os.path.splitext(os.path.basename(path))[0]
        super().__init__(stem, os.path.dirname(os.path.abspath(path)))
        classes = _read_classes(os.path.join(self._root, "classes.txt"))
        index = {name: i for i, name in enumerate(classes)}
        bad: list[str] = []
        self.lines = array("q")  # per clip, its (first) line in the file, for messages
        rows = _jsonl_rows(path, bad) if kind != ".csv" else _csv_rows(path, bad)
        for line, audio, captions, synthetic, label_names, clip_id in rows:
            if classes and any(name not in index for name in label_names):
                unknown = sorted(set(label_names) - set(index))
                bad.append(f"line {line}: label(s) {unknown} are not in classes.txt")
                continue
            labels = [index.setdefault(name, len(index)) for name in label_names]
            self.add(audio, captions, synthetic, labels, clip_id)
            self.lines.append(line)
        self.num_skipped = len(bad)
        if bad:
            shown = "\n  ".join(bad[:_SHOW_BAD_ROWS])
            extra = len(bad) - _SHOW_BAD_ROWS
            more = f"\n  ... and {extra} more" if extra > 0 else ""
            if not skip_bad_rows:
                raise ManifestError(
                    f"manifest {path} has {len(bad)} bad row(s):\n  {shown}{more}\nfix them, "
                    "or skip and count them (--config.data.skip_bad_rows=true; "
                    "skip_bad_rows=True in Python)"
                )
            logging.warning("manifest %s: skipped %d bad row(s):\n  %s%s",
                            path, len(bad), shown, more)
        if not len(self):
            raise ManifestError(f"manifest {path} has no usable rows; see the module docstring "
                                f"of cacophony_jax.data.sources for the format")
        if classes:
            self.class_names = tuple(classes)
        elif index:
            self._sort_classes(index)

    def _sort_classes(self, index: dict[str, int]) -> None:
        # Labels were numbered in order of appearance; renumber them in sorted order.
        names = sorted(index)
        order = {index[name]: new for new, name in enumerate(names)}
        values = self._labels.values
        for j in range(len(values)):
            values[j] = order[values[j]]
        self.class_names = tuple(names)


def _read_classes(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestError(f"{path} lists {duplicates} more than once; keep one of each")
    return names


def _string_list(row: dict, key: str) -> list[str]:
    value = row.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f'"{key}" must be a list of strings')
    return value


_JSONL_KEYS = ("audio", "caption", "captions", "synthetic_captions", "label", "id")
_CSV_COLUMNS = ("audio", "caption", "label")


def _warn_misspelt(path: str, names: Iterable[str], known: Sequence[str], what: str) -> None:
    for name in sorted(set(names) - set(known)):
        close = difflib.get_close_matches(name.strip().lower(), known, n=1, cutoff=0.8)
        if close:
            logging.warning("manifest %s: %s %r is not read; did you mean %r?", path, what,
                            name, close[0])


def _jsonl_rows(path: str, bad: list[str]):
    keys: set[str] = set()
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig" if line == 1 else "utf-8"))
                if not isinstance(row, dict):
                    raise TypeError("a row must be a JSON object")
                if len(keys) < 100:
                    keys.update(row)
                audio = row.get("audio")
                if not isinstance(audio, str) or not audio:
                    raise TypeError('"audio" (a non-empty path string) is required')
                captions = _string_list(row, "captions")
                if not isinstance(row.get("caption", ""), str):
                    raise TypeError('"caption" must be a string')
                captions = captions + [row.get("caption", "")]
                label = row.get("label", [])
                labels = [label] if isinstance(label, str) else _string_list(row, "label")
                clip_id = row.get("id", audio)
                if not isinstance(clip_id, str) or not clip_id:
                    raise TypeError('"id" must be a non-empty string')
                synthetic = _string_list(row, "synthetic_captions")
                yield line, audio, captions, synthetic, labels, clip_id
            except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
                bad.append(f"line {line}: {error}")
    _warn_misspelt(path, keys, _JSONL_KEYS, "key")


def _csv_rows(path: str, bad: list[str]):
    clips: dict[str, tuple[int, list[str], list[str]]] = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            reader.fieldnames = [name.strip() for name in header]
            if "audio" not in reader.fieldnames:
                raise ManifestError(f"CSV manifest {path} needs a header with columns audio, "
                                    f"caption[, label]; it has {header}")
            _warn_misspelt(path, reader.fieldnames, _CSV_COLUMNS, "column")
            if "caption" not in reader.fieldnames:
                logging.warning("manifest %s has no caption column (columns: %s): its clips "
                                "have no captions, which stage 2 cannot train on", path,
                                ", ".join(reader.fieldnames))
            for row in reader:
                audio = (row.get("audio") or "").strip()
                if not audio:
                    bad.append(f"line {reader.line_num}: the audio column is empty")
                    continue
                _, captions, labels = clips.setdefault(audio, (reader.line_num, [], []))
                caption = row.get("caption") or ""
                if caption not in captions:  # a repeated row adds nothing
                    captions.append(caption)
                label = (row.get("label") or "").strip()
                if label and label not in labels:
                    labels.append(label)
    except UnicodeDecodeError as error:
        raise ManifestError(f"CSV manifest {path} is not UTF-8 text ({error})") from None
    for audio, (line, captions, labels) in clips.items():
        yield line, audio, captions, [], labels, audio


# ----------------------------------------------------------------- dispatch


def _synthetic(path: str, split: str, **options):
    from cacophony_jax.data.synthetic import SyntheticCorpus  # lazy: only this kind needs it

    return SyntheticCorpus(split, **options)


def _array_record(path: str, split: str, **options):
    from cacophony_jax.data.array_record import ArrayRecordSource  # lazy: imports tfds

    return ArrayRecordSource(path, split, **options)


def _layouts():
    from cacophony_jax.data import layouts  # lazy: the layouts build on this module

    return layouts


# kind -> (factory(path, split, **options), allowed options, whether a path is needed)
_KINDS = {
    "synthetic": (_synthetic, ("size", "clip_seconds", "seed"), False),
    "manifest": (lambda path, split, **o: ManifestSource(path, **o), ("skip_bad_rows",), True),
    "array_record": (_array_record, (), True),
    "audiocaps": (lambda path, split: _layouts().audiocaps_source(path, split), (), True),
    "clotho": (lambda path, split: _layouts().clotho_source(path, split), (), True),
    "esc50": (lambda path, split, **o: _layouts().esc50_source(
        path, **_fold_split("esc50", split, **o)), ("folds",), True),
    "urbansound8k": (lambda path, split, **o: _layouts().urbansound8k_source(
        path, **_fold_split("urbansound8k", split, **o)), ("folds",), True),
}

# Split names that mean "every fold" for the fold-based layouts (the defaults the
# configs and tools pass).
_ALL_FOLDS = ("", "train", "test", "eval", "all")


def _fold_split(kind: str, split: str, folds: Any = None) -> dict[str, Any]:
    """The folds a split of a fold-based layout names: 'fold1', 'fold1,3', 'folds1-4'."""
    if split in _ALL_FOLDS:
        return {"folds": folds}
    match = re.fullmatch(r"folds?(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)", split)
    if match is None:
        raise SourceError(f"{kind} has folds, not splits: {split!r} names none; give "
                          f"'fold1', 'fold1,3' or 'folds1-4' (or one of {list(_ALL_FOLDS[1:])} "
                          "for every fold)")
    chosen = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        chosen += range(int(low), int(high or low) + 1)
    if folds is not None and sorted(set(folds)) != sorted(set(chosen)):
        raise SourceError(f"{kind}: split {split!r} and folds={list(folds)} disagree; give one")
    return {"folds": sorted(set(chosen))}


def metadata_rows(source: Any) -> Iterator[dict[str, Any]]:
    """Every record of a source in index order, without decoding or reading audio
    where the source can avoid it (`iter_metadata` or `metadata(i)`)."""
    if hasattr(source, "iter_metadata"):
        yield from source.iter_metadata()
        return
    metadata = getattr(source, "metadata", None)
    for i in range(len(source)):
        yield metadata(i) if metadata is not None else source[i]


def needs_path(kind: str) -> bool:
    """Whether source `kind` reads files (SourceError names the kinds for an unknown one)."""
    if kind not in _KINDS:
        close = difflib.get_close_matches(kind, _KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SourceError(f"unknown source kind {kind!r}{hint}; valid kinds: {sorted(_KINDS)}")
    return _KINDS[kind][2]


def open_source(kind: str, path: str = "", split: str = "train", **options: Any):
    """Opens a source by kind.

    Args:
      kind: one of "synthetic", "manifest", "array_record", "audiocaps", "clotho",
        "esc50", "urbansound8k".
      path: the manifest file, array_record dataset folder or dataset root (unused
        for "synthetic").
      split: the split ("manifest" has none and ignores it; for "esc50" and
        "urbansound8k" 'fold1', 'fold1,3' or 'folds1-4' chooses folds, and "train",
        "test", "eval", "all" or "" means every fold).
      **options: synthetic: size, clip_seconds, seed; manifest: skip_bad_rows;
        esc50/urbansound8k: folds.

    Returns:
      An object with __len__, __getitem__ -> record dict, name and class_names.
    """
    reads_files = needs_path(kind)
    factory, allowed, _ = _KINDS[kind]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise SourceError(f"source kind {kind!r} takes options {list(allowed)}, not {unknown}")
    if reads_files and not os.fspath(path):
        raise SourceError(f"source kind {kind!r} needs a path (its file or dataset folder)")
    return factory(os.fspath(path), split, **options)

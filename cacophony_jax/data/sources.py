"""Data sources: the source protocol, `ClipSource`, and `open_source`.

A source is what the Grain pipeline and the evaluators index: it has `__len__`,
`__getitem__(i) -> record`, `name: str` and `class_names: tuple[str, ...]` (empty when
unlabelled). A record is a plain picklable dict::

    {"id": str, "captions": [str], "synthetic_captions": [str],
     "labels": [int],                       # indices into class_names; [] if none
     "audio_path": str}                     # absolute; or "audio": int16 [S] inline

Sources never decode audio files: the pipeline decodes `audio_path` in its workers
and counts and skips clips that fail. The public dataset layouts (AudioCaps, Clotho,
ESC-50, UrbanSound8K) are read by `cacophony_jax.data.layouts`, the project's manifest
format (JSONL or CSV) by `cacophony_jax.data.manifest.ManifestSource`.
"""

from __future__ import annotations

import difflib
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any


class SourceError(ValueError):
    """A dataset folder or file is missing or does not follow its layout."""


class _Texts:
    """Many strings in one utf-8 buffer: compact, and cheap to pickle to workers."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("q")

    def append(self, text: str | bytes) -> None:
        self._data += text if isinstance(text, bytes) else text.encode("utf-8")
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i else 0
        return self._data[start : self._ends[i]].decode("utf-8")


def utf8(text: str, what: str) -> bytes:
    """`text` encoded as UTF-8, or SourceError naming `what` when it cannot be.

    A str can hold lone surrogates (a JSON "\\ud800" escape, or bytes that are not
    UTF-8 read with errors="surrogateescape"); those are not text.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise SourceError(
            f"{what} {shown!r} is not valid text: character {e.start} is a lone surrogate "
            f"{text[e.start]!r} (a JSON \\ud800-style escape, or bytes that are not UTF-8); "
            "fix or remove it") from None


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
    clip_folds: Mapping[str, int] | None = None  # a fold-based layout's clip id -> fold

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
        """Appends one clip (empty captions are dropped); nothing is added when it
        raises.

        Args:
          audio: audio path, relative to the root or absolute.
          captions: human captions.
          synthetic_captions: model-written captions.
          labels: class indices into `class_names`.
          clip_id: the clip's id; defaults to `audio`.

        Raises:
          SourceError: a string is not valid text (a lone surrogate).
        """
        encoded_audio = utf8(audio, "audio path")
        encoded_id = b"" if clip_id == audio else utf8(clip_id, "id")
        texts = [utf8(c, "caption") for c in captions if c.strip()]
        synthetic = [utf8(c, "synthetic caption") for c in synthetic_captions if c.strip()]
        labels = list(labels)
        self._audio.append(encoded_audio)
        self._ids.append(encoded_id)
        self._captions.append(texts)
        self._synthetic.append(synthetic)
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


# ----------------------------------------------------------------- dispatch


def _synthetic(path: str, split: str, **options):
    from cacophony_jax.data.synthetic import SyntheticCorpus  # lazy: only this kind needs it

    return SyntheticCorpus(split, **options)


def _manifest(path: str, split: str, **options):
    from cacophony_jax.data.manifest import ManifestSource  # lazy: it builds on this module

    return ManifestSource(path, **options)


def _array_record(path: str, split: str, **options):
    from cacophony_jax.data.array_record import ArrayRecordSource  # lazy: imports tfds

    return ArrayRecordSource(path, split, **options)


def _layouts():
    from cacophony_jax.data import layouts  # lazy: the layouts build on this module

    return layouts


# kind -> (factory(path, split, **options), allowed options, whether a path is needed)
_KINDS = {
    "synthetic": (_synthetic, ("size", "clip_seconds", "seed"), False),
    "manifest": (_manifest, ("skip_bad_rows",), True),
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


def path_and_split(spec: str, default_split: str = "") -> tuple[str, str]:
    """'PATH[:SPLIT]' -> (path, split). The split is the part after the last ':' unless
    it holds a '/', so a path with colons (gs://bucket/set) stays whole."""
    head, colon, tail = spec.rpartition(":")
    return (head, tail) if colon and head and "/" not in tail else (spec, default_split)


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

"""The project's manifest format (what every tool of this project writes) and its reader.

`ManifestSource` reads a manifest as a source (see `cacophony_jax.data.sources`).

JSONL (``.jsonl`` / ``.json``), one object per line::

    {"audio": "clips/a.flac", "captions": ["a dog barks", "a dog barking"],
     "synthetic_captions": ["dog barking outdoors"], "label": "dog", "id": "a"}

- ``audio`` (required): path relative to the manifest's folder, or absolute. For a
  manifest reached through a link, that is the folder of the file the link points to,
  unless the first rows' files are beside the link instead (`manifest_folder`).
- ``captions``: list of strings, or ``caption``: one string (both may be given).
- ``synthetic_captions`` (optional): list of strings from a captioning model.
- ``label`` (optional): one class name or a list of them (spaces around a name are
  ignored, a repeated name counts once, an empty one is dropped with a warning).
- ``id`` (optional): defaults to the ``audio`` string.
Other keys are ignored (one that looks like a misspelt key above gets a warning).
Empty captions are dropped; a clip may have no captions. A leading byte-order mark
is allowed. A row holding text that is not valid Unicode (a lone surrogate such as
the JSON escape ``\\ud800``, or in a CSV bytes that are not UTF-8) is a bad row.

CSV (``.csv``) with a header: columns ``audio``, ``caption``, optional ``label``
(spaces around the names are ignored). Rows with the same ``audio`` are merged into
one clip with several captions.

Labels: a ``classes.txt`` next to the manifest (one name per line) fixes the class
order (UTF-8, a leading byte-order mark allowed); without it the class names are
the sorted label strings.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from array import array
from collections.abc import Iterable, Sequence

from absl import logging

from cacophony_jax.data.sources import ClipSource, SourceError, utf8

_SHOW_BAD_ROWS = 5


class ManifestError(SourceError):
    """A manifest file is missing, unreadable, or has bad rows."""


def manifest_folder(path: str) -> str:
    """The folder a manifest's relative audio paths (and its classes.txt) are read from.

    The manifest's own folder; for a manifest reached through a link, the folder of the
    file the link points to (where `curate clean` and `curate caption` write an output
    given through a link, its paths relative to that file), unless the first rows'
    files are found beside the link instead (a snapshot of the Hugging Face cache links
    each file into a folder of blobs).
    """
    here = os.path.dirname(os.path.abspath(path))
    real = os.path.dirname(os.path.realpath(path))
    if here == real:
        return real
    reader = _csv_rows if os.path.splitext(path)[1].lower() == ".csv" else _jsonl_rows
    try:
        for n, (_, audio, *_) in enumerate(reader(path, [])):
            if n == 20:
                break
            if not os.path.isabs(audio):
                in_real = os.path.exists(os.path.join(real, audio))
                if in_real != os.path.exists(os.path.join(here, audio)):
                    return real if in_real else here
    except (OSError, ValueError):  # reading it properly reports what is wrong
        pass
    return real


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
        if os.path.isdir(path):
            raise ManifestError(f"manifest {path} is a folder; a manifest is a .jsonl or "
                                ".csv file listing the clips (see this module's docstring)")
        if not os.path.isfile(path):
            raise ManifestError(f"manifest {path} does not exist; check the path")
        kind = os.path.splitext(path)[1].lower()
        if kind not in (".jsonl", ".json", ".csv"):
            raise ManifestError(
                f"manifest {path} has an unknown extension {kind!r}; use .jsonl (one JSON "
                f"object per line) or .csv (columns audio, caption[, label])"
            )
        stem = os.path.splitext(os.path.basename(path))[0]
        super().__init__(stem, manifest_folder(path))
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
            try:  # the rows' strings were checked; `add` adds nothing when it raises
                self.add(audio, captions, synthetic, labels, clip_id)
            except SourceError as error:
                bad.append(f"line {line}: {error}")
                continue
            self.lines.append(line)
        self.num_skipped = len(bad)
        if bad and not len(self) and kind != ".csv":
            _refuse_one_document(path)
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
                                f"of cacophony_jax.data.manifest for the format")
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
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not a name
            names = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestError(f"{path} lists {duplicates} more than once; keep one of each")
    return names


def _refuse_one_document(path: str) -> None:
    """Refuses a file that is one JSON array or object over several lines (what
    json.dump writes), whose every line would otherwise be reported as a bad row."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        document = json.loads(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return
    if isinstance(document, list) or isinstance(document, dict) and "\n" in text.strip():
        what = "an array" if isinstance(document, list) else "an object"
        raise ManifestError(f"manifest {path} is one JSON document ({what}), not one JSON "
                            "object per line: write each clip's object on a line of its own "
                            "(JSON Lines: `f.write(json.dumps(row) + \"\\n\")` per row)")


def _string_list(row: dict, key: str, what: str = "a list of strings") -> list[str]:
    value = row.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f'"{key}" must be {what}')
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
    empty_labels = 0
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
                labels = [label] if isinstance(label, str) else _string_list(
                    row, "label", "a string or a list of strings (class names)")
                clip_id = row.get("id", audio)
                if not isinstance(clip_id, str) or not clip_id:
                    raise TypeError('"id" must be a non-empty string')
                synthetic = _string_list(row, "synthetic_captions")
                for key, texts in (("audio", [audio]), ("id", [clip_id]), ("captions", captions),
                                   ("synthetic_captions", synthetic), ("label", labels)):
                    for text in texts:
                        utf8(text, f'"{key}"')
                names = [name.strip() for name in labels]  # as CSV labels and classes.txt
                empty_labels += "" in names
                labels = list(dict.fromkeys(name for name in names if name))  # no repeats
                yield line, audio, captions, synthetic, labels, clip_id
            except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
                bad.append(f"line {line}: {error}")
    _warn_misspelt(path, keys, _JSONL_KEYS, "key")
    if empty_labels:
        logging.warning("manifest %s: %d row(s) have an empty label, which is dropped (a clip "
                        "with no other label is unlabelled); remove it or name the class",
                        path, empty_labels)


def _csv_rows(path: str, bad: list[str]):
    clips: dict[str, tuple[int, list[str], list[str]]] = {}
    # Bytes that are not UTF-8 become lone surrogates, so only their rows are bad.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
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
            caption = row.get("caption") or ""
            label = (row.get("label") or "").strip()
            try:
                for column, text in (("audio", audio), ("caption", caption), ("label", label)):
                    utf8(text, f"the {column} column")
            except SourceError as error:
                bad.append(f"line {reader.line_num}: {error}")
                continue
            if not audio:
                bad.append(f"line {reader.line_num}: the audio column is empty")
                continue
            if any(v.strip() for v in row.get(None, ())):  # empty trailing fields aside
                bad.append(f"line {reader.line_num}: more fields than the header (a caption "
                           "with an unquoted comma shifts the columns after it): quote such "
                           "fields")
                continue
            _, captions, labels = clips.setdefault(audio, (reader.line_num, [], []))
            if caption not in captions:  # a repeated row adds nothing
                captions.append(caption)
            if label and label not in labels:
                labels.append(label)
    for audio, (line, captions, labels) in clips.items():
        yield line, audio, captions, [], labels, audio

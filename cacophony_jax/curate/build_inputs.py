"""What `curate build` is given, opened and checked: inputs, exclusion lists, the output.

An input is a manifest or ``kind:path[:split]`` (`open_input`); exclusion lists are
text files of ids or hashes (`read_lines`). The checks refuse an input that gives one
id to two different clips and an output folder that cannot take the split, and warn
when the split shares clips with another split of the dataset.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

from cacophony_jax.data.array_record import SPLIT_NAME
from cacophony_jax.data.manifest import ManifestSource
from cacophony_jax.data.sources import open_source

_MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv")
CACHE_NAME = ".build_hash_cache.jsonl"  # the first file a build writes into its folder
_HASH = re.compile(r"[0-9a-fA-F]{64}")  # `hashing.audio_hash`: SHA-256 in hex


class BuildError(ValueError):
    """Bad build inputs or settings (the message names the thing and the fix)."""


def open_input(spec: str, default_split: str = "train") -> Any:
    """Opens a manifest path or a ``kind:path[:split]`` source.

    Args:
      spec: a .jsonl/.json/.csv manifest, or e.g. "clotho:data/clotho:evaluation".
      default_split: split when `spec` names none.

    Returns:
      A source (manifests skip bad rows, which are reported with line numbers).
    """
    kind, sep, rest = spec.partition(":")
    if os.path.splitext(spec)[1].lower() in _MANIFEST_SUFFIXES and (
            not sep or os.path.isfile(spec)):
        return ManifestSource(spec, skip_bad_rows=True)
    if not sep:
        raise BuildError(f"input {spec!r} is neither a manifest (.jsonl, .json, .csv) nor "
                         f"kind:path[:split], e.g. clotho:data/clotho:evaluation")
    path, split = rest, default_split
    head, sep, tail = rest.rpartition(":")
    # A split is a name or folds ("evaluation", "fold1,3", "folds1-4").
    if sep and head and re.fullmatch(r"[\w,-]+", tail) and not os.path.exists(rest):
        path, split = head, tail
    options = {"skip_bad_rows": True} if kind == "manifest" else {}
    return open_source(kind, path, split, **options)


def read_lines(path: str, what: str) -> set[str]:
    """Non-empty stripped lines of a text file (ids or hashes), '#' comments skipped.

    Args:
      path: the file.
      what: what the lines are, for the error message.

    Returns:
      The set of lines.
    """
    try:
        # utf-8-sig: a byte-order mark (Windows Notepad) is no part of the first entry.
        with open(path, encoding="utf-8-sig") as f:
            return {s for s in (line.strip() for line in f) if s and not s.startswith("#")}
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"cannot read the {what} file {path} ({e}); pass a UTF-8 text "
                         f"file with one entry per line") from None


def check_hashes(hashes: Iterable[str], where: str = "--exclude-hashes") -> set[str]:
    """Refuses entries that are not audio hashes (they would exclude nothing).

    Args:
      hashes: `hashing.audio_hash` values (any case).
      where: what gave them, for the error message (e.g. the file).

    Returns:
      The hashes, lower case.
    """
    hashes = set(hashes)
    wrong = sorted(h for h in hashes if not _HASH.fullmatch(h))
    if wrong:
        raise BuildError(f"{where}: {len(wrong)} entr{'y is' if len(wrong) == 1 else 'ies are'}"
                         f" not an audio hash, e.g. {wrong[0][:80]!r}; it needs one SHA-256 "
                         "of 64 hex digits a line, like another build's <split>_hashes.txt "
                         "(ids or file names go to --exclude-ids)")
    return {h.lower() for h in hashes}


def name_forms(name: str) -> set[str]:
    """The forms an exclusion list may name a clip by: as given, the file name, and the
    file name without extension, in Unicode NFC (a list or folder from macOS spells
    "é" as "e" and a combining accent)."""
    name = unicodedata.normalize("NFC", name)
    base = os.path.basename(name)
    return {name, base, os.path.splitext(base)[0]}


def check_ids(name: str, spec: str, source: Any, clips: Iterable[tuple[str, Any]]) -> None:
    """Refuses an input that gives one id to two different clips: their output ids,
    ``<name>/<id>``, would clash.

    Args:
      name: the input's name.
      spec: its path or ``kind:path[:split]``.
      source: the opened input.
      clips: per clip in source order, its id and what identifies its audio (a path
        or a hash; None when unknown, and then not compared).

    Raises:
      BuildError: naming the first such id, its lines (clip numbers when the input
        is not a manifest) and how many ids clash.
    """
    lines = getattr(source, "lines", None)
    first: dict[str, tuple[Any, int]] = {}
    clashes = []
    for i, (clip_id, audio) in enumerate(clips):
        if audio is None:
            continue
        at = lines[i] if lines is not None else i + 1
        seen = first.setdefault(clip_id, (audio, at))
        if seen[0] != audio:
            clashes.append((clip_id, seen[1], at))
    if clashes:
        clip_id, a, b = clashes[0]
        more = f" (and {len(clashes) - 1} more id(s) like it)" if len(clashes) > 1 else ""
        raise BuildError(f"input {name}={spec} gives id {clip_id!r} to two different clips "
                         f"({'lines' if lines is not None else 'clips'} {a} and {b}){more}; "
                         f"output ids are <input name>/<id>, so give each clip its own id")


def check_output(out_dir: str, split: str, overwrite: bool) -> list[str] | None:
    """Refuses an output that cannot take `split`, or holds files a build did not write
    (a non-empty folder without dataset_info.json or the hash cache, a summary.json
    that is not a build's): they would be overwritten. Returns the class names of the
    other splits already there (None when there are none)."""
    if not re.fullmatch(SPLIT_NAME, split):
        raise BuildError(f"--split {split!r} may only use letters, digits and '_'")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BuildError(f"--out {out_dir} is a file; name a new or existing folder")
    info = os.path.join(out_dir, "dataset_info.json")
    ours = [name for name in ("dataset_info.json", CACHE_NAME)
            if os.path.isfile(os.path.join(out_dir, name))]
    # Hidden files (.gitkeep) and a mount point's lost+found are not anyone's data.
    others = [n for n in os.listdir(out_dir) if not n.startswith(".") and n != "lost+found"
              ] if os.path.isdir(out_dir) else []
    if others and not ours:
        raise BuildError(f"--out {out_dir} is a folder with other files and no build in it "
                         "(no dataset_info.json); nothing was written: name a new or empty "
                         "folder, or one a curate build wrote")
    _check_summary(os.path.join(out_dir, "summary.json"))
    if not os.path.isfile(info):
        return None
    try:
        with open(info, encoding="utf-8") as f:
            names = [s.get("name") for s in json.load(f).get("splits", [])]
        with open(os.path.join(out_dir, "metadata.json"), encoding="utf-8") as f:
            classes = json.load(f).get("class_names", [])
    except (OSError, ValueError, AttributeError):
        raise BuildError(f"{info} is unreadable; choose an empty --out folder") from None
    if split in names and not overwrite:
        raise BuildError(f"{out_dir} already holds split {split!r}; choose another --out or "
                         f"--split, or pass --overwrite to rebuild it")
    return [str(c) for c in classes] if set(names) - {split} else None


def _check_summary(path: str) -> None:
    """Refuses a summary.json that a build did not write (it would be overwritten)."""
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            every = json.load(f)
        ok = isinstance(every, dict) and all(
            isinstance(s, dict) and s.get("split") == name for name, s in every.items())
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise BuildError(f"{path} is not a build summary (one entry per split), so a build "
                         "did not write it; nothing was written: move it away, or choose "
                         "another --out folder")


def warn_shared_clips(out_dir: str, split: str, kept: Mapping[str, Any]) -> None:
    """Warns when clips of `split` are also in another split of the dataset (a test
    split overlapping train makes its numbers meaningless)."""
    if not os.path.isdir(out_dir):
        return
    for name in sorted(os.listdir(out_dir)):
        other = name.removesuffix("_hashes.txt")
        if other in (name, split):
            continue
        path = os.path.join(out_dir, name)
        with open(path, encoding="utf-8-sig") as f:
            shared = sum(1 for line in f if line.strip() in kept)
        if shared:
            logging.warning("%d clip(s) of split %r are also in split %r (the same audio); "
                            "pass --exclude-hashes %s to leave them out", shared, split,
                            other, path)

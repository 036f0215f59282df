"""The public dataset layouts: AudioCaps, Clotho, ESC-50 and UrbanSound8K as sources.

Each reader takes the dataset's folder as its authors distribute it (the expected
files are named in each function's docstring and in its error messages), reads the
metadata CSV, and returns a `ClipSource` of the clips whose audio is present; clips
without audio are counted in `num_missing` and skipped. `open_source` in
`cacophony_jax.data.sources` opens them by kind ("audiocaps", "clotho", "esc50",
"urbansound8k").
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence

from absl import logging

from cacophony_jax.audio.files import AUDIO_EXTENSIONS
from cacophony_jax.data.sources import ClipSource, SourceError


def _read_layout_csv(path: str, columns: Sequence[str], layout: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        raise SourceError(f"expected {path}, which does not exist; the layout is: {layout}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise SourceError(f"{path} lacks column(s) {missing}; the layout is: {layout}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise SourceError(f"{path} is not a readable UTF-8 CSV file ({error})") from None
    if any(row[c] is None for row in rows for c in columns):
        raise SourceError(f"{path} has rows with fewer fields than its header; it is corrupt")
    return rows


def _listing(folder: str) -> set[str]:
    # One directory listing instead of a stat per clip (slow on network disks).
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def _report_missing(source: ClipSource, missing: int, where: str, tried: str) -> ClipSource:
    source.num_missing = missing
    if missing and not len(source):
        raise SourceError(f"{source.name}: no audio found under {where} (tried {tried})")
    if missing:
        logging.warning("%s: %d of %d clips have no audio under %s (tried %s); skipped",
                        source.name, missing, missing + len(source), where, tried)
    return source


def _pick_split(split: str, valid: Sequence[str], aliases: dict[str, str], dataset: str) -> str:
    split = aliases.get(split, split)
    if split not in valid:
        raise SourceError(f"{dataset} has splits {list(valid)}, not {split!r}")
    return split


_AUDIOCAPS = ("root/{train,val,test}.csv (audiocap_id, youtube_id, start_time, caption), "
              "root/audio/<split>/")


def audiocaps_source(root: str | os.PathLike, split: str) -> ClipSource:
    """AudioCaps: captions grouped per YouTube clip; clips without audio are skipped.

    Args:
      root: folder with {train,val,test}.csv and audio/<split>/ files named
        {youtube_id}, {youtube_id}_{start_time}, Y{youtube_id} or {audiocap_id}
        with a wav/flac/ogg/mp3 extension.
      split: "train", "val" or "test" ("validation" means "val").

    Returns:
      A ClipSource named "audiocaps/<split>" with `num_missing` set.
    """
    root = os.fspath(root)
    split = _pick_split(split, ("train", "val", "test"), {"validation": "val"}, "AudioCaps")
    rows = _read_layout_csv(os.path.join(root, f"{split}.csv"),
                            ("audiocap_id", "youtube_id", "start_time", "caption"), _AUDIOCAPS)
    clips: dict[str, tuple[list[str], list[str], set[str]]] = {}
    for row in rows:
        ids, captions, starts = clips.setdefault(row["youtube_id"], ([], [], set()))
        ids.append(row["audiocap_id"])
        captions.append(row["caption"])
        start = row["start_time"].strip()
        starts.update({start, start.split(".")[0]})  # "30.0" files are often named "30"
    folder = os.path.join(root, "audio", split)
    present = _listing(folder)
    source = ClipSource(f"audiocaps/{split}", folder)
    missing = 0
    for yid, (ids, captions, starts) in clips.items():
        stems = [yid, *(f"{yid}_{s}" for s in sorted(starts)), f"Y{yid}", *ids]
        names = (f"{stem}.{ext}" for stem in stems for ext in AUDIO_EXTENSIONS)
        found = next((name for name in names if name in present), None)
        if found is None:
            missing += 1
        else:
            source.add(found, captions, clip_id=yid)
    tried = "{youtube_id}, {youtube_id}_{start_time}, Y{youtube_id}, {audiocap_id} + .wav/.flac/..."
    return _report_missing(source, missing, folder, tried)


_CLOTHO = ("root/clotho_captions_<split>.csv (file_name, caption_1..caption_5), "
           "root/<split>/<file_name>")


def clotho_source(root: str | os.PathLike, split: str) -> ClipSource:
    """Clotho: five captions per clip.

    Args:
      root: folder with clotho_captions_<split>.csv and a <split>/ audio folder.
      split: "development", "validation" or "evaluation" (also "train", "val", "test").

    Returns:
      A ClipSource named "clotho/<split>" with `num_missing` set.
    """
    root = os.fspath(root)
    aliases = {"train": "development", "val": "validation", "valid": "validation",
               "test": "evaluation", "eval": "evaluation"}
    split = _pick_split(split, ("development", "validation", "evaluation"), aliases, "Clotho")
    columns = ("file_name", *(f"caption_{k}" for k in range(1, 6)))
    rows = _read_layout_csv(os.path.join(root, f"clotho_captions_{split}.csv"), columns, _CLOTHO)
    folder = os.path.join(root, split)
    present = _listing(folder)
    source = ClipSource(f"clotho/{split}", folder)
    missing = 0
    for row in rows:
        if row["file_name"] not in present:
            missing += 1
            continue
        source.add(row["file_name"], [row[c] or "" for c in columns[1:]])
    return _report_missing(source, missing, folder, "<file_name>")


def _labelled_source(
    name: str, root: str, csv_path: str, columns: tuple[str, str, str, str], layout: str,
    audio_of, folds: Iterable[int] | None,
) -> ClipSource:
    # columns: (file name, fold, class index, class name); audio_of(row) -> relative path.
    file_col, fold_col, index_col, name_col = columns
    rows = _read_layout_csv(csv_path, columns, layout)
    names: dict[int, str] = {}
    for row in rows:
        if not (row[index_col].strip().isdigit() and row[fold_col].strip().isdigit()):
            raise SourceError(f"{csv_path}: {fold_col}/{index_col} must be integers, got "
                              f"{row[fold_col]!r}/{row[index_col]!r}; the file is corrupt")
        label, text = int(row[index_col]), row[name_col].replace("_", " ")
        if names.setdefault(label, text) != text:
            raise SourceError(f"{csv_path}: class {label} is named both {names[label]!r} "
                              f"and {text!r}; the file is corrupt")
    if sorted(names) != list(range(len(names))):
        raise SourceError(f"{csv_path}: class indices {sorted(names)} are not 0..{len(names) - 1}")
    all_folds = sorted({int(row[fold_col]) for row in rows})
    wanted = set(all_folds if folds is None else (int(f) for f in folds))
    if not wanted <= set(all_folds):
        raise SourceError(f"{name} has folds {all_folds}; {sorted(wanted)} asked for")
    source = ClipSource(name, root, [names[i] for i in range(len(names))])
    listings: dict[str, set[str]] = {}
    missing = 0
    for row in rows:
        if int(row[fold_col]) not in wanted:
            continue
        relative = audio_of(row)
        folder, file_name = os.path.split(relative)
        if folder not in listings:
            listings[folder] = _listing(os.path.join(root, folder))
        if file_name in listings[folder]:
            source.add(relative, labels=[int(row[index_col])], clip_id=row[file_col])
        else:
            missing += 1
    return _report_missing(source, missing, os.path.join(root, "audio"), "the listed file names")


def esc50_source(root: str | os.PathLike, folds: Iterable[int] | None = None) -> ClipSource:
    """ESC-50: 2,000 five-second clips in 50 classes, five folds.

    Args:
      root: folder with meta/esc50.csv and audio/<filename>.
      folds: folds to keep (1..5); all when None.

    Returns:
      A labelled ClipSource named "esc50" (class names by target, "_" -> " ").
    """
    root = os.fspath(root)
    layout = "root/meta/esc50.csv (filename, fold, target, category, ...), root/audio/<filename>"
    return _labelled_source(
        "esc50", root, os.path.join(root, "meta", "esc50.csv"),
        ("filename", "fold", "target", "category"), layout,
        lambda row: os.path.join("audio", row["filename"]), folds)


def urbansound8k_source(root: str | os.PathLike, folds: Iterable[int] | None = None) -> ClipSource:
    """UrbanSound8K: 8,732 clips of up to 4 s in 10 classes, ten folds.

    Args:
      root: folder with metadata/UrbanSound8K.csv and audio/fold<k>/<slice_file_name>.
      folds: folds to keep (1..10); all when None.

    Returns:
      A labelled ClipSource named "urbansound8k" (class names by classID, "_" -> " ").
    """
    root = os.fspath(root)
    layout = ("root/metadata/UrbanSound8K.csv (slice_file_name, fsID, start, end, salience, "
              "fold, classID, class), root/audio/fold<fold>/<slice_file_name>")
    return _labelled_source(
        "urbansound8k", root, os.path.join(root, "metadata", "UrbanSound8K.csv"),
        ("slice_file_name", "fold", "classID", "class"), layout,
        lambda row: os.path.join("audio", f"fold{row['fold']}", row["slice_file_name"]), folds)

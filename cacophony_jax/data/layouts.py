"""The public dataset layouts: AudioCaps, Clotho, ESC-50 and UrbanSound8K as sources.

Each reader takes the dataset's folder as its authors distribute it (the expected
files are named in each function's docstring and in its error messages), reads the
metadata CSV, and returns a `ClipSource` of the clips whose audio is present; clips
without audio are counted in `num_missing` and skipped. `open_source` in
`cacophony_jax.data.sources` opens them by kind ("audiocaps", "clotho", "esc50",
"urbansound8k").
"""

from __future__ import annotations

import contextlib
import csv
import os
import unicodedata
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
    short = next((n for n, row in enumerate(rows, 1) if any(row[c] is None for c in columns)),
                 None)
    if short is not None:
        raise SourceError(f"{path}: data row {short} has fewer fields than the header; the file "
                          "is corrupt (a caption with an unquoted comma or line break?)")
    # More fields than the header (empty trailing ones aside): the named columns of that
    # row have shifted.
    long = next((n for n, row in enumerate(rows, 1) if any(v.strip() for v in row.get(None, ()))),
                None)
    if long is not None:
        raise SourceError(f"{path}: data row {long} has more fields than the header; the file "
                          "is corrupt (a caption with an unquoted comma?): quote such fields")
    return rows


def _key(name: str) -> str:
    """A file name as matched: Unicode NFC (macOS unpacks names as NFD), the extension in
    lower case ("x.WAV" is "x.wav")."""
    stem, ext = os.path.splitext(unicodedata.normalize("NFC", name))
    return stem + ext.lower()


def _listing(folder: str) -> dict[str, str]:
    """Matched name (`_key`) -> the name on disk, of one folder (empty if absent)."""
    # One directory listing instead of a stat per clip (slow on network disks).
    if not os.path.isdir(folder):
        return {}
    return {_key(name): name for name in os.listdir(folder)}


def _audio_folder(root: str, candidates: Sequence[str], wanted: Iterable[Iterable[str]]
                  ) -> tuple[str, dict[str, str]]:
    """Where the wanted clips are: the candidate folder holding most of them, and every
    clip's file among all the candidates (a copy split over two folders is whole).

    Args:
      root: the dataset folder.
      candidates: folders the audio may be in, the documented one first.
      wanted: per clip, the file names it may have (`_key` form).

    Returns:
      (main folder, matched name -> path relative to `root`); the main folder is the
      documented one when none holds any clip. A name in several folders is taken
      from the main folder, else the first candidate that has it.
    """
    wanted = [list(names) for names in wanted]
    listings = [(folder, _listing(os.path.join(root, folder))) for folder in candidates]
    counts = [sum(any(n in listing for n in names) for names in wanted)
              for _, listing in listings]
    best = max(range(len(listings)), key=lambda i: (counts[i], -i))
    present: dict[str, str] = {}
    for folder, listing in [listings[best]] + listings[:best] + listings[best + 1:]:
        for key, name in listing.items():
            present.setdefault(key, os.path.normpath(os.path.join(folder, name)))
    return listings[best][0], present


def _report_missing(source: ClipSource, missing: list[str], where: str, tried: str,
                    folders: Sequence[str] = ()) -> ClipSource:
    """Sets `num_missing` and `missing_ids`; warns, or refuses a set with no audio.

    Args:
      source: the clips found.
      missing: ids of the clips whose audio is absent.
      where: the folder searched.
      tried: the file names tried.
      folders: every folder the audio was looked for in (for the message).
    """
    source.num_missing, source.missing_ids = len(missing), list(missing)
    if missing and not len(source):
        looked = [f for f in folders if f != where] if folders else []
        seen = sorted(os.listdir(where))[:3] if os.path.isdir(where) else []
        found = (f"it holds e.g. {seen}" if seen else "it does not exist" if not
                 os.path.isdir(where) else "it is empty")
        also = f"; also looked in {looked}" if looked else ""
        raise SourceError(f"{source.name}: no audio found under {where} ({found}; tried "
                          f"{tried}{also})")
    if missing:
        logging.warning("%s: %d of %d clips have no audio under %s (tried %s), e.g. %s; "
                        "skipped (all listed in the results as missing_ids)", source.name,
                        len(missing), len(missing) + len(source), where, tried, missing[:3])
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
        {youtube_id}, {youtube_id}_{start_time}, AudioSet's
        {youtube_id}_{start:.3f}_{end:.3f}, any of these with a Y prefix, or
        {audiocap_id}, with a wav/flac/ogg/mp3 extension (any case); the audio may also be in
        <split>/, audio/ or root itself (the folder holding most clips is used).
      split: "train", "val" or "test" ("validation" means "val", "eval" "test", as
        for Clotho).

    Returns:
      A ClipSource named "audiocaps/<split>" with `num_missing` set.
    """
    root = os.fspath(root)
    split = _pick_split(split, ("train", "val", "test"),
                        {"validation": "val", "valid": "val", "eval": "test"}, "AudioCaps")
    rows = _read_layout_csv(os.path.join(root, f"{split}.csv"),
                            ("audiocap_id", "youtube_id", "start_time", "caption"), _AUDIOCAPS)
    clips: dict[str, tuple[list[str], list[str], set[str]]] = {}
    for row in rows:
        ids, captions, starts = clips.setdefault(row["youtube_id"], ([], [], set()))
        ids.append(row["audiocap_id"])
        captions.append(row["caption"])
        start = row["start_time"].strip()
        starts.update({start, start.split(".")[0]})  # "30.0" files are often named "30"
        with contextlib.suppress(ValueError):  # AudioSet's <id>_30.000_40.000 (10 s clips)
            starts.add(f"{float(start):.3f}_{float(start) + 10:.3f}")

    def names(yid: str, ids: list[str], starts: set[str]) -> list[str]:
        stems = [yid, *(f"{yid}_{s}" for s in sorted(starts)), f"Y{yid}",
                 *(f"Y{yid}_{s}" for s in sorted(starts)), *ids]
        return [_key(f"{stem}.{ext}") for stem in stems for ext in AUDIO_EXTENSIONS]

    wanted = {yid: names(yid, ids, starts) for yid, (ids, _, starts) in clips.items()}
    folders = (os.path.join("audio", split), split, "audio", ".")
    folder, present = _audio_folder(root, folders, wanted.values())
    folder = os.path.normpath(os.path.join(root, folder))
    source = ClipSource(f"audiocaps/{split}", root)
    missing = []
    for yid, (_, captions, _) in clips.items():
        found = next((present[n] for n in wanted[yid] if n in present), None)
        if found is None:
            missing.append(yid)
        else:
            source.add(found, captions, clip_id=yid)
    tried = ("{youtube_id}, {youtube_id}_{start_time}, {youtube_id}_{start:.3f}_{end:.3f}, "
             "the same with a Y prefix, {audiocap_id} + .wav/.flac/...")
    return _report_missing(source, missing, folder, tried,
                           [os.path.normpath(os.path.join(root, f)) for f in folders])


_CLOTHO = ("root/clotho_captions_<split>.csv (file_name, caption_1..caption_5), "
           "root/<split>/<file_name>")


def clotho_source(root: str | os.PathLike, split: str) -> ClipSource:
    """Clotho: five captions per clip.

    Args:
      root: folder with clotho_captions_<split>.csv and a <split>/ audio folder (or
        clotho_audio_<split>/, audio/<split>/, audio/, root itself).
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
    folders = (split, f"clotho_audio_{split}", os.path.join("audio", split), "audio", ".")
    folder, present = _audio_folder(root, folders, ([_key(r["file_name"])] for r in rows))
    folder = os.path.normpath(os.path.join(root, folder))
    source = ClipSource(f"clotho/{split}", root)
    missing, used = [], set()
    for row in rows:
        name = present.get(_key(row["file_name"]))
        if name is None:
            missing.append(row["file_name"])
            continue
        if name in used:  # e.g. listed as x.WAV and x.wav: one clip, evaluated once
            logging.warning("%s: %s is listed twice; its second row is skipped",
                            source.name, row["file_name"])
            continue
        used.add(name)
        source.add(name, [row[c] or "" for c in columns[1:]], clip_id=row["file_name"])
    return _report_missing(source, missing, folder, "<file_name>",
                           [os.path.normpath(os.path.join(root, f)) for f in folders])


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
        raise SourceError(f"{csv_path}: class indices {sorted(names)} are not 0..{len(names) - 1}; "
                          "keep the full metadata file (clips missing on disk are skipped "
                          "and counted)")
    all_folds = sorted({int(row[fold_col]) for row in rows})
    wanted = set(all_folds if folds is None else (int(f) for f in folds))
    if not wanted <= set(all_folds):
        raise SourceError(f"{name} has folds {all_folds}; {sorted(wanted)} asked for")
    source = ClipSource(name, root, [names[i] for i in range(len(names))])
    listings: dict[str, dict[str, str]] = {}
    missing, clip_folds = [], {}
    for row in rows:
        if int(row[fold_col]) not in wanted:
            continue
        relative = audio_of(row)
        folder, file_name = os.path.split(relative)
        if folder not in listings:
            listings[folder] = _listing(os.path.join(root, folder))
        on_disk = listings[folder].get(_key(file_name))
        if on_disk is not None:
            source.add(os.path.join(folder, on_disk), labels=[int(row[index_col])],
                       clip_id=row[file_col])
            clip_folds[row[file_col]] = int(row[fold_col])
        else:
            missing.append(row[file_col])
    source.folds, source.clip_folds = sorted(wanted), clip_folds
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

"""What `curate caption` is given, opened and checked: the request and the clips.

`check_request` refuses a request that cannot run before a bundle is loaded.
`input_records` opens the input, a manifest or a folder searched for audio files:
the clips to caption with the keys of their rows that the output keeps, and the bad
rows that can be written as they are.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence

from cacophony_jax import atomic_write
from cacophony_jax.audio.files import find_audio_files
from cacophony_jax.curate import resume
from cacophony_jax.data.manifest import ManifestSource, manifest_folder
from cacophony_jax.data.sources import SourceError

METHODS = ("beam", "greedy", "sample")


class CaptionError(ValueError):
    """Bad captioning input, output or settings (the message says how to fix it)."""


# The keys of a manifest row that the output row is made of; any other key is kept.
_ROW_KEYS = ("id", "audio", "caption", "captions", "synthetic_captions", "label")


def _raw_rows(input_path: str, source: ManifestSource,
              out_dir: str) -> tuple[list[dict], list[dict], int]:
    """One read of a JSONL manifest's lines: per record, the keys of its row that are
    not `_ROW_KEYS` (a licence, a source URL, ...), which the output row keeps; the
    rows the reader skipped as bad that are JSON objects with an id (or an audio path,
    the default id), as output rows unchanged but for a relative audio path rebased
    onto `out_dir`; and how many other bad rows there are."""
    others: list[dict] = [{} for _ in range(len(source))]
    if os.path.splitext(input_path)[1].lower() == ".csv":
        return others, [], source.num_skipped  # a CSV's bad rows have no audio to keep
    record_of = {line: i for i, line in enumerate(source.lines)}
    in_dir = manifest_folder(input_path)  # as ManifestSource reads it
    kept, dropped = [], 0
    with open(input_path, "rb") as f:
        for number, data in enumerate(f, 1):
            if not data.strip() or (number not in record_of and not source.num_skipped):
                continue
            try:
                row = json.loads(data.decode("utf-8-sig" if number == 1 else "utf-8"))
            except ValueError:  # not JSON, or not UTF-8 (a bad row)
                row = None
            if number in record_of:
                others[record_of[number]] = {k: v for k, v in row.items()
                                             if k not in _ROW_KEYS}
                continue
            clip_id = row.get("id", row.get("audio")) if isinstance(row, dict) else None
            if not isinstance(clip_id, str) or not clip_id.strip():
                dropped += 1
                continue
            audio = row.get("audio")
            if isinstance(audio, str) and audio and not os.path.isabs(audio):
                row["audio"] = os.path.relpath(os.path.join(in_dir, audio), out_dir)
            kept.append({"id": clip_id, **{k: v for k, v in row.items() if k != "id"}})
    return others, kept, dropped


def input_records(input_path: str, extensions: Sequence[str],
                   out_dir: str) -> tuple[list[dict], tuple, list[dict], int]:
    """The clips to caption, the class names, and the bad rows (see `_raw_rows`)."""
    if os.path.isdir(input_path):
        files = find_audio_files([input_path], extensions)
        if not files:
            raise CaptionError(f"no audio files ({', '.join(extensions)}) under {input_path}")
        return [{"id": name, "audio_path": os.path.abspath(path), "captions": [],
                 "synthetic_captions": [], "labels": []} for path, name in files], (), [], 0
    try:
        source = ManifestSource(input_path, skip_bad_rows=True)
    except SourceError as e:
        raise CaptionError(str(e)) from None
    others, bad, dropped = _raw_rows(input_path, source, out_dir)
    records = [{**source[i], "other_keys": other} for i, other in enumerate(others)]
    counts = collections.Counter(r["id"] for r in [*records, *bad])
    repeated = [clip_id for clip_id, n in counts.items() if n > 1]
    if repeated:
        raise CaptionError(f"manifest {input_path} gives {len(repeated)} id(s) to more than "
                           f"one row, e.g. {repeated[:3]}; output rows are matched to input "
                           "rows by id (to resume), so give each row its own \"id\"")
    return records, source.class_names, bad, dropped


def check_request(input_path: str, output_path: str, num_captions: int, method: str,
                  batch_size: int) -> None:
    """Raises CaptionError for a request that cannot run (before a bundle is loaded)."""
    if method not in METHODS:
        raise CaptionError(f"unknown captioning method {method!r}; use one of {METHODS}")
    if batch_size < 1 or num_captions < 1:
        raise CaptionError(f"--batch-size and --num-captions must be at least 1, got "
                           f"{batch_size} and {num_captions}")
    if not os.path.exists(input_path):
        raise CaptionError(f"input {input_path} does not exist; pass a manifest or a folder")
    if os.path.splitext(output_path)[1].lower() not in (".jsonl", ".json"):
        raise CaptionError(f"output {output_path} must be a .jsonl file (the manifest written, "
                           "one JSON object per line)")
    if resume.same_file(input_path, output_path):
        raise CaptionError(f"output {output_path} is the input {input_path} (the same file, "
                           "maybe through a link); it would overwrite the input: choose "
                           "another output")
    try:
        atomic_write.check_writable(output_path, "output")
    except ValueError as e:
        raise CaptionError(str(e)) from None

"""Stage 0 dataset building: several sources -> one deduplicated array_record split.

    python -m cacophony_jax.cli curate build --input web=web/manifest.jsonl \
        --input ac=audiocaps:data/audiocaps:train --exclude-source audiocaps:data/audiocaps \
        --exclude-source clotho:data/clotho --max-seconds 30 --out data/train --num-shards 64

An input is a manifest (``.jsonl``/``.json``/``.csv``, see `cacophony_jax.data.manifest`)
or ``kind:path[:split]`` (a kind of `open_source`; the split defaults to "train" for
inputs and "test" for exclusions).

Every clip is decoded to 16 kHz mono int16 and hashed (`curate.hashing`), so one
recording stored twice, even as WAV and FLAC, counts once: the first copy in input
order is kept and the others' captions, synthetic captions and labels are merged into
it (lossy re-encodings change the samples and are not caught). Clips are dropped, in
this order, when unreadable, when they overlap an evaluation set (ids or file names,
with or without extension; hashes; the hashes of whole evaluation sources), when
shorter than `min_seconds` or longer than `max_seconds`, and as duplicates. Output
ids are ``<input name>/<clip id>``, so an input that gives one id to two different
clips is refused, naming the id and its lines: before any audio is read when the clips
are files, and before the split is written when their audio is inline (told apart by
its hash). Class names are the union of the inputs'.
Train on the result with ``--config.data.train.kind=array_record
--config.data.train.path=OUT --config.data.train.split=SPLIT``.

Resuming: hashes are appended to ``OUT/.build_hash_cache.jsonl`` as they are computed,
keyed by path, size and modification time, so a rerun decodes only what is new; the
split is written atomically by `write_array_record`. OUT also receives
``<split>_hashes.txt`` (for another build's `--exclude-hashes`), ``summary.json`` and
``summary.md``, moved in with the split's shards just before its commit, so they
describe the readable split (unless a kill lands within those last few renames). OUT
must be new, empty or a build's folder: other files in it are never overwritten (see
`build_inputs.check_output`).
"""

from __future__ import annotations

import collections
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from absl import logging

from cacophony_jax import atomic_write
from cacophony_jax.audio.clips import MIN_SAMPLES
from cacophony_jax.audio.io import SAMPLE_RATE
from cacophony_jax.curate import hashing
from cacophony_jax.curate.build_inputs import (
    CACHE_NAME,
    BuildError,
    check_hashes,
    check_ids,
    check_output,
    name_forms,
    open_input,
    read_lines,
    warn_shared_clips,
)
from cacophony_jax.curate.build_summary import summary_markdown, write_summary
from cacophony_jax.data.array_record_write import write_array_record
from cacophony_jax.data.sources import SourceError, metadata_rows
from cacophony_jax.progress import Progress

_DROPS = ("unreadable", "overlap", "too_short", "too_long", "duplicate")


def run_build(
    inputs: Sequence[tuple[str, str]],
    out_dir: str,
    *,
    split: str = "train",
    num_shards: int = 1,
    exclude_ids: Iterable[str] = (),
    exclude_hashes: Iterable[str] = (),
    exclude_sources: Sequence[str] = (),
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
    workers: int = 8,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merges, deduplicates and filters sources into one array_record split.

    Args:
      inputs: (name, spec) pairs; spec as in `open_input`.
      out_dir: the dataset folder (may hold other splits).
      split: the split to write.
      num_shards: array_record shards.
      exclude_ids: ids or file names of evaluation clips to drop.
      exclude_hashes: `hashing.audio_hash` values of clips to drop.
      exclude_sources: ``kind:path[:split]`` specs whose clips' hashes are dropped.
      min_seconds: shortest clip kept (clips under one patch, 0.15 s, never are).
      max_seconds: longest clip kept (None: no limit).
      workers: threads decoding and hashing.
      progress: called as progress(label, done, total).
      overwrite: rebuild `split` if `out_dir` holds it (it stays readable until the new
        one is written).

    Returns:
      The summary: {"split", "out", "class_names", "sources": {name: counts},
      "total": counts}; counts have clips, hours, captions, synthetic_captions,
      bad_rows, missing and one entry per drop reason.
    """
    names = [name for name, _ in inputs]
    if not inputs:
        raise BuildError("no inputs; pass at least one --input NAME=PATH")
    for name in names:
        if not re.fullmatch(r"[\w.-]+", name):
            raise BuildError(f"input name {name!r} may only use letters, digits, '_', '.', '-'")
    if len(set(names)) != len(names):
        raise BuildError(f"input names must be unique, got {names}")
    if not math.isfinite(min_seconds) or (max_seconds is not None
                                           and not math.isfinite(max_seconds)):
        raise BuildError(f"--min-seconds and --max-seconds must be finite numbers, got "
                         f"{min_seconds} and {max_seconds} (leave --max-seconds out for no "
                         "limit)")
    if min_seconds < 0 or (max_seconds is not None and max_seconds < min_seconds):
        raise BuildError(f"need 0 <= --min-seconds <= --max-seconds, got {min_seconds} and "
                         f"{max_seconds}")
    if num_shards < 1:
        raise BuildError(f"--num-shards must be at least 1, got {num_shards}")
    if workers < 1:
        raise BuildError(f"--workers must be at least 1, got {workers}")
    bad_hashes = check_hashes(exclude_hashes)
    out_dir = os.path.abspath(out_dir)
    existing = check_output(out_dir, split, overwrite)
    try:
        sources = [(name, open_input(spec)) for name, spec in inputs]
        excluded_sources = [open_input(spec, default_split="test") for spec in exclude_sources]
    except SourceError as e:
        raise BuildError(str(e)) from None
    for (name, spec), (_, source) in zip(inputs, sources, strict=True):
        # One file named two ways ("a.wav", "./a.wav", a link) is one clip.
        check_ids(name, spec, source, ((r["id"], r.get("audio_path") and
                                        os.path.realpath(r["audio_path"]))
                                       for r in metadata_rows(source)))
    # One label vocabulary for every split of the dataset: a later split keeps the
    # first one's order and may use any part of it.
    class_names: dict[str, int] = {c: i for i, c in enumerate(existing or [])}
    for _, source in sources:
        for c in source.class_names:
            class_names.setdefault(c, len(class_names))
    if existing is not None and len(class_names) > len(existing):
        raise BuildError(f"{out_dir} has class names {existing}; this split adds "
                         f"{list(class_names)[len(existing):]}, which its labels cannot "
                         "name: rebuild into a new --out folder, first the split that has "
                         "every class (or put a classes.txt listing them all next to the "
                         "first split's manifest: it fixes the class list and order)")
    os.makedirs(out_dir, exist_ok=True)
    bad_ids = set().union(*(name_forms(i) for i in exclude_ids)) if exclude_ids else set()
    # Shorter than one 16-frame patch (0.15 s) is never usable: training would skip the
    # clip on every draw, so it is dropped and counted here whatever --min-seconds says.
    min_samples = max(min_seconds * SAMPLE_RATE, MIN_SAMPLES)
    max_samples = float("inf") if max_seconds is None else max_seconds * SAMPLE_RATE

    cache = hashing.HashCache(os.path.join(out_dir, CACHE_NAME))
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            window = 4 * max(1, workers)
            for source in excluded_sources:
                entries = hashing.hash_source(source, f"exclude {source.name}", pool, cache,
                                              window, progress)
                bad_hashes.update(e["sha256"] for e in entries if "sha256" in e)
                unread = [e["error"] for e in entries if "error" in e]
                if unread:  # their copies in the inputs cannot be recognised by content
                    logging.warning("evaluation set %s: %d clip(s) unreadable, e.g. %s",
                                    source.name, len(unread), unread[0])
            hashed = [(name, source,
                       hashing.hash_source(source, name, pool, cache, window, progress))
                      for name, source in sources]
    finally:
        cache.close()
    # Clips with inline audio have no path to tell them apart before they are hashed.
    for (name, spec), (_, source, entries) in zip(inputs, hashed, strict=True):
        check_ids(name, spec, source, ((e["record"]["id"], None if "audio_path" in e["record"]
                                        else e.get("sha256")) for e in entries))

    # hash -> (output record, its source, index there); insertion order = input order
    kept: dict[str, tuple[dict[str, Any], Any, int]] = {}
    counts = {}
    failures: list[str] = []
    for name, source, entries in hashed:
        c = counts[name] = dict.fromkeys(("clips", "hours", "captions", "synthetic_captions",
                                          *_DROPS), 0)
        c["bad_rows"] = getattr(source, "num_skipped", 0)
        c["missing"] = getattr(source, "num_missing", 0)
        for entry in entries:
            record = entry["record"]
            labels = [class_names[source.class_names[i]] for i in record["labels"]]
            if "error" in entry:
                absent = "audio_path" in record and not os.path.exists(record["audio_path"])
                c["missing" if absent else "unreadable"] += 1
                failures.append(f"{name}: {entry['error']}")
            elif (entry["sha256"] in bad_hashes or name_forms(record["id"]) & bad_ids
                  or "audio_path" in record and name_forms(record["audio_path"]) & bad_ids):
                c["overlap"] += 1
            elif entry["samples"] < min_samples:
                c["too_short"] += 1
            elif entry["samples"] > max_samples:
                c["too_long"] += 1
            elif entry["sha256"] in kept:
                c["duplicate"] += 1
                first = kept[entry["sha256"]][0]
                for key in ("captions", "synthetic_captions"):
                    new = [t for t in record[key] if t not in first[key]]
                    first[key].extend(new)
                    c[key] += len(new)
                first["labels"].extend(i for i in labels if i not in first["labels"])
            else:
                out = {"id": f"{name}/{record['id']}", "captions": list(record["captions"]),
                       "synthetic_captions": list(record["synthetic_captions"]),
                       "labels": list(dict.fromkeys(labels))}
                if "audio_path" in record:
                    out["audio_path"] = record["audio_path"]
                kept[entry["sha256"]] = (out, source, entry["index"])
                c["clips"] += 1
                c["hours"] += entry["samples"] / SAMPLE_RATE / 3600
                c["captions"] += len(out["captions"])
                c["synthetic_captions"] += len(out["synthetic_captions"])
    if failures:
        missing = sum(c["missing"] for c in counts.values()) - sum(
            getattr(source, "num_missing", 0) for _, source, _ in hashed)
        logging.warning("skipped %d clip(s) that could not be read (%d of them missing), "
                        "e.g.:\n  %s", len(failures), missing, "\n  ".join(failures[:10]))
    if not kept:
        raise BuildError("no clip is left after filtering; check the inputs and the "
                         "--exclude-*/--min-seconds/--max-seconds settings")

    warn_shared_clips(out_dir, split, kept)

    def records() -> Iterator[dict[str, Any]]:
        for out, source, index in kept.values():
            yield out if "audio_path" in out else {**out, "audio": source[index]["audio"]}

    total: dict[str, float] = collections.Counter()
    for c in counts.values():
        total.update(c)
    summary = {"split": split, "out": out_dir, "class_names": list(class_names),
               "sources": counts, "total": dict(total)}

    def describe(staging: str) -> None:  # committed with the split (see write_array_record)
        atomic_write.write_text(os.path.join(staging, f"{split}_hashes.txt"),
                                "".join(digest + "\n" for digest in kept))
        write_summary(out_dir, summary, into=staging)

    write_array_record(records(), out_dir, split, num_shards, list(class_names),
                       num_workers=workers, progress=progress, total=len(kept),
                       overwrite=overwrite, before_commit=describe)
    return summary


def add_arguments(parser: Any) -> None:
    """Adds the options of `curate build` to an argparse parser.

    Args:
      parser: the command's argparse.ArgumentParser.
    """
    add = parser.add_argument
    add("--input", action="append", required=True, metavar="NAME=PATH",
        help="manifest .jsonl/.csv or kind:path[:split] (repeat)")
    add("--exclude-ids", action="append", default=[], metavar="FILE",
        help="ids or file names to drop, one a line")
    add("--exclude-hashes", action="append", default=[], metavar="FILE",
        help="audio hashes to drop, one a line (e.g. another build's <split>_hashes.txt)")
    add("--exclude-source", action="append", default=[], metavar="KIND:PATH[:SPLIT]",
        help="evaluation set whose clips are dropped (split default: test)")
    add("--min-seconds", type=float, default=0.0,
        help="shortest clip kept (under 0.15 s, one patch, are always dropped)")
    add("--max-seconds", type=float, default=None)
    add("--out", required=True, help="dataset folder")
    add("--split", default="train")
    add("--num-shards", type=int, default=16)
    add("--workers", type=int, default=8, help="threads decoding and hashing")
    add("--overwrite", action="store_true",
        help="rebuild --split if --out holds it (other splits are kept)")


def command(args: Any, progress: Progress | None) -> int:
    """Runs `curate build` and prints the summary table.

    Args:
      args: parsed `add_arguments` options.
      progress: called as progress(label, done, total).

    Returns:
      The exit status (0).
    """
    inputs = []
    for item in args.input:
        name, sep, spec = item.partition("=")
        if not (sep and name and spec):
            raise BuildError(f"--input {item!r} must be NAME=PATH, e.g. "
                             f"clotho=clotho:data/clotho:development")
        inputs.append((name, spec))
    ids = set().union(*(read_lines(p, "--exclude-ids") for p in args.exclude_ids))
    hashes = set().union(*(check_hashes(read_lines(p, "--exclude-hashes"),
                                        f"--exclude-hashes {p}") for p in args.exclude_hashes))
    summary = run_build(inputs, args.out, split=args.split, num_shards=args.num_shards,
                        exclude_ids=ids, exclude_hashes=hashes,
                        exclude_sources=args.exclude_source, min_seconds=args.min_seconds,
                        max_seconds=args.max_seconds, workers=args.workers, progress=progress,
                        overwrite=args.overwrite)
    print(summary_markdown(summary))
    print(f"wrote split {args.split!r} to {summary['out']} (summary.md, summary.json)")
    return 0

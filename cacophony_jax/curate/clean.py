r"""Stage 0 caption cleaning: noisy web metadata -> one sound caption per clip.

    python -m cacophony_jax.curate.clean raw.jsonl manifest.jsonl            # rules
    CACOPHONY_LLM_BASE_URL=http://localhost:8000/v1 CACOPHONY_LLM_MODEL=MODEL \
        python -m cacophony_jax.curate.clean raw.jsonl manifest.jsonl --backend=llm

Input, one JSON object a line::

    {"audio": "clips/123.flac", "title": "...", "tags": ["..."] or "a, b",
     "description": "...", "id": "123"}          # "id" optional (default: audio)

Output, the project's manifest (see `cacophony_jax.data.manifest`)::

    {"id": "123", "audio": "clips/123.flac", "captions": ["A dog barks nearby."],
     "raw": {"title": ..., "tags": ..., "description": ..., <other input keys>}}

Relative audio paths are rewritten to stay correct from the output's folder. Bad rows
are reported with their line number and skipped; so are clips with nothing audible in
their metadata. Each output row is flushed as it is written; rerunning the same
command continues after the rows already there (a last row cut off by an interruption
is dropped; an existing output that is not this tool's manifest is refused, unchanged), and
the LLM backend's cache answers every request made before. With --overwrite the new
rows go to OUTPUT.partial, which replaces OUTPUT only once complete (a rerun with
--overwrite continues it), so a failed run never loses the old output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from absl import logging

from cacophony_jax.curate import llm, output_settings, resume, rules
from cacophony_jax.progress import ProgressLine

BACKENDS = ("rules", "llm")
_SHOWN_BAD_ROWS = 50  # warnings beyond this are only counted
_ROW_KEYS = ("audio", "captions", "raw")  # what every output row has besides its "id"


class CleanError(ValueError):
    """Bad input/output file or settings (the message says which and how to fix it)."""


class _NoMetadataError(ValueError):
    """A well-formed row without title, tags or description: counted as empty."""


def _decode(data: bytes, first: bool) -> str:
    try:
        return data.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {data[e.start]:#04x} at byte {e.start + 1}); "
                         f"save the file as UTF-8") from None


def _parse_row(text: str, in_dir: str, out_dir: str) -> dict[str, Any]:
    """One input line -> the output row without its caption; ValueError says what is wrong."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg.removesuffix(' at')} at column "
                         f"{e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    audio = row.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        raise ValueError('"audio" must be a non-empty string (the clip\'s path)')
    for key in ("title", "description"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f'"{key}" must be a string, got {type(row[key]).__name__}')
    tags = row.get("tags")
    if tags is not None and not isinstance(tags, str) and not (
            isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise ValueError('"tags" must be a list of strings or one comma-separated string')
    clip_id = row.get("id", audio)
    if isinstance(clip_id, int) and not isinstance(clip_id, bool):
        clip_id = str(clip_id)
    if not isinstance(clip_id, str) or not clip_id.strip():
        raise ValueError('"id" must be a non-empty string or an integer')
    has_tags = bool(tags.strip()) if isinstance(tags, str) else bool(tags)
    if not ((row.get("title") or "").strip() or (row.get("description") or "").strip()
            or has_tags):
        raise _NoMetadataError("no title, tags or description to caption from")
    if not os.path.isabs(audio) and os.path.abspath(in_dir) != os.path.abspath(out_dir):
        audio = os.path.relpath(os.path.join(in_dir, audio), out_dir)
    raw = {k: v for k, v in row.items() if k not in ("id", "audio")}
    return {"id": clip_id, "audio": audio, "raw": raw}


def run_clean(input_path: str, output_path: str, backend: str = "rules", *,
              overwrite: bool = False, progress: bool = True, chunk_size: int = 0,
              cache_path: str | None = None, **llm_options: Any) -> dict[str, int]:
    """Cleans a metadata JSONL file into a manifest JSONL file (resumable).

    Args:
      input_path: JSONL with "audio", "title", "tags", "description", optional "id".
      output_path: manifest JSONL to write (appended to when it exists: resume).
      backend: "rules" (deterministic, local) or "llm" (OpenAI-compatible server).
      overwrite: write a new output instead of resuming; it replaces the old one
        once complete (see `resume.prepare_output`).
      progress: draw a progress line on stderr.
      chunk_size: rows per round of LLM requests (default 8 x workers).
      cache_path: LLM cache file (default: output_path + ".llm_cache.sqlite").
      **llm_options: `llm.LLMSettings` fields: base_url, model, api_key, temperature,
        workers, max_retries, backoff_s, timeout_s, ... (base_url/model/api_key
        default to the CACOPHONY_LLM_* variables).

    Returns:
      Counts: read, written, skipped (= invalid + empty + duplicate + rejected),
      invalid (not a usable row), empty (no title, tags or description, or nothing
      audible in them), duplicate (an id seen before), rejected (the language model
      gave no caption), resumed (already in the output), cached and requested (LLM
      clips answered from the cache / sent to the server).

    Raises:
      CleanError: missing or empty input, unknown backend, an output that is the input
        or not a manifest this tool wrote (left unchanged), bad LLM settings.
      llm.LLMError: the LLM server failed for good (rerun to resume; the message says
        where the rows so far are).
    """
    if backend not in BACKENDS:
        raise CleanError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "rules" and llm_options:
        raise CleanError(f"options {sorted(llm_options)} only apply to backend='llm'")
    if os.path.isdir(input_path):
        raise CleanError(f"input {input_path} is a folder; curate clean reads one JSONL "
                         "file, one object per line with audio, title, tags, description[, id]")
    if not os.path.isfile(input_path):
        raise CleanError(f"input file {input_path} does not exist; check the path")
    if os.path.splitext(input_path)[1].lower() in (".csv", ".tsv"):
        raise CleanError(f"input {input_path} looks like a table; curate clean reads JSONL, "
                         "one object per line with audio, title, tags, description[, id]")
    if os.path.isdir(output_path) or os.path.splitext(output_path)[1].lower() not in (
            ".jsonl", ".json"):
        raise CleanError(f"output {output_path} must be a .jsonl file (the manifest written)")
    if resume.same_file(input_path, output_path):
        raise CleanError(f"output {output_path} is the input {input_path} (the same file, "
                         "maybe through a link); choose another output path")
    # Through a link: the file it names is written (and replaced by --overwrite), and
    # the audio paths are relative to that file's folder.
    output_path = os.path.realpath(output_path)
    settings = None
    if backend == "llm":
        try:
            settings = llm.LLMSettings.resolve(**llm_options)
        except (llm.LLMConfigError, TypeError) as e:
            raise CleanError(str(e)) from None
        chunk_size = chunk_size or 8 * settings.workers
    chunk_size = max(1, chunk_size or 256)
    with open(input_path, "rb") as f:
        total = sum(1 for line in f if line.strip())
    if not total:
        raise CleanError(f"input {input_path} is empty; it needs one JSON object per line "
                         "with audio, title, tags, description[, id]")
    # What the captions depend on besides the rows: an output (or an unfinished
    # --overwrite run's partial one) begun with others is not continued.
    recorded: dict[str, Any] = {"backend": backend, "input": os.path.basename(input_path)}
    if settings is not None:
        recorded.update(model=settings.model, base_url=settings.base_url,
                        temperature=settings.temperature, max_tokens=settings.max_tokens)
    try:
        output_settings.check_settings(output_path, recorded, overwrite, tool="curate clean",
                                       redo="clean every row again", row_key="raw")
        writing, done = resume.prepare_output(output_path, overwrite, _ROW_KEYS)
    except resume.OutputError as e:
        raise CleanError(str(e)) from None
    output_settings.record(writing, recorded)
    captioner = None
    if settings is not None:
        try:
            captioner = llm.LLMCaptioner(settings, cache_path or output_path + ".llm_cache.sqlite")
        except llm.LLMConfigError as e:
            raise CleanError(str(e)) from None
        logging.info("LLM backend: model %s at %s, %d request(s) in flight", settings.model,
                     settings.base_url, settings.workers)

    counts = dict.fromkeys(("read", "written", "skipped", "invalid", "empty", "duplicate",
                            "rejected", "resumed", "cached", "requested"), 0)
    seen: dict[str, int] = {}
    in_dir, out_dir = (os.path.dirname(os.path.abspath(p)) for p in (input_path, output_path))
    bar = ProgressLine(progress, unit="rows")

    def show(final: bool) -> None:
        bar("clean", counts["read"], total, f"written {counts['written']}, skipped "
            f"{counts['skipped']}, cached {counts['cached']}, requested "
            f"{counts['requested']}", final=final)

    def skip(kind: str, line: int, why: str) -> None:
        counts[kind] += 1
        counts["skipped"] += 1
        if counts["skipped"] <= _SHOWN_BAD_ROWS:
            logging.warning("%s line %d: %s; skipped", input_path, line, why)

    def flush(batch: list[tuple[int, dict[str, Any]]], out) -> None:
        if captioner is None:
            captions = [rules.compose_caption(r["raw"].get("title") or "",
                                              r["raw"].get("description") or "",
                                              r["raw"].get("tags")) for _, r in batch]
        else:
            captions = captioner.caption_many([(r["raw"].get("title") or "", r["raw"].get("tags"),
                                                r["raw"].get("description") or "")
                                               for _, r in batch])
            counts["cached"], counts["requested"] = captioner.cached, captioner.requested
        for (line, row), caption in zip(batch, captions, strict=True):
            if caption is None:
                skip("empty", line, "nothing about the sound in title, tags or description")
                continue
            if isinstance(caption, llm.RejectedError):
                skip("rejected", line, f"no caption from the language model: {caption}")
                continue
            out.write(resume.json_line({"id": row["id"], "audio": row["audio"],
                                        "captions": [caption], "raw": row["raw"]}))
            out.flush()  # a crash loses at most the line being written
            counts["written"] += 1
        batch.clear()

    try:
        # Bytes, decoded a line at a time: a line that is not UTF-8 is skipped and named
        # (reading with replacement would turn it into captions with U+FFFD in them).
        with open(input_path, "rb") as src, \
                open(writing, "a", encoding="utf-8", newline="\n") as out:
            batch: list[tuple[int, dict[str, Any]]] = []
            for line, data in enumerate(src, 1):
                if not data.strip():
                    continue
                counts["read"] += 1
                try:
                    text = _decode(data, first=line == 1)
                    row = _parse_row(text, in_dir, out_dir)
                except _NoMetadataError as e:
                    skip("empty", line, str(e))
                    continue
                except ValueError as e:
                    skip("invalid", line, str(e))
                    continue
                if row["id"] in seen:
                    skip("duplicate", line, f"duplicate id {row['id']!r} (first on line "
                                            f"{seen[row['id']]})")
                    continue
                seen[row["id"]] = line
                if row["id"] in done:
                    counts["resumed"] += 1
                    continue
                batch.append((line, row))
                if len(batch) >= chunk_size:
                    flush(batch, out)
                show(final=False)
            flush(batch, out)
    except llm.LLMError as e:
        if writing != output_path:
            raise llm.LLMError(f"{e} (the new rows are in {writing}; {output_path} stays as "
                               f"it was until the run completes)") from None
        raise
    finally:
        if captioner is not None:
            captioner.close()
        show(final=True)
    resume.finish_output(output_path, writing)
    output_settings.follow(output_path, writing)  # the settings follow their rows
    if counts["skipped"] > _SHOWN_BAD_ROWS:
        logging.warning("%s: %d rows skipped in all (only the first %d shown)", input_path,
                        counts["skipped"], _SHOWN_BAD_ROWS)
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `curate clean` (input, output, backend and the LLM settings).

    Args:
      parser: the command's parser.
    """
    parser.add_argument("input", help="metadata JSONL (audio, title, tags, description, id)")
    parser.add_argument("output", help="manifest JSONL to write; resumed when it exists")
    parser.add_argument("--backend", choices=BACKENDS, default="rules")
    parser.add_argument("--overwrite", action="store_true",
                        help="write a new output, which replaces the old one once complete "
                             "(an interrupted one is continued from OUTPUT.partial)")
    g = parser.add_argument_group("llm backend")
    g.add_argument("--base-url", help=f"server, e.g. http://localhost:8000/v1 "
                                      f"[{llm.ENV_BASE_URL}]")
    g.add_argument("--model", help=f"served model name [{llm.ENV_MODEL}]")
    g.add_argument("--api-key", help=f"prefer the variable: command lines are visible to "
                                     f"other users [{llm.ENV_API_KEY}]")
    g.add_argument("--temperature", type=float, help="default 0 (repeatable answers)")
    g.add_argument("--workers", type=int, help="requests in flight (default 4)")
    g.add_argument("--max-retries", type=int, help="default 5")
    g.add_argument("--timeout", type=float, help="seconds per request (default 120)")
    g.add_argument("--cache", help="cache file (default: OUTPUT.llm_cache.sqlite)")


def command(args: argparse.Namespace) -> None:
    """Runs `run_clean` with parsed `add_arguments` options (and --quiet); prints the counts.

    Args:
      args: the parsed options.
    """
    flags = {"--base-url": args.base_url, "--model": args.model, "--api-key": args.api_key,
             "--temperature": args.temperature, "--workers": args.workers,
             "--max-retries": args.max_retries, "--timeout": args.timeout,
             "--cache": args.cache}
    options: dict[str, Any] = {}
    if args.backend == "llm":
        options = dict(base_url=args.base_url, model=args.model, api_key=args.api_key,
                       cache_path=args.cache)
        named = dict(temperature=args.temperature, workers=args.workers,
                     max_retries=args.max_retries, timeout_s=args.timeout)
        options.update({k: v for k, v in named.items() if v is not None})
    elif any(v is not None for v in flags.values()):
        given = [name for name, v in flags.items() if v is not None]
        verb = "applies" if len(given) == 1 else "apply"
        raise CleanError(f"{', '.join(given)} only {verb} to --backend llm")
    counts = run_clean(args.input, args.output, args.backend, overwrite=args.overwrite,
                       progress=not args.quiet, **options)
    print(json.dumps(counts))


def main(argv: list[str] | None = None) -> int:
    """Command line for `run_clean`; prints the counts as JSON.

    Args:
      argv: arguments without the program name.

    Returns:
      0 on success, 2 on a usage/settings error, 1 when the LLM server failed.
    """
    p = argparse.ArgumentParser(prog="python -m cacophony_jax.curate.clean",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    try:
        command(p.parse_args(argv))
    except CleanError as e:
        print(f"clean: {e}", file=sys.stderr)
        return 2
    except llm.LLMError as e:
        print(f"clean: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

r"""Command line: embed, search, caption, evaluate, export and curate.

    python -m cacophony_jax.cli embed sounds/ --bundle bundles/cacophony --out index.npz
    python -m cacophony_jax.cli search "a dog barks" --index index.npz --bundle bundles/cacophony
    python -m cacophony_jax.cli caption clip.wav --bundle bundles/cacophony
    python -m cacophony_jax.cli eval --bundle bundles/cacophony --esc50 data/ESC-50 --out results
    python -m cacophony_jax.cli export --checkpoint runs/caco --out bundles/cacophony
    python -m cacophony_jax.cli curate {clean,caption,build} ...

Every command has --help with examples. Mistakes a user can make (a bad path, an
unreadable file, a bundle that does not fit an index) end with one line
"error: ..." and exit status 2; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from cacophony_jax import atomic_write, embedding_index
from cacophony_jax import cli_options as options
from cacophony_jax.audio.files import decode_files, find_audio_files, per_clip
from cacophony_jax.audio.io import SAMPLE_RATE
from cacophony_jax.progress import ProgressLine

_SHOWN_FAILURES = 10


class CommandError(ValueError):
    """A command-line mistake; the message names the thing and the fix."""


def load_model(bundle: str) -> Any:
    """Loads an inference bundle (`inference.load`)."""
    from cacophony_jax import inference  # lazy: JAX starts only when a model is needed

    return inference.load(bundle)


def _report_failures(failures: list[str], total: int) -> None:
    if failures:
        shown = "\n  ".join(failures[:_SHOWN_FAILURES])
        more = f"\n  ... and {len(failures) - _SHOWN_FAILURES} more" if len(
            failures) > _SHOWN_FAILURES else ""
        print(f"skipped {len(failures)} of {total} file(s) that could not be read:\n  "
              f"{shown}{more}", file=sys.stderr)


def _files(inputs: list[str], extensions: str) -> list[tuple[str, str]]:
    exts = options.extensions(extensions)
    files = find_audio_files(inputs, exts)
    if not files:
        raise CommandError(f"no audio files ({', '.join(exts)}) in {inputs}; pass audio files "
                           f"or folders, or change --extensions")
    return files


# ------------------------------------------------------------------ embed / search


def cmd_embed(args: argparse.Namespace) -> int:
    """Embeds audio files into an index .npz."""
    if not args.out.endswith(".npz"):
        raise CommandError(f"--out {args.out} must be a .npz file name")
    atomic_write.check_writable(args.out, "--out")  # before hours of embedding, not after
    files = [path for path, _ in _files(args.inputs, args.extensions)]
    model = load_model(args.bundle)
    progress = ProgressLine(not args.quiet)
    paths, vectors, failures = [], [], []
    for batch in decode_files(files, args.batch_size, args.workers):
        good = [(p, a) for p, a in batch if not isinstance(a, Exception)]
        failures += [f"{p}: {a}" for p, a in batch if isinstance(a, Exception)]
        results = per_clip(lambda clips: model.embed_audio(
            clips, sample_rate=SAMPLE_RATE, batch_size=args.batch_size,
            window_seconds=args.window_seconds), [a for _, a in good])
        for (path, _), result in zip(good, results, strict=True):
            if isinstance(result, Exception):
                failures.append(f"{path}: {result}")
            else:
                paths.append(os.path.abspath(path))
                vectors.append(np.asarray(result, np.float32))
        progress("embed", len(paths) + len(failures), len(files))
    _report_failures(failures, len(files))
    if not paths:
        raise CommandError(f"none of the {len(files)} audio files could be read; see the "
                           f"messages above")
    out = embedding_index.write_index(args.out, paths, vectors, args.bundle, model)
    print(f"embedded {len(paths)} file(s) ({len(failures)} unreadable, skipped) -> {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Prints the indexed files closest to each text query."""
    if not all(q.strip() for q in args.queries):
        raise CommandError("a search query is empty; describe the sound, e.g. \"a dog barks\"")
    paths, emb, meta = embedding_index.read_index(args.index)
    model = load_model(args.bundle)  # first: a folder that is no bundle is never hashed
    if getattr(model, "kind", "cacophony") != "cacophony":
        raise CommandError(f"bundle {args.bundle} is a {model.kind!r} model without a text "
                           f"tower; text search needs a stage-2 (cacophony) bundle")
    fingerprint = (embedding_index.bundle_fingerprint(args.bundle)
                   if os.path.exists(args.bundle) else None)
    embedding_index.check_bundle(args.index, meta, args.bundle, fingerprint, model)
    queries = model.embed_text(list(args.queries))
    ranked = embedding_index.rank(emb, queries, args.top_k)
    for query, (top, scores) in zip(args.queries, ranked, strict=True):
        if len(args.queries) > 1:
            print(f"# {_field(query)}")  # a line break in a query stays in its header
        for i, score in zip(top, scores, strict=True):
            print(f"{score:.4f}\t{_field(paths[i])}")
    return 0


# ------------------------------------------------------------------ caption / eval / export


def _field(path: str) -> str:
    """A path as one field of a tab-separated line (a tab or line break in a file name
    is written escaped, as \\t, \\n; a byte of a name that is not UTF-8 as \\xNN)."""
    path = os.fsencode(path).decode("utf-8", "backslashreplace")
    return path.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def cmd_caption(args: argparse.Namespace) -> int:
    """Prints "path<TAB>caption" for every audio file (--every-window: a line
    "path<TAB>start-end<TAB>caption" for every window, seconds to the millisecond)."""
    from cacophony_jax.models import decoding

    files = [path for path, _ in _files(args.inputs, args.extensions)]
    model = load_model(args.bundle)
    if getattr(model, "kind", "cacophony") != "cacophony":
        raise CommandError(f"bundle {args.bundle} is a {model.kind!r} model without a "
                           f"captioning decoder; use a stage-2 (cacophony) bundle")
    model.check_caption_options(args.method, args.max_len, args.beam_size, args.temperature,
                                names=decoding.FLAG_NAMES, length_penalty=args.length_penalty)
    # On a terminal the captions themselves show the progress (a redrawn line would
    # run into them); redirected, the line reports on stderr.
    progress = ProgressLine(not args.quiet and not sys.stdout.isatty())
    failures, written = [], 0
    describe = model.caption_windows if args.every_window else model.caption
    for batch in decode_files(files, args.batch_size, args.workers):
        good = [(p, a) for p, a in batch if not isinstance(a, Exception)]
        failures += [f"{p}: {a}" for p, a in batch if isinstance(a, Exception)]
        texts = per_clip(lambda clips: describe(
            clips, sample_rate=SAMPLE_RATE, method=args.method, max_len=args.max_len,
            beam_size=args.beam_size, temperature=args.temperature, seed=args.seed,
            window_seconds=args.window_seconds, length_penalty=args.length_penalty),
            [a for _, a in good])
        for (path, _), text in zip(good, texts, strict=True):
            if isinstance(text, Exception):
                failures.append(f"{path}: {text}")
                continue
            if args.every_window:  # one line per window: its span in seconds, its caption
                print("".join(f"{_field(path)}\t{start:.3f}-{end:.3f}\t{caption}\n"
                              for start, end, caption in text), end="", flush=True)
            else:
                print(f"{_field(path)}\t{text}", flush=True)
            written += 1
        progress("caption", written + len(failures), len(files))
    _report_failures(failures, len(files))
    if not written:
        raise CommandError(f"none of the {len(files)} audio files could be read")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Runs `eval` (see `cacophony_jax.evals.eval_command`)."""
    from cacophony_jax.evals import eval_command

    return eval_command.command(args, load_model, ProgressLine(not args.quiet))


def cmd_export(args: argparse.Namespace) -> int:
    """Writes an inference bundle from a training checkpoint or a released file."""
    from cacophony_jax.convert import export

    if args.checkpoint:
        given = [flag for flag, value in (("--tokenizer", args.tokenizer),
                                          ("--window-seconds", args.window_seconds),
                                          ("--text-length", args.text_length),
                                          ("--text-heads", args.text_heads),
                                          ("--pool-heads", args.pool_heads))
                 if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise CommandError(f"{', '.join(given)} only {verb} to --official; a training "
                               "run's bundle takes the run's own tokenizer, clip and text "
                               "lengths")
        out = export.export_from_checkpoint(args.checkpoint, args.out, dtype=args.dtype,
                                            step=args.step, overwrite=args.overwrite)
    else:
        if args.step is not None:
            raise CommandError("--step applies to --checkpoint; a released file holds one "
                               "set of weights")
        out = export.export_from_official(
            args.official, args.out, tokenizer_path=args.tokenizer, dtype=args.dtype,
            window_seconds=10.0 if args.window_seconds is None else args.window_seconds,
            text_length=args.text_length, text_heads=args.text_heads,
            pool_heads=args.pool_heads, overwrite=args.overwrite)
    print(f"wrote bundle {out}")
    return 0


# ------------------------------------------------------------------ curate


def cmd_curate_clean(args: argparse.Namespace) -> int:
    """Runs `curate.clean.run_clean` and prints its counts as JSON."""
    from cacophony_jax.curate import clean, llm

    try:
        clean.command(args)
    except llm.LLMError as e:  # the server failed for good: not a usage error
        print(f"error: {e}", file=sys.stderr)  # the message says how to resume
        return 1
    return 0


# ------------------------------------------------------------------ parser


PROG = "python -m cacophony_jax.cli"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command.

    Returns:
      The parser; parsed arguments carry the command function in `func`.
    """
    from cacophony_jax.evals import eval_command

    command = options.add_command
    parser = options.Parser(prog=PROG, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=options.Parser)
    p = command(sub, "embed", cmd_embed, "embed audio files into a searchable index",
                f"  {PROG} embed sounds/ more/clip.flac --bundle B --out index.npz\n")
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_FILE", help="folders are searched "
                   "recursively")
    p.add_argument("--bundle", required=True, help="inference bundle folder")
    p.add_argument("--out", required=True, help="index file to write (.npz)")
    options.audio_options(p, 32)
    options.window_option(p, "embed each file's first S seconds in one pass and average "
                             "the embeddings of S-second windows of longer files")
    p = command(sub, "search", cmd_search, "find the indexed files closest to a text query",
                f'  {PROG} search "a dog barks" --index index.npz --bundle B --top-k 5\n')
    p.add_argument("queries", nargs="+", metavar="QUERY")
    p.add_argument("--index", required=True, help="index written by embed")
    p.add_argument("--bundle", required=True, help="the bundle the index was built with")
    p.add_argument("--top-k", type=options.positive, default=10)
    p = command(sub, "caption", cmd_caption, "caption audio files (prints path<TAB>caption)",
                f"  {PROG} caption a.wav clips/ --bundle B --method beam --beam-size 4\n"
                f"  {PROG} caption walk.flac --bundle B --every-window\n")
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("--bundle", required=True)
    p.add_argument("--every-window", action="store_true",
                   help="caption every window of a long file, one line each: "
                        "path<TAB>start-end<TAB>caption (seconds, e.g. 10.000-20.000)")
    options.audio_options(p, 16)
    options.window_option(p, "describe each file's first S seconds (--every-window: "
                             "every S-second window)")
    options.decoding_options(p, "greedy")
    p = command(sub, "eval", cmd_eval, "evaluate a bundle on public datasets",
                f"  {PROG} eval --bundle B --audiocaps data/audiocaps --clotho data/clotho "
                f"--esc50 data/ESC-50 --urbansound8k data/UrbanSound8K --out results/\n"
                f"  {PROG} eval --bundle B --synthetic 200 --caption-clips 100\n")
    eval_command.add_arguments(p)
    p = command(sub, "export", cmd_export, "write an inference bundle",
                f"  {PROG} export --checkpoint runs/quickstart/cacophony --out bundles/q\n"
                f"  {PROG} export --official Cacophony.ckpt --tokenizer roberta-base/ "
                f"--out bundles/cacophony --dtype bfloat16\n")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training workdir, checkpoints folder or step")
    source.add_argument("--official", metavar="FILE", help="released Cacophony/AudioMAE .ckpt")
    p.add_argument("--tokenizer", help="RoBERTa tokenizer.json or folder (with --official)")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    p.add_argument("--window-seconds", type=float,
                   help="with --official: the clip length it was trained on (default 10)")
    p.add_argument("--text-length", type=int,
                   help="with --official: tokens per text it was trained with (default 64)")
    p.add_argument("--text-heads", type=options.positive,
                   help="with --official: text-tower attention heads, when no named variant "
                        "has the file's sizes")
    p.add_argument("--pool-heads", type=options.positive,
                   help="with --official: audio-pool attention heads, likewise")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing bundle (one holding nothing but its own files)")
    _curate_parsers(sub)
    return parser


def _curate_parsers(sub) -> None:
    from cacophony_jax.curate import build, caption, clean

    command = options.add_command
    # The steps set the command run; each has its own --help with examples.
    curate = command(sub, "curate", None, "stage 0: clean, caption and build datasets",
                     f"  {PROG} curate clean raw.jsonl manifest.jsonl\n"
                     f"  {PROG} curate caption unlabeled/ captioned.jsonl --bundle B\n"
                     f"  {PROG} curate build --input web=clean.jsonl --out data/train\n"
                     f"  {PROG} curate STEP --help\n")
    steps = curate.add_subparsers(dest="step", required=True, metavar="STEP",
                                  parser_class=options.Parser)
    p = command(steps, "clean", cmd_curate_clean, "noisy web metadata -> one caption a clip",
                f"  {PROG} curate clean raw.jsonl manifest.jsonl\n"
                f"  {PROG} curate clean raw.jsonl manifest.jsonl --backend llm "
                f"--base-url http://localhost:8000/v1 --model MODEL\n")
    clean.add_arguments(p)
    p = command(steps, "caption", lambda args: caption.command(
        args, lambda: load_model(args.bundle), ProgressLine(not args.quiet)),
                 "add synthetic captions from a bundle",
                 f"  {PROG} curate caption unlabeled/ captioned.jsonl --bundle B "
                 f"--num-captions 3\n"
                 f"  {PROG} curate caption manifest.jsonl out.jsonl --bundle B --method sample\n")
    options.audio_options(p, 16)
    options.decoding_options(p, "beam")
    caption.add_arguments(p)
    p = command(steps, "build", lambda args: build.command(args, ProgressLine(not args.quiet)),
                "merge, deduplicate and filter sources "
                "into array_record shards",
                f"  {PROG} curate build --input web=clean.jsonl --input ac=audiocaps:data/ac "
                f"--exclude-source audiocaps:data/ac:test --exclude-source clotho:data/clotho "
                f"--max-seconds 30 --out data/train --num-shards 64\n")
    build.add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Runs one command.

    Args:
      argv: arguments without the program name (default: sys.argv[1:]).

    Returns:
      The exit status: 0 done, 1 a remote service failed, 2 a usage or input error.
    """
    args = build_parser().parse_args(argv)
    if not args.debug:
        from cacophony_jax import quiet

        quiet.quiet_abandoned_reads()  # a damaged checkpoint gives one error line
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader stopped early (`| head`): not a failure
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:  # every user-caused error of the package
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue where possible",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

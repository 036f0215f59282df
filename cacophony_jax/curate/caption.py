"""Stage 0 synthetic captions: unlabeled audio -> captions from a stage-2 bundle's decoder.

    python -m cacophony_jax.cli curate caption unlabeled/ captioned.jsonl \
        --bundle bundles/cacophony --num-captions 3 --method beam

The input is a manifest (see `cacophony_jax.data.manifest`) or a folder searched
recursively for audio files (ids are the paths relative to it). Every clip gets up
to `num_captions` new captions in ``synthetic_captions``; its captions, earlier
synthetic captions and labels are kept. How the K captions are drawn:

* ``beam`` (default): the beam-search caption first (the decoder's best guess), then
  K - 1 sampled captions at `temperature`, each with its own seed, for variety;
* ``greedy``: the greedy caption first, then K - 1 samples;
* ``sample``: K samples with K different seeds.

Identical captions of one clip are kept once, so a confident decoder may give fewer
than K. Output rows are the project's manifest rows (audio paths relative to the
output's folder), flushed one by one; rerunning continues after the ids already in
the output (a last row cut off by an interruption is dropped), with the same bundle
and decoding settings: OUTPUT.settings.json records them, and a rerun with others, or
onto an output without them (not begun by this tool), is refused, the output left as
it is. With `overwrite` the new rows go to OUTPUT.partial, and their settings to
OUTPUT.partial.settings.json; both replace OUTPUT and its settings only once complete
(a rerun with the same `overwrite` settings continues them).

A clip that cannot be captioned, because its audio cannot be read (or a file's
name is not UTF-8, which a manifest cannot hold) or the decoder
refuses it (shorter than one patch, 0.15 s), gets no new captions and is counted and
named. A manifest row is then written unchanged, so its captions and labels are never
lost (being in the output, it is not retried by a rerun: fix its audio and rerun with
`overwrite`); a file of a folder has nothing to keep and is skipped. Bad manifest rows
(that its reader refuses, e.g. "captions" not a list) are counted in ``bad_rows``
and named; those that are JSON objects with an "id" or "audio" string are written as
they are (their audio path rebased), the others (``dropped``) cannot be. Short clips are
not padded: captions of mostly silence would only teach the model silence.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from cacophony_jax.audio.files import AUDIO_EXTENSIONS, decode_files, per_clip
from cacophony_jax.audio.io import SAMPLE_RATE
from cacophony_jax.curate import output_settings, resume
from cacophony_jax.curate.caption_inputs import (
    METHODS,
    CaptionError,
    check_request,
    input_records,
)
from cacophony_jax.progress import Progress

_SHOWN_FAILURES = 20


def _check_model(model: Any) -> None:
    if getattr(model, "kind", "cacophony") != "cacophony":
        raise CaptionError(f"this bundle is a {model.kind!r} model, which has no captioning "
                           f"decoder; export a stage-2 (cacophony) checkpoint instead")


def caption_batch(model: Any, audio: Sequence[np.ndarray], num_captions: int = 1,
                  method: str = "beam", *, beam_size: int = 4, temperature: float = 1.0,
                  max_len: int | None = None, seed: int = 0,
                  length_penalty: float = 0.0) -> list[list[str] | ValueError]:
    """Up to `num_captions` distinct captions per clip (see the module docstring).

    Args:
      model: an `inference.CacophonyModel` (or anything with its `caption`).
      audio: float32 waveforms at 16 kHz.
      num_captions: captions wanted per clip.
      method: "beam", "greedy" or "sample" (how the first caption is drawn).
      beam_size: beams for "beam".
      temperature: sampling temperature.
      max_len: tokens per caption at most (None: the bundle's text length).
      seed: base seed of the sampled captions.
      length_penalty: beam ranking's length exponent (see `CacophonyModel.caption`).

    Returns:
      Per clip, its distinct non-empty captions in the order drawn, or the ValueError
      the model raised for it (e.g. a clip too short for one patch).
    """
    if method not in METHODS:
        raise CaptionError(f"unknown captioning method {method!r}; use one of {METHODS}")
    if num_captions < 1:
        raise CaptionError(f"--num-captions must be at least 1, got {num_captions}")
    rounds = []
    for k in range(num_captions):
        def draw(clips, how=method if k == 0 else "sample", k=k):
            return model.caption(clips, sample_rate=SAMPLE_RATE, method=how, max_len=max_len,
                                 beam_size=beam_size, temperature=temperature, seed=seed + k,
                                 length_penalty=length_penalty)
        rounds.append(per_clip(draw, list(audio)))
    out: list[list[str] | ValueError] = []
    for texts in zip(*rounds, strict=True):
        error = next((t for t in texts if isinstance(t, Exception)), None)
        out.append(error if error is not None else
                   list(dict.fromkeys(t.strip() for t in texts if t and t.strip())))
    return out


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def run_caption(model: Any, input_path: str, output_path: str, *, num_captions: int = 3,
                method: str = "beam", beam_size: int = 4, temperature: float = 1.0,
                max_len: int | None = None, batch_size: int = 16, seed: int = 0,
                length_penalty: float = 0.0, overwrite: bool = False, workers: int = 4,
                extensions: Sequence[str] = AUDIO_EXTENSIONS,
                progress: Progress | None = None) -> dict[str, int]:
    """Adds synthetic captions to every clip of a manifest or folder (resumable).

    Args:
      model: a loaded stage-2 bundle (`inference.load`).
      input_path: a manifest, or a folder of audio files.
      output_path: manifest JSONL to write (continued when it exists).
      num_captions: new captions per clip (K).
      method: how the first caption is drawn: "beam", "greedy" or "sample".
      beam_size: beams for "beam".
      temperature: sampling temperature.
      max_len: tokens per caption at most (None: the bundle's text length).
      batch_size: clips captioned at once.
      seed: base sampling seed.
      length_penalty: beam ranking's length exponent (see `CacophonyModel.caption`).
      overwrite: write a new output instead of continuing it; it replaces the old one
        once complete (see `resume.prepare_output`).
      workers: threads decoding audio.
      extensions: audio suffixes collected from a folder.
      progress: called as progress(label, done, total).

    Returns:
      Counts: clips, written, resumed, unreadable (audio missing or undecodable, or
      a file name that is not UTF-8),
      uncaptioned (refused by the decoder, e.g. too short), passed_through (manifest
      rows of those two kinds, and bad rows, written unchanged), captions (new captions
      written), no_new_caption (clips written without one: every caption drawn was
      empty), bad_rows (manifest rows its reader refuses, e.g. "captions" not a list:
      written unchanged when they are JSON objects with an "id" or "audio" string, else
      dropped), dropped (bad rows not written).
    """
    check_request(input_path, output_path, num_captions, method, batch_size)
    if not 0 <= seed <= 2**32 - num_captions:  # clip k's draws use seed + k
        raise CaptionError(f"--seed {seed} is out of range: with {num_captions} captions a "
                           f"clip uses seeds {seed}..{seed + num_captions - 1}, which must "
                           "be in [0, 2**32 - 1] (JAX's keys hold 32 bits)")
    # Through a link: the file it names is written (and replaced by --overwrite), and
    # the audio paths are relative to that file's folder.
    output_path = os.path.realpath(output_path)
    _check_model(model)
    _check_decoding(model, num_captions, method, beam_size, temperature, max_len,
                    length_penalty)
    out_dir = os.path.dirname(os.path.abspath(output_path))
    records_all, class_names, bad_rows, dropped = input_records(input_path, extensions,
                                                                 out_dir)
    settings = output_settings.decoding_settings(model, num_captions, method, beam_size,
                                                 temperature, max_len, seed, length_penalty)
    try:
        output_settings.check_settings(
            output_path, settings, overwrite, tool="curate caption",
            redo="caption every clip again", row_key="synthetic_captions",
            earlier=output_settings.caption_earlier(getattr(model, "bundle_path", "")))
        writing, done = resume.prepare_output(output_path, overwrite)
    except resume.OutputError as e:
        raise CaptionError(str(e)) from None
    # The settings describe the rows next to them: an --overwrite run's, its partial
    # output's until that replaces the output (then they replace the old settings).
    output_settings.record(writing, settings)
    from_manifest = not os.path.isdir(input_path)
    counts = dict.fromkeys(("clips", "written", "resumed", "unreadable", "uncaptioned",
                            "passed_through", "captions", "no_new_caption", "bad_rows",
                            "dropped"), 0)
    counts["clips"] = len(records_all)
    counts["bad_rows"], counts["dropped"] = len(bad_rows) + dropped, dropped
    todo = [r for r in records_all if r["id"] not in done]
    counts["resumed"] = len(records_all) - len(todo)
    failures = []
    # A manifest holds UTF-8 text: a file name that is not (it reaches Python with lone
    # surrogates) would make a row every reader refuses.
    for record in [r for r in todo if not _is_utf8(r["id"])]:
        todo.remove(record)
        counts["unreadable"] += 1
        failures.append(f"{ascii(os.fsencode(record['id']))[2:-1]}: the file name is not "
                        "valid UTF-8, which a manifest cannot hold; rename it (e.g. with "
                        "convmv -f latin1 -t utf8 --notest) and rerun")
    with open(writing, "a", encoding="utf-8", newline="\n") as out:
        for row in bad_rows:  # kept as they are: their captions and labels are not lost
            if row["id"] not in done:
                out.write(resume.json_line(row))
                out.flush()
                counts["written"] += 1
                counts["passed_through"] += 1
        start = 0
        for batch in decode_files([r["audio_path"] for r in todo], batch_size, workers):
            records, start = todo[start:start + len(batch)], start + len(batch)
            # Per clip: its new captions, or why it has none.
            results: list[list[str] | Exception] = [a for _, a in batch]
            good = [i for i, a in enumerate(results) if not isinstance(a, Exception)]
            counts["unreadable"] += len(results) - len(good)
            if good:
                # Sampled draws are keyed by each clip's samples and the seed, so a
                # clip's captions do not depend on the batch it landed in.
                captions = caption_batch(model, [results[i] for i in good], num_captions,
                                         method, beam_size=beam_size,
                                         temperature=temperature, max_len=max_len, seed=seed,
                                         length_penalty=length_penalty)
                for i, new in zip(good, captions, strict=True):
                    results[i] = new
                    counts["uncaptioned"] += isinstance(new, Exception)
            for record, new in zip(records, results, strict=True):
                if isinstance(new, Exception):
                    failures.append(f"{record['id']}: {new}")
                    if not from_manifest:
                        continue
                    counts["passed_through"] += 1
                    new = []
                else:
                    counts["captions"] += len(new)
                    counts["no_new_caption"] += not new
                out.write(resume.json_line(_row(record, new, class_names, out_dir)))
                out.flush()  # a crash loses at most the row being written
                counts["written"] += 1
            if progress:
                progress("caption", counts["resumed"] + start, len(records_all))
    resume.finish_output(output_path, writing)
    output_settings.follow(output_path, writing)
    if failures:
        what = ("written unchanged, without new captions (fix their audio and rerun with "
                "--overwrite to caption them)" if from_manifest else "skipped")
        logging.warning("%d clip(s) could not be captioned, %s:\n  %s%s", len(failures), what,
                        "\n  ".join(failures[:_SHOWN_FAILURES]),
                        "\n  ..." if len(failures) > _SHOWN_FAILURES else "")
    if counts["bad_rows"]:
        logging.warning("manifest %s: %d bad row(s) (named above): %d written as they are, "
                        "without new captions (fix them and rerun with --overwrite to "
                        "caption them), %d dropped (not a JSON object with an \"id\" or "
                        "\"audio\" string)", input_path, counts["bad_rows"], len(bad_rows),
                        dropped)
    return counts


def _check_decoding(model: Any, num_captions: int, method: str, beam_size: int,
                    temperature: float, max_len: int | None, length_penalty: float) -> None:
    """Refuses decoding options the model cannot use before any clip is read (a bad
    option would otherwise fail every clip, one by one)."""
    check = getattr(model, "check_caption_options", None)
    if check is None:
        return
    from cacophony_jax.models import decoding  # the model is loaded: JAX is up

    names = decoding.FLAG_NAMES
    try:
        check(method, max_len, beam_size, temperature, names=names,
              length_penalty=length_penalty)  # max_len None: the bundle's text length
        if num_captions > 1 and method != "sample":  # the further captions are sampled
            check("sample", max_len, beam_size, temperature, names=names)
    except ValueError as e:
        raise CaptionError(str(e)) from None


def _row(record: dict, new: list[str], class_names: Sequence[str], out_dir: str) -> dict:
    synthetic = list(dict.fromkeys([*record["synthetic_captions"], *new]))
    row = {"id": record["id"], "audio": os.path.relpath(record["audio_path"], out_dir),
           "captions": list(record["captions"]), "synthetic_captions": synthetic}
    if record["labels"]:
        row["label"] = [class_names[i] for i in record["labels"]]
    return {**row, **record.get("other_keys", {})}


def add_arguments(parser: Any) -> None:
    """Adds the options of `curate caption` (besides the shared audio/decoding ones).

    Args:
      parser: the command's argparse.ArgumentParser.
    """
    parser.add_argument("input", help="manifest (.jsonl/.csv) or folder of audio")
    parser.add_argument("output", help="manifest JSONL to write; continued when it exists")
    parser.add_argument("--bundle", required=True, help="stage-2 inference bundle")
    parser.add_argument("--num-captions", type=int, default=3, help="new captions per clip (K)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write a new output, which replaces the old one once complete "
                             "(an interrupted one is continued from OUTPUT.partial)")


def command(args: Any, load: Callable[[], Any], progress: Progress | None) -> int:
    """Runs `curate caption` and prints its counts as JSON.

    Args:
      args: parsed options.
      load: loads the bundle (called once the options are checked).
      progress: called as progress(label, done, total).

    Returns:
      The exit status (0).
    """
    check_request(args.input, args.output, args.num_captions, args.method, args.batch_size)
    model = load()
    from cacophony_jax.cli_options import extensions as parse_extensions

    extensions = parse_extensions(args.extensions)
    counts = run_caption(model, args.input, args.output, num_captions=args.num_captions,
                         method=args.method, beam_size=args.beam_size,
                         temperature=args.temperature, max_len=args.max_len,
                         batch_size=args.batch_size, seed=args.seed,
                         length_penalty=args.length_penalty, overwrite=args.overwrite,
                         workers=args.workers, extensions=extensions, progress=progress)
    print(json.dumps(counts))
    return 0

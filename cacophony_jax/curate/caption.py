"""Stage 0 synthetic captions: unlabeled audio -> captions from a stage-2 bundle's decoder.

    python -m cacophony_jax.cli curate caption unlabeled/ captioned.jsonl \
        --bundle bundles/cacophony --num-captions 3 --method beam

The input is a manifest (see `cacophony_jax.data.sources`) or a folder searched
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
the output (a cut-off last line is dropped). Unreadable files are skipped and counted.

`class_mention_rate` measures how often captions name one of the clip's event classes:
a cheap check of a captioner on labelled held-out clips (`class_mention_report`).
"""

from __future__ import annotations

import collections
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from absl import logging

from cacophony_jax.audio.io import SAMPLE_RATE, AudioError, load_audio, to_float32
from cacophony_jax.data.sources import AUDIO_EXTENSIONS, ManifestSource, SourceError

METHODS = ("beam", "greedy", "sample")
_SHOWN_FAILURES = 20

Progress = Callable[[str, int, int], None]


class CaptionError(ValueError):
    """Bad captioning input, output or settings (the message says how to fix it)."""


def find_audio_files(inputs: Sequence[str], extensions: Sequence[str] = AUDIO_EXTENSIONS
                     ) -> list[tuple[str, str]]:
    """Audio files named directly or found (recursively, sorted) under folders.

    Args:
      inputs: files and folders.
      extensions: suffixes to collect from folders (case-insensitive, no dot); files
        named directly are taken whatever their suffix.

    Returns:
      (path, name) pairs: name is the path relative to its folder, or the path itself
      for a file named directly.
    """
    suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)
    found = []
    for item in inputs:
        if os.path.isfile(item):
            found.append((item, item))
        elif os.path.isdir(item):
            for folder, subfolders, files in os.walk(item):
                subfolders.sort()
                for name in sorted(files):
                    if name.lower().endswith(suffixes) and not name.startswith("."):
                        path = os.path.join(folder, name)
                        found.append((path, os.path.relpath(path, item)))
        else:
            raise CaptionError(f"{item} does not exist; pass audio files or folders")
    return found


_WORD = re.compile(r"[a-z0-9]+")


def _stem(word: str) -> str:
    # Light suffix stripping so "a bird trilling" mentions "bird trill" and "crackling"
    # mentions "crackle": -ing, a doubled consonant (not l/s/z), plural -s/-es, final -e.
    if word.endswith("ing") and len(word) > 5:
        word = word[:-3]
        if len(word) > 2 and word[-1] == word[-2] and word[-1] not in "lsz":
            word = word[:-1]
    elif word.endswith(("ses", "xes", "zes", "ches", "shes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        word = word[:-1]
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def _stems(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text.lower().replace("_", " "))]


def mentions(caption: str, class_name: str) -> bool:
    """Whether `caption` names `class_name` (case-, plural- and -ing-insensitive words).

    Args:
      caption: generated text.
      class_name: e.g. "bird trill" or "engine_hum".

    Returns:
      True when the class name's words occur in the caption consecutively.
    """
    words, name = _stems(caption), _stems(class_name)
    return bool(name) and any(words[i:i + len(name)] == name
                              for i in range(len(words) - len(name) + 1))


def class_mention_rate(captions: Sequence[str | Sequence[str]],
                       labels: Sequence[Sequence[str]]) -> float:
    """Share of labelled clips whose caption(s) mention one of the clip's classes.

    Args:
      captions: per clip, one caption or a list of captions (any one may mention).
      labels: per clip, its class names; clips with none are not counted.

    Returns:
      A fraction in [0, 1].
    """
    if len(captions) != len(labels):
        raise CaptionError(f"got {len(captions)} caption entries for {len(labels)} label "
                           f"entries; need one per clip")
    hits = total = 0
    for texts, names in zip(captions, labels, strict=True):
        if isinstance(names, str):
            raise CaptionError(f"labels must be a list of class names per clip, got {names!r}")
        if not names:
            continue
        texts = [texts] if isinstance(texts, str) else list(texts)
        total += 1
        hits += any(mentions(t, n) for t in texts for n in names)
    if not total:
        raise CaptionError("no clip has a label; class_mention_rate needs labelled clips")
    return hits / total


def _check_model(model: Any) -> None:
    if getattr(model, "kind", "cacophony") != "cacophony":
        raise CaptionError(f"this bundle is a {model.kind!r} model, which has no captioning "
                           f"decoder; export a stage-2 (cacophony) checkpoint instead")


def caption_batch(model: Any, audio: Sequence[np.ndarray], num_captions: int = 1,
                  method: str = "beam", *, beam_size: int = 4, temperature: float = 1.0,
                  max_len: int = 32, seed: int = 0) -> list[list[str] | ValueError]:
    """Up to `num_captions` distinct captions per clip (see the module docstring).

    Args:
      model: an `inference.CacophonyModel` (or anything with its `caption`).
      audio: float32 waveforms at 16 kHz.
      num_captions: captions wanted per clip.
      method: "beam", "greedy" or "sample" (how the first caption is drawn).
      beam_size: beams for "beam".
      temperature: sampling temperature.
      max_len: tokens per caption at most.
      seed: base seed of the sampled captions.

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
                                 beam_size=beam_size, temperature=temperature, seed=seed + k)
        rounds.append(per_clip(draw, list(audio)))
    out: list[list[str] | ValueError] = []
    for texts in zip(*rounds, strict=True):
        error = next((t for t in texts if isinstance(t, Exception)), None)
        out.append(error if error is not None else
                   list(dict.fromkeys(t.strip() for t in texts if t and t.strip())))
    return out


def _load(path: str) -> np.ndarray | Exception:
    try:
        return to_float32(load_audio(path))
    except (AudioError, OSError) as e:
        return e


def decode_files(paths: Sequence[str], batch_size: int, workers: int = 4
                 ) -> Iterator[list[tuple[str, np.ndarray | Exception]]]:
    """Decodes files to float32 at 16 kHz in threads, one batch ahead of the consumer.

    Args:
      paths: audio files.
      batch_size: files per yielded batch.
      workers: decoding threads.

    Yields:
      Lists of (path, float32 audio or the error that stopped its decoding).
    """
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), max(1, batch_size))]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ahead: collections.deque = collections.deque()
        for batch in batches:
            ahead.append((batch, [pool.submit(_load, p) for p in batch]))
            if len(ahead) > 1:
                done, futures = ahead.popleft()
                yield list(zip(done, (f.result() for f in futures), strict=True))
        while ahead:
            done, futures = ahead.popleft()
            yield list(zip(done, (f.result() for f in futures), strict=True))


def per_clip(fn: Callable[[list], Sequence], clips: list) -> list:
    """`fn` over a batch; if the batch is refused (ValueError), clip by clip.

    One bad clip (too short for a patch, say) then costs only itself.

    Args:
      fn: a batch function, e.g. `model.embed_audio` with its options bound.
      clips: its inputs.

    Returns:
      Per clip, its result or the ValueError it raised.
    """
    if not clips:
        return []
    try:
        return list(fn(clips))
    except ValueError:
        results = []
        for clip in clips:
            try:
                results.append(fn([clip])[0])
            except ValueError as e:
                results.append(e)
        return results


def _prepare_output(path: str, overwrite: bool) -> set[str]:
    """Ids already in the output (resume), after dropping a cut-off last line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if overwrite or not os.path.exists(path):
        open(path, "w").close()
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            logging.warning("%s: dropping a partial last line left by an interrupted run", path)
            f.truncate(keep)
    done = set()
    for number, line in enumerate(data[:keep].decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            raise CaptionError(f"output {path} line {number} is not a manifest row; pass "
                               f"--overwrite to start again or choose another output") from None
    return done


def _input_records(input_path: str, extensions: Sequence[str]) -> tuple[list[dict], tuple]:
    if os.path.isdir(input_path):
        files = find_audio_files([input_path], extensions)
        if not files:
            raise CaptionError(f"no audio files ({', '.join(extensions)}) under {input_path}")
        return [{"id": name, "audio_path": os.path.abspath(path), "captions": [],
                 "synthetic_captions": [], "labels": []} for path, name in files], ()
    try:
        source = ManifestSource(input_path, skip_bad_rows=True)
    except SourceError as e:
        raise CaptionError(str(e)) from None
    return [source[i] for i in range(len(source))], source.class_names


def run_caption(model: Any, input_path: str, output_path: str, *, num_captions: int = 3,
                method: str = "beam", beam_size: int = 4, temperature: float = 1.0,
                max_len: int = 32, batch_size: int = 16, seed: int = 0,
                overwrite: bool = False, workers: int = 4,
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
      max_len: tokens per caption at most.
      batch_size: clips captioned at once.
      seed: base sampling seed.
      overwrite: start the output afresh instead of continuing it.
      workers: threads decoding audio.
      extensions: audio suffixes collected from a folder.
      progress: called as progress(label, done, total).

    Returns:
      Counts: clips, written, resumed, unreadable, captions (new captions written).
    """
    _check_model(model)
    if method not in METHODS:
        raise CaptionError(f"unknown captioning method {method!r}; use one of {METHODS}")
    if batch_size < 1 or num_captions < 1:
        raise CaptionError(f"--batch-size and --num-captions must be at least 1, got "
                           f"{batch_size} and {num_captions}")
    if not os.path.exists(input_path):
        raise CaptionError(f"input {input_path} does not exist; pass a manifest or a folder")
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise CaptionError(f"output {output_path} would overwrite the input; choose another")
    records_all, class_names = _input_records(input_path, extensions)
    done = _prepare_output(output_path, overwrite)
    out_dir = os.path.dirname(os.path.abspath(output_path))
    counts = dict.fromkeys(("clips", "written", "resumed", "unreadable", "captions"), 0)
    counts["clips"] = len(records_all)
    todo = [r for r in records_all if r["id"] not in done]
    counts["resumed"] = len(records_all) - len(todo)
    failures = []
    with open(output_path, "a", encoding="utf-8", newline="\n") as out:
        start = 0
        for batch in decode_files([r["audio_path"] for r in todo], batch_size, workers):
            records, start = todo[start:start + len(batch)], start + len(batch)
            good = [(r, a) for r, (_, a) in zip(records, batch, strict=True)
                    if not isinstance(a, Exception)]
            failures += [f"{r['id']}: {a}" for r, (_, a) in zip(records, batch, strict=True)
                         if isinstance(a, Exception)]
            if good:
                batch_seed = seed + 1000 * (zlib.crc32(good[0][0]["id"].encode()) % 100_000)
                captions = caption_batch(model, [a for _, a in good], num_captions, method,
                                         beam_size=beam_size, temperature=temperature,
                                         max_len=max_len, seed=batch_seed)
                for (record, _), new in zip(good, captions, strict=True):
                    if isinstance(new, Exception):
                        failures.append(f"{record['id']}: {new}")
                        continue
                    out.write(json.dumps(_row(record, new, class_names, out_dir),
                                         ensure_ascii=False) + "\n")
                    out.flush()  # a crash loses at most the row being written
                    counts["written"] += 1
                    counts["captions"] += len(new)
            counts["unreadable"] = len(failures)
            if progress:
                progress("caption", counts["resumed"] + start, len(records_all))
    if failures:
        logging.warning("skipped %d unreadable file(s):\n  %s%s", len(failures),
                        "\n  ".join(failures[:_SHOWN_FAILURES]),
                        "\n  ..." if len(failures) > _SHOWN_FAILURES else "")
    return counts


def _row(record: dict, new: list[str], class_names: Sequence[str], out_dir: str) -> dict:
    synthetic = list(dict.fromkeys([*record["synthetic_captions"], *new]))
    row = {"id": record["id"], "audio": os.path.relpath(record["audio_path"], out_dir),
           "captions": list(record["captions"]), "synthetic_captions": synthetic}
    if record["labels"]:
        row["label"] = [class_names[i] for i in record["labels"]]
    return row


def class_mention_report(model: Any, source: Any, *, limit: int | None = None,
                         method: str = "beam", beam_size: int = 4, batch_size: int = 16,
                         max_len: int = 32) -> dict[str, Any]:
    """Captions labelled clips and measures `class_mention_rate` on them.

    Args:
      model: a loaded stage-2 bundle.
      source: a labelled source (e.g. the synthetic corpus's held-out "eval" split).
      limit: caption only the first `limit` clips (None: all).
      method: "beam", "greedy" or "sample".
      beam_size: beams for "beam".
      batch_size: clips captioned at once.
      max_len: tokens per caption at most.

    Returns:
      {"clips": n, "class_mention_rate": fraction, "examples": up to 5
      {"id", "labels", "caption"} dicts}.
    """
    _check_model(model)
    count = len(source) if limit is None else min(limit, len(source))
    captions, labels, ids = [], [], []
    for start in range(0, count, batch_size):
        records = [source[i] for i in range(start, min(start + batch_size, count))]
        audio = [to_float32(r["audio"]) if "audio" in r else _load(r["audio_path"])
                 for r in records]
        keep = [i for i, a in enumerate(audio) if not isinstance(a, Exception)]
        if not keep:
            continue
        texts = caption_batch(model, [audio[i] for i in keep], 1, method,
                              beam_size=beam_size, max_len=max_len)
        for i, text in zip(keep, texts, strict=True):
            if isinstance(text, Exception):
                continue
            captions.append(text[0] if text else "")
            labels.append([source.class_names[j] for j in records[i]["labels"]])
            ids.append(records[i]["id"])
    rate = class_mention_rate(captions, labels)
    examples = [{"id": i, "labels": lab, "caption": c}
                for i, lab, c in list(zip(ids, labels, captions, strict=True))[:5]]
    return {"clips": len(captions), "class_mention_rate": rate, "examples": examples}


def add_arguments(parser: Any) -> None:
    """Adds the options of `curate caption` (besides the shared audio/decoding ones).

    Args:
      parser: the command's argparse.ArgumentParser.
    """
    parser.add_argument("input", help="manifest (.jsonl/.csv) or folder of audio")
    parser.add_argument("output", help="manifest JSONL to write; continued when it exists")
    parser.add_argument("--bundle", required=True, help="stage-2 inference bundle")
    parser.add_argument("--num-captions", type=int, default=3, help="new captions per clip (K)")
    parser.add_argument("--overwrite", action="store_true", help="start the output afresh")


def command(args: Any, model: Any, progress: Progress | None) -> int:
    """Runs `curate caption` and prints its counts as JSON.

    Args:
      args: parsed options.
      model: the loaded bundle.
      progress: called as progress(label, done, total).

    Returns:
      The exit status (0).
    """
    extensions = [e.strip().lstrip(".") for e in args.extensions.split(",") if e.strip()]
    counts = run_caption(model, args.input, args.output, num_captions=args.num_captions,
                         method=args.method, beam_size=args.beam_size,
                         temperature=args.temperature, max_len=args.max_len,
                         batch_size=args.batch_size, seed=args.seed, overwrite=args.overwrite,
                         workers=args.workers, extensions=extensions, progress=progress)
    print(json.dumps(counts))
    return 0

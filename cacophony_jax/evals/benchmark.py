"""Dataset evaluation of an inference bundle, next to the paper's published numbers.

    python -m cacophony_jax.cli eval --bundle bundles/cacophony \
        --audiocaps data/audiocaps --clotho data/clotho --esc50 data/ESC-50 --out results/

Tasks, with the public layouts read by `cacophony_jax.data.layouts`:

* retrieval (AudioCaps "test", Clotho "evaluation"): text->audio and audio->text
  R@1/5/10 and mAP@10 (`evals.retrieval`); every caption of a clip is a query and
  an audio query is a hit when any of its captions is retrieved (Clotho semantics).
* zero-shot classification (ESC-50 and UrbanSound8K, all folds): each class is
  embedded as a prompt and each clip takes the closest class (`evals.zeroshot`);
  top-1 is the headline number. `--zeroshot-prompt release` (default) writes the
  prompts as the released evaluation code that produced the paper's numbers did
  ("This is a sound of chirping_birds"); `sentence` as the paper words it ("This is a
  sound of chirping birds.").
* any other set (e.g. the synthetic corpus's held-out split): retrieval when it has no
  class names, both tasks otherwise, and optionally the share of its clips whose
  generated caption names the clip's class (`class_mention_report`).
* linear probe (`linear_probe=True`, `--linear-probe`; any labelled set): a logistic
  regression on the frozen audio embeddings, cross-validated over the set's folds
  (`evals.probe`). It is the one task of a stage-1 (MAE) bundle, which has no text tower.

Long clips: as the released evaluation code, `eval` embeds a clip of up to 30 s in one
pass (`--window-seconds 30`) and averages 30-s windows of longer ones;
`--window-seconds 0` uses the bundle's training window (10 s for the release).
Files that fail to decode are skipped and counted (`unreadable`), so results on an
incomplete copy of a set say so; a set whose listing (`LISTINGS`) names no clip is
refused, naming that file.

The results say what was evaluated: the bundle's kind, its `source` from bundle.json
(the checkpoint path and step it was exported from, or the release file it was
converted from; None for a bundle that does not record one) and tokenizer
fingerprint, each set's origin as given (`origins`: folder or manifest, split,
synthetic-set settings) and the UTC time of the evaluation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from cacophony_jax.audio.clips import MIN_SAMPLES
from cacophony_jax.audio.files import map_records
from cacophony_jax.audio.io import SAMPLE_RATE, AudioError
from cacophony_jax.data.sources import SourceError
from cacophony_jax.evals.captioning import CaptionInputError, class_mention_rate
from cacophony_jax.evals.probe import ProbeInputError, probe_set
from cacophony_jax.evals.report import DATASETS, bundle_provenance, utc_now, write_results
from cacophony_jax.evals.retrieval import retrieval_metrics
from cacophony_jax.evals.zeroshot import prompts_for, release_prompts, zeroshot_metrics
from cacophony_jax.progress import Progress

# The file listing the evaluated clips of each readable set (`data.layouts`).
LISTINGS = {"audiocaps": "test.csv", "clotho": "clotho_captions_evaluation.csv",
            "esc50": os.path.join("meta", "esc50.csv"),
            "urbansound8k": os.path.join("metadata", "UrbanSound8K.csv")}


def open_datasets(roots: Mapping[str, str]) -> dict[str, Any]:
    """Opens the evaluated split of each named public dataset.

    Args:
      roots: set name ("audiocaps", "clotho", "esc50", "urbansound8k") -> its folder.

    Returns:
      Set name -> source.
    """
    opened = {}
    for name, root in roots.items():
        if name not in DATASETS or DATASETS[name][2] is None:
            readable = [k for k, v in DATASETS.items() if v[2] is not None]
            raise SourceError(f"no reader for evaluation set {name!r}; readable sets: "
                              f"{readable}")
        opened[name] = DATASETS[name][2](root)
        if not len(opened[name]):
            listing = os.path.join(root, LISTINGS[name])
            raise SourceError(f"{listing} lists no clips (it holds only a header); restore "
                              "it from the dataset's download")
    return opened


def _tasks(name: str, source: Any, text: bool = True, probe: bool = False) -> list[str]:
    tasks = []
    if text:  # the tasks that need a text tower
        if name in DATASETS:
            tasks = [DATASETS[name][1]]
        else:
            tasks = ["retrieval", "zeroshot"] if source.class_names else ["retrieval"]
    if probe and source.class_names:
        tasks.append("probe")
    return tasks


# The longest clip the released evaluation code embedded in one pass (Clotho's 30 s).
RELEASE_WINDOW_SECONDS = 30.0


def embed_source(model: Any, source: Any, *, batch_size: int = 32, workers: int = 4,
                 label: str = "", progress: Progress | None = None,
                 window_seconds: float | None = None) -> dict[str, Any]:
    """Embeds every decodable clip of a source, keeping its captions and labels.

    Args:
      model: an `inference.CacophonyModel`.
      source: a source (records with "audio" or "audio_path").
      batch_size: clips decoded and embedded at once.
      workers: threads decoding audio.
      label: progress label.
      progress: called as progress(label, done, total).
      window_seconds: the longest piece of a clip embedded in one pass (longer clips:
        windows averaged); None: the bundle's window.

    Returns:
      {"audio_emb" [n, P], "captions" per clip, "labels" per clip, "ids",
       "failures": ["id: why", ...] (files that exist but cannot be used) and their
       "unreadable_ids", "absent": ids
       whose audio file does not exist, "padded": clips padded to one patch}.
    """
    total, done, padded = len(source), 0, 0
    batch_padded: set[int] = set()  # a batch refused whole is retried clip by clip

    def embed(clips: list) -> Any:
        # A clip shorter than one patch (0.15 s; some public sets have them) is padded
        # with silence, so a complete copy of the set is evaluated whole.
        short = [0 < len(c) < MIN_SAMPLES for c in clips]
        batch_padded.update(id(c) for c, s in zip(clips, short, strict=True) if s)
        clips = [np.pad(c, (0, MIN_SAMPLES - len(c))) if s else c
                 for c, s in zip(clips, short, strict=True)]
        window = {} if window_seconds is None else {"window_seconds": window_seconds}
        return model.embed_audio(clips, sample_rate=SAMPLE_RATE, batch_size=batch_size,
                                 **window)

    if not total:
        raise SourceError(f"{source.name} lists no clips; nothing to evaluate")
    embeddings, captions, labels, ids, failures, unreadable, absent = [], [], [], [], [], [], []
    for records, results in map_records(embed, source, total, batch_size, workers):
        for record, result in zip(records, results, strict=True):
            path = record.get("audio_path")
            if isinstance(result, Exception) and path and not os.path.exists(path):
                absent.append(record["id"])
            elif isinstance(result, Exception):
                failures.append(f"{record['id']}: {result}")
                unreadable.append(record["id"])
            if isinstance(result, Exception):
                continue
            embeddings.append(np.asarray(result, np.float32))
            captions.append(list(record["captions"]))
            labels.append(list(record["labels"]))
            ids.append(record["id"])
        padded += len(batch_padded)
        batch_padded.clear()
        done += len(records)
        if progress:
            progress(label or f"embed {source.name}", done, total)
    if not ids:
        raise AudioError(f"none of the {total} clips of {source.name} could be decoded "
                         f"(e.g. {(failures or absent)[:1]}); check the dataset folder")
    if padded:
        logging.info("%s: %d clip(s) shorter than %d samples padded with silence",
                      source.name, padded, MIN_SAMPLES)
    return {"audio_emb": np.stack(embeddings), "captions": captions, "labels": labels,
            "ids": ids, "failures": failures, "unreadable_ids": unreadable, "absent": absent,
            "padded": padded}


def class_mention_report(model: Any, source: Any, *, limit: int | None = None,
                         method: str = "greedy", beam_size: int = 4, batch_size: int = 16,
                         max_len: int | None = None) -> dict[str, Any]:
    """Captions labelled clips and measures `evals.captioning.class_mention_rate` on them.

    Args:
      model: a loaded stage-2 bundle.
      source: a labelled source (e.g. the synthetic corpus's held-out "eval" split).
      limit: caption only the first `limit` clips (None: all).
      method: "greedy" (as training's evaluation), "beam" or "sample".
      beam_size: beams for "beam".
      batch_size: clips captioned at once.
      max_len: tokens per caption at most (None: the bundle's text length).

    Returns:
      {"clips": n, "class_mention_rate": fraction, "examples": up to 5
      {"id", "labels", "caption"} dicts}.
    """
    if getattr(model, "kind", "cacophony") != "cacophony":
        raise CaptionInputError(f"this bundle is a {model.kind!r} model, which has no "
                                f"captioning decoder; use a stage-2 (cacophony) bundle")
    count = len(source) if limit is None else min(limit, len(source))
    describe = lambda clips: model.caption(
        clips, sample_rate=SAMPLE_RATE, method=method, max_len=max_len, beam_size=beam_size)
    captions, labels, ids = [], [], []
    for records, texts in map_records(describe, source, count, batch_size):
        for record, text in zip(records, texts, strict=True):
            if not isinstance(text, Exception):  # unreadable or refused clips are skipped
                captions.append((text or "").strip())
                labels.append([source.class_names[j] for j in record["labels"]])
                ids.append(record["id"])
    rate = class_mention_rate(captions, labels)
    examples = [{"id": i, "labels": lab, "caption": c}
                for i, lab, c in list(zip(ids, labels, captions, strict=True))[:5]]
    return {"clips": len(captions), "class_mention_rate": rate, "examples": examples}


def evaluate_source(model: Any, name: str, source: Any, *, batch_size: int = 32,
                    workers: int = 4, caption_clips: int = 0, prompt: str = "release",
                    progress: Progress | None = None, window_seconds: float | None = None,
                    caption_method: str = "greedy", linear_probe: bool = False
                    ) -> dict[str, Any]:
    """Runs the tasks of one set (see the module docstring).

    Args:
      model: an `inference.CacophonyModel`.
      name: the set's name ("audiocaps", "clotho", "esc50", "urbansound8k", other).
      source: its source.
      batch_size: clips embedded at once.
      workers: threads decoding audio.
      caption_clips: for a labelled set, caption this many clips and report
        "class_mention_rate" (0: skip).
      prompt: zero-shot prompt style, "release" or "sentence" (module docstring).
      progress: called as progress(label, done, total).
      window_seconds: see `embed_source`.
      caption_method: how those captions are decoded: "greedy" (as training's
        evaluation) or "beam".
      linear_probe: also train and score `evals.probe`'s linear probe on the
        audio embeddings (a labelled set); the only task of a stage-1 bundle.

    Returns:
      {"tasks", "metrics": {...}, "clips", "captions", "captioned" (clips with a
      caption: retrieval's audio queries; every clip is a text query's candidate),
      "unreadable", "missing",
      "bad_rows" (a manifest's skipped bad rows), "seconds"} (and "prompts", the first
      three class prompts, for zero-shot; "probe_error", why the set could not be
      probed).
    """
    start = time.monotonic()
    tasks = _tasks(name, source, getattr(model, "kind", "cacophony") == "cacophony",
                   linear_probe)
    embedded = embed_source(model, source, batch_size=batch_size, workers=workers,
                            label=f"{name}: audio", progress=progress,
                            window_seconds=window_seconds)
    if embedded["failures"]:
        logging.warning("%s: skipped %d unreadable clip(s), e.g. %s", name,
                        len(embedded["failures"]), embedded["failures"][:3])
    if embedded["absent"]:
        logging.warning("%s: skipped %d clip(s) whose audio file does not exist, e.g. %s",
                        name, len(embedded["absent"]), embedded["absent"][:3])
    bad_rows = int(getattr(source, "num_skipped", 0))  # a manifest's skipped bad rows
    if bad_rows:
        logging.warning("%s: %d bad row(s) of the set were skipped (see the warning when it "
                        "was read); its results are of an incomplete copy", name, bad_rows)
    repeated = len(embedded["ids"]) - len(set(embedded["ids"]))
    if repeated:
        logging.warning("%s: %d clip(s) repeat an id listed earlier; a clip listed twice "
                        "caps text->audio R@1 (its captions match both): list each once",
                        name, repeated)
    missing_ids = [*getattr(source, "missing_ids", ()), *embedded["absent"]]
    metrics: dict[str, Any] = {}
    num_captions = sum(len(c) for c in embedded["captions"])
    if "retrieval" in tasks:
        texts = [t for caps in embedded["captions"] for t in caps]
        if not texts and name not in DATASETS and "zeroshot" in tasks:
            logging.warning("%s has no captions: zero-shot classification only, no "
                            "retrieval", name)
            tasks = [t for t in tasks if t != "retrieval"]
        elif not texts:
            raise SourceError(f"{name} has no captions, so retrieval cannot run"
                              + ("" if name in DATASETS else " (nor labels for zero-shot "
                                 "classification): give its rows \"caption\" or \"label\""))
    if "retrieval" in tasks:
        mapping = np.repeat(np.arange(len(embedded["captions"])),
                            [len(c) for c in embedded["captions"]])
        text_emb = np.asarray(model.embed_text(texts), np.float32)
        if progress:
            progress(f"{name}: captions", len(texts), len(texts))
        metrics.update(retrieval_metrics(embedded["audio_emb"], text_emb, mapping))
    prompts: list[str] = []
    if "zeroshot" in tasks:
        prompts = (release_prompts(source.class_names, name) if prompt == "release"
                   else prompts_for(source.class_names))
        class_emb = np.asarray(model.embed_text(prompts), np.float32)
        metrics.update(zeroshot_metrics(embedded["audio_emb"], class_emb, embedded["labels"]))
    probe_error = ""
    if "probe" in tasks:
        try:
            metrics.update(probe_set(name, source, embedded))
        except ProbeInputError as e:  # e.g. a small own set: the other tasks still count
            probe_error, tasks = str(e), [t for t in tasks if t != "probe"]
    if caption_clips and source.class_names:
        report = class_mention_report(model, source, limit=caption_clips, batch_size=batch_size,
                                      method=caption_method)
        metrics.update(class_mention_rate=100.0 * report["class_mention_rate"],
                       captioned_clips=report["clips"],  # readable ones of the first N
                       caption_examples=report["examples"])
    return {"tasks": tasks, "metrics": metrics, "clips": len(embedded["ids"]),
            "captions": num_captions, "captioned": sum(1 for c in embedded["captions"] if c),
            "unreadable": len(embedded["failures"]), "padded": embedded["padded"],
            "unreadable_ids": embedded["unreadable_ids"],
            "missing": int(getattr(source, "num_missing", 0)) + len(embedded["absent"]),
            "missing_ids": missing_ids, "bad_rows": bad_rows,
            **({"folds": list(source.folds)} if getattr(source, "folds", None) else {}),
            **({"prompts": prompts[:3]} if prompts else {}),
            **({"probe_error": probe_error} if probe_error else {}),
            "seconds": round(time.monotonic() - start, 2)}


def evaluate_bundle(model: Any, sets: Mapping[str, Any], *, out_dir: str | None = None,
                    batch_size: int = 32, workers: int = 4, caption_clips: int = 0,
                    bundle: str = "", prompt: str = "release",
                    progress: Progress | None = None, window_seconds: float | None = None,
                    caption_method: str = "greedy", linear_probe: bool = False,
                    origins: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Evaluates a bundle on several sets and writes results.json / results.md.

    Args:
      model: an `inference.CacophonyModel`; a stage-1 ("mae") bundle has no text
        tower, so only `linear_probe` can run on it.
      sets: set name -> source (see `open_datasets`).
      out_dir: folder for results.json and results.md (None: write nothing).
      batch_size: clips embedded at once.
      workers: threads decoding audio.
      caption_clips: see `evaluate_source`.
      bundle: the bundle's path, recorded in the results.
      prompt: zero-shot prompt style (see `evaluate_source`).
      progress: called as progress(label, done, total).
      window_seconds: see `embed_source`.
      caption_method: see `evaluate_source`.
      linear_probe: see `evaluate_source`.
      origins: set name -> where it came from, recorded as the set's "origin" (e.g.
        {"option": "--clotho", "path": folder, "split": "evaluation"}); None for a set
        not named here.

    Returns:
      {"bundle": path, "zeroshot_prompt": style, "window_seconds": the window used,
       "caption_method", "bundle_kind", "bundle_source" (bundle.json's "source", or
       None), "tokenizer_fingerprint" (None without a tokenizer), "evaluated_at" (UTC,
       ISO 8601), "linear_probe", "skipped": [what was not evaluated, and why],
       "sets": {name: evaluate_source(...) and "origin"}} (a set with no task for
       this bundle is left out and named in "skipped").
    """
    kind = getattr(model, "kind", "cacophony")
    if kind != "cacophony" and not linear_probe:
        raise ValueError(f"bundle {bundle or ''} is a {kind!r} model without a text tower, "
                         "so it has no zero-shot or retrieval; evaluate a stage-2 "
                         "(cacophony) bundle, or pass --linear-probe")
    if kind != "cacophony" and caption_clips:
        raise ValueError(f"--caption-clips: bundle {bundle or ''} is a {kind!r} model without "
                         "a captioning decoder; drop --caption-clips")
    if not sets:
        raise ValueError("no evaluation set given; name at least one dataset folder")
    if batch_size < 1 or workers < 1:
        raise ValueError(f"--batch-size and --workers must be positive, got {batch_size} and "
                         f"{workers}")
    from cacophony_jax.evals.zeroshot import PROMPT_STYLES

    if prompt not in PROMPT_STYLES:
        raise ValueError(f"--zeroshot-prompt {prompt!r}: use one of {list(PROMPT_STYLES)}")
    window = window_seconds or float(getattr(model, "window_seconds", 0.0))
    results: dict[str, Any] = {"bundle": bundle, "zeroshot_prompt": prompt,
                               "window_seconds": window, "caption_method": caption_method,
                               **bundle_provenance(model), "evaluated_at": utc_now(),
                               "linear_probe": linear_probe, "skipped": [], "sets": {}}
    if kind != "cacophony":
        results["skipped"].append(f"zero-shot classification and retrieval: a {kind!r} "
                                  "bundle has no text tower")
    for name, source in sets.items():
        if linear_probe and not source.class_names:
            only = "" if kind == "cacophony" else f", the {kind} bundle's only task"
            results["skipped"].append(f"the linear probe on {name}{only}: it has no class labels")
        if not _tasks(name, source, kind == "cacophony", linear_probe):
            continue
        logging.info("evaluating %s: %d clips", name, len(source))
        result = evaluate_source(model, name, source, batch_size=batch_size, workers=workers,
                                 caption_clips=caption_clips, prompt=prompt,
                                 progress=progress, window_seconds=window_seconds,
                                 caption_method=caption_method, linear_probe=linear_probe)
        if result.get("probe_error"):
            results["skipped"].append(f"the linear probe on {name}: {result['probe_error']}")
        origin = (origins or {}).get(name)
        results["sets"][name] = {**result, "origin": dict(origin) if origin else None}
        shown = {k: round(v, 2) for k, v in result["metrics"].items() if isinstance(v, float)}
        logging.info("%s (%d clips, %.0f s): %s", name, result["clips"], result["seconds"], shown)
    if not results["sets"]:
        raise ValueError(f"none of the sets given has class labels for the linear probe, the "
                         f"only task of a {kind!r} bundle: add --esc50, --urbansound8k or a "
                         "labelled --manifest")
    if kind != "cacophony" and not any("probe_top1" in r["metrics"]
                                       for r in results["sets"].values()):
        why = "; ".join(f"{n}: {r['probe_error']}" for n, r in results["sets"].items())
        raise ValueError(f"no set could be probed, and the linear probe is the only task of a "
                         f"{kind!r} bundle ({why})")
    for note in results["skipped"]:
        logging.warning("skipped %s", note)
    if out_dir:
        write_results(results, out_dir)
    return results

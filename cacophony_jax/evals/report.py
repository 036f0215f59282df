"""The published evaluation sets, the paper's numbers on them, and the results files.

`evals.benchmark` evaluates a bundle; this module names the sets it can read and
writes what it found next to the paper's numbers (results.json, results.md).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from cacophony_jax import atomic_write
from cacophony_jax.data import layouts
from cacophony_jax.evals.retrieval import MAP_K, RECALL_KS

# Published results of "Cacophony: An Improved Contrastive Audio-Text Model" (Zhu,
# Darefsky, Duan; IEEE/ACM TASLP 32, 2024; arXiv 2402.06986): retrieval R@k in percent
# (the AudioCaps row is the released weights'; LAION-CLAP is the paper's peer row) and
# zero-shot top-1 accuracy in percent. TUT 2017 and VGGSound have no reader here.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "audiocaps": {
        # The numbers given for the released weights.
        "Cacophony (released weights)": {"t2a_R@1": 41.0, "t2a_R@5": 75.3, "t2a_R@10": 86.4,
                                         "a2t_R@1": 55.3, "a2t_R@5": 83.6,
                                         "a2t_R@10": 92.4},
        "LAION-CLAP (paper)": {"t2a_R@1": 36.1, "t2a_R@5": 71.8, "t2a_R@10": 83.9,
                               "a2t_R@1": 46.8, "a2t_R@5": 82.9, "a2t_R@10": 90.7},
    },
    "clotho": {
        "Cacophony (paper)": {"t2a_R@1": 20.0, "t2a_R@5": 46.3, "t2a_R@10": 58.2,
                              "a2t_R@1": 26.1, "a2t_R@5": 53.3, "a2t_R@10": 66.1},
    },
    "esc50": {"Cacophony (paper)": {"top1": 93.4}},
    "urbansound8k": {"Cacophony (paper)": {"top1": 77.1}},
    "tut2017": {"Cacophony (paper)": {"top1": 48.6}},
    "vggsound": {"Cacophony (paper)": {"top1": 27.1}},
}

# The split evaluated of the sets that have several (the others are read whole).
SPLITS = {"audiocaps": "test", "clotho": "evaluation"}

# Set name -> (display name, task, opener of the evaluated split from the dataset root).
DATASETS: dict[str, tuple[str, str, Callable[[str], Any] | None]] = {
    "audiocaps": ("AudioCaps test", "retrieval",
                  lambda root: layouts.audiocaps_source(root, SPLITS["audiocaps"])),
    "clotho": ("Clotho evaluation", "retrieval",
               lambda root: layouts.clotho_source(root, SPLITS["clotho"])),
    "esc50": ("ESC-50 (5 folds)", "zeroshot", layouts.esc50_source),
    "urbansound8k": ("UrbanSound8K (10 folds)", "zeroshot", layouts.urbansound8k_source),
    "tut2017": ("TUT Acoustic Scenes 2017", "zeroshot", None),
    "vggsound": ("VGGSound test", "zeroshot", None),
}


# Clips in the published sets (an evaluated copy with fewer is not comparable).
# AudioCaps: the 975 clips its test.csv lists; copies fetched from YouTube today lack
# some, so a copy is usually marked incomplete (the paper does not say how many it had).
PUBLISHED_CLIPS = {"audiocaps": 975, "clotho": 1045, "esc50": 2000, "urbansound8k": 8732}


def _cell(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.1f}"


_RETRIEVAL_KEYS = ([f"t2a_R@{k}" for k in RECALL_KS] + [f"t2a_mAP@{MAP_K}"]
                   + [f"a2t_R@{k}" for k in RECALL_KS] + [f"a2t_mAP@{MAP_K}"])


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results as Markdown: one table per task, this model next to the paper.

    Args:
      results: what `evaluate_bundle` returns.

    Returns:
      Markdown text.
    """
    sets = results["sets"]
    lines = ["# Evaluation results", "", _bundle_line(results)]
    if results.get("window_seconds"):
        lines.append(f"Clips of up to {results['window_seconds']:g} s are embedded in one "
                     "pass; longer ones as the mean of windows of that length.")
    lines.append("")
    if results.get("evaluated_at"):
        lines += [f"Evaluated at {results['evaluated_at']}.", ""]
    origins = [f"- {name}: {_origin(r['origin'])}" for name, r in sets.items()
               if r.get("origin")]
    if origins:
        lines += ["Sets:", "", *origins, ""]
    retrieval = [n for n, r in sets.items() if "retrieval" in r["tasks"]]
    if retrieval:
        titles = [k.replace("t2a_", "T→A ").replace("a2t_", "A→T ") for k in _RETRIEVAL_KEYS]
        lines += ["## Text-audio retrieval (%)", "",
                  "| set | model | clips | captions | " + " | ".join(titles) + " |",
                  "|---|---|---|---|" + "---|" * len(titles)]
        for name in retrieval:
            display = _display(name, sets)
            ours = sets[name]
            rows = [("this model", ours["metrics"]), *PUBLISHED.get(name, {}).items()]
            for model, values in rows:
                cells = [_cell(values.get(k)) for k in _RETRIEVAL_KEYS]
                clips = str(ours["clips"])
                if ours.get("captioned", ours["clips"]) < ours["clips"]:
                    clips += f" ({ours['captioned']} with captions)"
                counts = f"{clips} | {ours['captions']}" if values is ours["metrics"] \
                    else "— | —"
                lines.append(f"| {display} | {model} | {counts} | " + " | ".join(cells) + " |")
        lines.append("")
    zeroshot = [n for n, r in sets.items() if "zeroshot" in r["tasks"]]
    if zeroshot:
        style = results.get("zeroshot_prompt", "sentence")
        template = ("\"This is a sound of {label}\" (labels spelt as the released evaluation "
                    "code read them)" if style == "release"
                    else "\"This is a sound of {label}.\"")
        lines += [f"## Zero-shot classification (%), prompt {template}", "",
                  "| set | top-1 this model | top-1 Cacophony (paper) | top-5 | mAP | clips |",
                  "|---|---|---|---|---|---|"]
        reference = [n for n, d in DATASETS.items() if d[1] == "zeroshot" and n not in zeroshot]
        for name in zeroshot + reference:
            display = _display(name, sets)
            paper = PUBLISHED.get(name, {}).get("Cacophony (paper)", {}).get("top1")
            if name in sets:
                m = sets[name]["metrics"]
                lines.append(f"| {display} | {_cell(m['top1'])} | {_cell(paper)} | "
                             f"{_cell(m['top5'])} | {_cell(m['mAP'])} | "
                             f"{m.get('num_examples', sets[name]['clips'])} |")
            else:
                why = "not evaluated" if DATASETS[name][2] else "no reader"
                lines.append(f"| {display} | — ({why}) | {_cell(paper)} | — | — | — |")
        lines.append("")
    mentions = {n: r["metrics"] for n, r in sets.items()
                if "class_mention_rate" in r["metrics"]}
    if mentions:
        how = results.get("caption_method", "greedy")
        lines += [f"## Captions naming the clip's class (%, {how} decoding)", "",
                  "| set | rate | clips |",
                  "|---|---|---|"]
        lines += [f"| {_display(n, sets)} | {_cell(m['class_mention_rate'])} | "
                  f"{m.get('captioned_clips', '—')} |" for n, m in mentions.items()] + [""]
    probed = {n: r["metrics"] for n, r in sets.items() if "probe_top1" in r["metrics"]}
    if probed:
        lines += ["## Linear probe of the frozen audio embeddings (top-1 %)", "",
                  "Logistic regression (L2, standardised features) trained on the other "
                  "folds and scored on each fold; not the HEAR protocol.", "",
                  "| set | top-1 (mean of folds) | per fold | clips | folds |",
                  "|---|---|---|---|---|"]
        for n, m in probed.items():
            folds = ", ".join(f"{k}: {_cell(v)}" for k, v in m["probe_fold_top1"].items())
            lines.append(f"| {_display(n, sets)} | {_cell(m['probe_top1'])} | {folds} | "
                         f"{m['probe_examples']} | {m['probe_fold_kind']} |")
        lines.append("")
    notes = [f"- skipped {why}" for why in results.get("skipped", ())]
    notes += [f"- {n}: {r['unreadable']} unreadable and {r['missing']} missing clip(s) skipped "
              "(results.json lists them: missing_ids, unreadable_ids)"
              for n, r in sets.items() if r["unreadable"] or r["missing"]]
    notes += [f"- {n}: {r['metrics']['probe_skipped']} clip(s) with several or no class labels "
              "left out of the linear probe" for n, r in sets.items()
              if r["metrics"].get("probe_skipped")]
    notes += [f"- {n}: {r['bad_rows']} bad manifest row(s) skipped (the warning when it was "
              "read names them)" for n, r in sets.items() if r.get("bad_rows")]
    notes += [f"- {n}: {r['padded']} clip(s) shorter than 0.15 s padded with silence"
              for n, r in sets.items() if r.get("padded")]
    for n, r in sets.items():
        listed, published = _listed(r), PUBLISHED_CLIPS.get(n)
        if published and listed < published:
            folds = f" (folds {r['folds']})" if r.get("folds") else ""
            notes.append(f"- {n}: the copy lists {listed} of the published set's {published} "
                         f"clips{folds}")
    if notes:
        lines += ["Notes on the sets:", "", *notes, ""]
    return "\n".join(lines)


def _bundle_line(results: Mapping[str, Any]) -> str:
    """The bundle, its kind, where its parameters came from and its tokenizer."""
    source = results.get("bundle_source")
    if not isinstance(source, Mapping):
        made = "source not recorded"
    elif source.get("type") == "checkpoint":
        made = f"exported from checkpoint `{source.get('path')}` step {source.get('step')}"
    elif source.get("type") == "official":
        made = f"converted from the release file `{source.get('file')}`"
    else:
        made = f"source {json.dumps(source, sort_keys=True)}"
    details = [results.get("bundle_kind") or "kind not recorded", made]
    if results.get("tokenizer_fingerprint"):
        details.append(f"tokenizer {results['tokenizer_fingerprint']}")
    return f"Bundle: `{results.get('bundle', '')}` ({'; '.join(details)})"


def _origin(origin: Mapping[str, Any]) -> str:
    given = " ".join(str(origin[k]) for k in ("option", "path", "clips") if k in origin)
    rest = [f"{k} {origin[k]}" for k in origin if k not in ("option", "path", "clips")]
    return f"`{given}`" + (f" ({', '.join(rest)})" if rest else "")


def _listed(result: Mapping[str, Any]) -> int:
    return result["clips"] + result["unreadable"] + result["missing"]


def _display(name: str, sets: Mapping[str, Any]) -> str:
    # A copy missing clips, or trimmed, is not the published set: its numbers are not
    # comparable with the paper's.
    display = DATASETS.get(name, (name,))[0]
    result = sets.get(name)
    folds = (result or {}).get("folds")
    every = {"esc50": 5, "urbansound8k": 10}.get(name)
    if folds and every and len(folds) != every:  # "ESC-50 (5 folds)" -> "(folds 1, 2, 3)"
        display = display.split(" (")[0] + f" (folds {', '.join(map(str, folds))})"
    if result and (result["unreadable"] or result["missing"] or result.get("bad_rows")
                   or _listed(result) < PUBLISHED_CLIPS.get(name, 0)):
        display += " (incomplete copy, see below)"
    return display


def bundle_provenance(model: Any) -> dict[str, Any]:
    """What a loaded bundle says of itself: its kind, source and tokenizer fingerprint.

    Args:
      model: an `inference.CacophonyModel` (its `meta` is the bundle's bundle.json).

    Returns:
      {"bundle_kind", "bundle_source", "tokenizer_fingerprint"}; None for what the
      bundle does not record (bundles written before sources were kept have none).
    """
    meta = getattr(model, "meta", None) or {}
    return {"bundle_kind": meta.get("kind", getattr(model, "kind", None)),
            "bundle_source": meta.get("source"),
            "tokenizer_fingerprint": meta.get("tokenizer_fingerprint") or None}


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_results(results: Mapping[str, Any], out_dir: str) -> None:
    """Writes results.json and results.md into `out_dir` (each replaced atomically).

    Args:
      results: what `evaluate_bundle` returns.
      out_dir: the folder (created if needed).
    """
    os.makedirs(out_dir, exist_ok=True)
    atomic_write.write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
    atomic_write.write_text(os.path.join(out_dir, "results.md"), results_markdown(results))

"""Zero-shot classification metrics: clips scored against embedded class prompts.

Each class name becomes a prompt, "This is a sound of {name}." (the paper's wording,
`PROMPT`); its text embedding is the class embedding. The released evaluation code
that produced the published ESC-50 and UrbanSound8K numbers wrote the prompt without
the full stop and ESC-50's labels as its metadata spells them ("chirping_birds"):
`release_prompts` gives those, for comparing with the paper's table. A clip's class
scores are cosine similarities, so ranking them needs no logit scale. Ties are broken
like a stable descending sort: among equal scores the lower class (or clip) index
comes first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cacophony_jax.evals.retrieval import EmbeddingError, l2_normalize

PROMPT = "This is a sound of {}."
RELEASE_PROMPT = "This is a sound of {}"  # the released evaluation code's: no full stop
# How the released evaluation code spelled each set's class names: ESC-50's metadata
# category as it is ("chirping_birds"), UrbanSound8K's with spaces for underscores.
RELEASE_SPELLING = {"esc50": lambda name: name.replace(" ", "_"),
                    "urbansound8k": lambda name: name.replace("_", " ")}
PROMPT_STYLES = ("release", "sentence")
TOP_KS: tuple[int, ...] = (1, 5)


class LabelError(ValueError):
    """Class labels that do not fit the class list."""


def prompts_for(class_names: Sequence[str]) -> list[str]:
    """Text prompts for a list of class names, in the same order.

    Underscores become spaces ("chirping_birds" -> "This is a sound of chirping
    birds.") because dataset metadata (ESC-50, UrbanSound8K) spells names that way and
    the text tower should see ordinary words.

    Args:
      class_names: one name per class index.

    Returns:
      One prompt per class.
    """
    if isinstance(class_names, str):
        raise LabelError("class_names must be a list of names, not one string")
    return [PROMPT.format(str(name).replace("_", " ").strip()) for name in class_names]


def release_prompts(class_names: Sequence[str], dataset: str) -> list[str]:
    """The prompts of the released evaluation code for `dataset` (see the module doc).

    Args:
      class_names: one name per class index (as the layouts give them: spaces).
      dataset: "esc50", "urbansound8k" or another set (names with spaces).

    Returns:
      One prompt per class.
    """
    spell = RELEASE_SPELLING.get(dataset, lambda name: name.replace("_", " "))
    return [RELEASE_PROMPT.format(spell(str(name).strip())) for name in class_names]


def _label_sets(labels: Sequence[Sequence[int] | int], num_classes: int) -> list[set[int]]:
    """Normalises labels: an int is a one-label set; negative entries mean "no label"."""
    sets = []
    for i, entry in enumerate(labels):
        items = [entry] if np.ndim(entry) == 0 else list(np.asarray(entry).ravel())
        chosen = set()
        for item in items:
            if not float(item).is_integer():
                raise LabelError(f"labels[{i}] holds {item!r}; labels are integer class indices")
            if int(item) >= num_classes:
                raise LabelError(
                    f"labels[{i}] holds class {int(item)} but there are only {num_classes} "
                    "class embeddings; the label list and class list disagree"
                )
            if item >= 0:
                chosen.add(int(item))
        sets.append(chosen)
    return sets


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Non-interpolated average precision of one ranking.

    AP = mean over positive items of (positives ranked at or above it) / (its rank),
    with items ordered by descending score and ties by index.

    Args:
      scores: [N] scores.
      positive: [N] bool, True for the relevant items (at least one).

    Returns:
      AP in [0, 1].
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.asarray(positive, dtype=bool)[order]
    ranks = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, ranks.size + 1) / ranks))


def zeroshot_metrics(
    audio_emb: np.ndarray,
    class_emb: np.ndarray,
    labels: Sequence[Sequence[int] | int],
) -> dict[str, float]:
    """Top-1 / top-5 accuracy and class-mean average precision, in percent.

    A clip counts as correct at k when any of its labels is among its k best-scoring
    classes (with a single label per clip this is plain accuracy; with fewer than k
    classes every labelled clip is correct at k). "mAP" is always computed: for each
    class with at least one positive clip, the AP of ranking all labelled clips by that
    class's score; then the mean over those classes. It is the usual headline number for
    multi-label sets and a secondary one for single-label sets.

    Args:
      audio_emb: [N, D] clip embeddings.
      class_emb: [C, D] embeddings of `prompts_for(class_names)`.
      labels: per clip, the list of its class indices, or one int; negative entries
        (e.g. -1 padding or "unlabelled") are ignored, and clips left with no label are
        skipped.

    Returns:
      {"top1", "top5", "mAP"} -> float in [0, 100], and "num_examples" -> number of
      labelled clips that were scored.
    """
    audio = l2_normalize(audio_emb, "audio_emb")
    classes = l2_normalize(class_emb, "class_emb")
    if audio.shape[1] != classes.shape[1]:
        raise EmbeddingError(
            f"audio_emb has width {audio.shape[1]} but class_emb has {classes.shape[1]}; "
            "both must come from the same joint embedding space"
        )
    if len(labels) != audio.shape[0]:
        raise LabelError(
            f"got {len(labels)} label entries for {audio.shape[0]} clips; need one per clip"
        )
    num_classes = classes.shape[0]
    if num_classes == 0:
        raise EmbeddingError("class_emb is empty; zero-shot needs at least one class")
    sets = _label_sets(labels, num_classes)
    keep = np.array([bool(s) for s in sets], dtype=bool)
    if not keep.any():
        raise LabelError("no clip has a label; nothing to score")

    scores = audio[keep] @ classes.T
    truth = np.zeros(scores.shape, dtype=bool)
    for row, label_set in enumerate(s for s in sets if s):
        truth[row, sorted(label_set)] = True

    order = np.argsort(-scores, axis=1, kind="stable")
    hit_at = np.take_along_axis(truth, order, axis=1)
    metrics: dict[str, float] = {}
    for k in TOP_KS:
        metrics[f"top{k}"] = 100.0 * float(np.mean(hit_at[:, :k].any(axis=1)))
    per_class = [
        average_precision(scores[:, c], truth[:, c])
        for c in range(num_classes)
        if truth[:, c].any()
    ]
    metrics["mAP"] = 100.0 * float(np.mean(per_class))
    metrics["num_examples"] = int(scores.shape[0])
    return metrics

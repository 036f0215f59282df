"""Text-to-audio and audio-to-text retrieval metrics (Clotho / AudioCaps protocol).

An evaluation set has `Na` clips and `Nt` captions, several captions per clip; each
caption belongs to exactly one clip (`text_to_audio[j]` is the clip of caption `j`).

* Text -> audio: each caption is a query over the clips; exactly one clip is correct.
* Audio -> text: each clip is a query over the captions; all of its captions are
  relevant, and the query is a hit at k when ANY of them is among the top k.

Similarities are cosine similarities (embeddings are L2-normalised here). Ranks are
1-based and ties are broken like a stable descending sort: among equal scores the item
with the lower index comes first, whether or not it is the correct one. Ranks are found
by counting, one block of queries at a time, so memory stays at `block_size x N`; each
caption of an audio query is ranked once, so audio -> text costs `Nt x Nt` however
unevenly the captions are spread over the clips.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import logging

RECALL_KS: tuple[int, ...] = (1, 5, 10)
MAP_K = 10


class EmbeddingError(ValueError):
    """Embeddings (or the caption-to-clip map) that cannot be scored as given."""


def l2_normalize(emb: np.ndarray, name: str) -> np.ndarray:
    """Returns `emb` [N, D] as float64 rows of unit L2 norm.

    Args:
      emb: [N, D] embeddings.
      name: how the array is called in error messages.

    Returns:
      [N, D] float64 array of unit-norm rows.

    Raises:
      EmbeddingError: on a wrong rank, non-finite values or an all-zero row.
    """
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2:
        raise EmbeddingError(f"{name} must be [N, D]; got shape {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise EmbeddingError(f"{name} has NaN or inf values; check the model outputs")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if np.any(norms == 0):
        row = int(np.argmax(norms[:, 0] == 0))
        raise EmbeddingError(
            f"{name} row {row} is all zeros, so it has no direction; drop it or fix the model"
        )
    return emb / norms


def rank_of_correct(sim: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """1-based rank of one correct item per query under a stable descending order.

    Rank = 1 + #(items scoring higher) + #(items scoring equal with a lower index),
    which is the position `np.argsort(-sim, kind="stable")` would give, without sorting.

    Args:
      sim: [Q, N] similarities of Q queries against N items.
      correct: [Q] int index of the correct item of each query.

    Returns:
      [Q] int64 ranks in 1..N.
    """
    sim = np.asarray(sim)
    correct = np.asarray(correct, dtype=np.int64)
    rows = np.arange(sim.shape[0])
    target = sim[rows, correct][:, None]
    before = np.arange(sim.shape[1])[None, :] < correct[:, None]
    ahead = (sim > target) | ((sim == target) & before)
    return 1 + ahead.sum(axis=1)


def ranks_of_relevant(sim: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based ranks of several relevant items per query (see `rank_of_correct`).

    Args:
      sim: [Q, N] similarities.
      relevant: [Q, R] int item indices, padded with -1 where a query has fewer than R.

    Returns:
      [Q, R] int64 ranks, 0 where `relevant` is padding.
    """
    relevant = np.asarray(relevant, dtype=np.int64)
    ranks = np.zeros(relevant.shape, dtype=np.int64)
    # Each real (query, item) pair is ranked once, so the cost follows the number of
    # relevant items, not the padded width (one query with many would multiply it).
    # Pairs go Q at a time, which keeps memory at the size of `sim`.
    rows, cols = np.nonzero(relevant >= 0)
    step = max(relevant.shape[0], 1)
    for s in range(0, rows.size, step):
        row, col = rows[s : s + step], cols[s : s + step]
        ranks[row, col] = rank_of_correct(sim[row], relevant[row, col])
    return ranks


def average_precision_at_k(ranks: np.ndarray, k: int = MAP_K) -> np.ndarray:
    """AP@k per query from the ranks of its relevant items.

    AP@k = sum_{i<=k} P@i * rel_i / min(k, number of relevant items), where P@i is the
    precision of the top i and rel_i marks a relevant item at rank i. With one relevant
    item at rank r this is 1/r if r <= k else 0.

    Args:
      ranks: [Q, R] 1-based ranks of the relevant items, 0 for padding.
      k: cut-off.

    Returns:
      [Q] float64 AP@k in [0, 1] (0 for a query with no relevant item).
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    num_relevant = (ranks > 0).sum(axis=1)
    # Padding (rank 0) sorts last once mapped to a rank no real item can have.
    ordered = np.sort(np.where(ranks > 0, ranks, np.iinfo(np.int64).max), axis=1)
    hits_so_far = np.arange(1, ranks.shape[1] + 1)[None, :]
    counted = ordered <= k
    precision = np.where(counted, hits_so_far / np.where(counted, ordered, 1), 0.0)
    denom = np.maximum(np.minimum(k, num_relevant), 1)
    return precision.sum(axis=1) / denom


def _check_inputs(
    audio: np.ndarray, text: np.ndarray, text_to_audio: Sequence[int] | np.ndarray
) -> np.ndarray:
    if audio.shape[0] == 0 or text.shape[0] == 0:
        raise EmbeddingError("retrieval needs at least one clip and one caption")
    if audio.shape[1] != text.shape[1]:
        raise EmbeddingError(
            f"audio_emb has width {audio.shape[1]} but text_emb has {text.shape[1]}; "
            "both must come from the same joint embedding space"
        )
    mapping = np.asarray(text_to_audio)
    if mapping.shape != (text.shape[0],) or not np.issubdtype(mapping.dtype, np.integer):
        raise EmbeddingError(
            f"text_to_audio must be {text.shape[0]} integers (one clip index per caption); "
            f"got shape {mapping.shape} dtype {mapping.dtype}"
        )
    if mapping.size and (mapping.min() < 0 or mapping.max() >= audio.shape[0]):
        raise EmbeddingError(
            f"text_to_audio has clip indices outside [0, {audio.shape[0]}); "
            "it must index rows of audio_emb"
        )
    return mapping.astype(np.int64)


def _captions_per_clip(mapping: np.ndarray, num_audio: int) -> np.ndarray:
    """[Na, R] caption indices of each clip, padded with -1 (R = most captions of a clip)."""
    counts = np.bincount(mapping, minlength=num_audio)
    table = np.full((num_audio, max(int(counts.max()), 1)), -1, dtype=np.int64)
    order = np.argsort(mapping, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(mapping.size) - starts[mapping[order]]
    table[mapping[order], slot] = order
    return table


def retrieval_metrics(
    audio_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_audio: Sequence[int] | np.ndarray,
    block_size: int = 256,
) -> dict[str, float]:
    """Recall@{1,5,10} and mAP@10 in both directions, in percent.

    Text -> audio: R@k is the share of captions whose clip ranks <= k; mAP@10 is the
    mean of 1/rank (0 beyond rank 10). Audio -> text: R@k is the share of clips with
    any caption ranked <= k; mAP@10 is the mean AP@10 of `average_precision_at_k`
    (which reduces to 1/rank of the only caption when a clip has one). Clips without
    any caption are not audio queries (they still compete as text -> audio answers).

    Args:
      audio_emb: [Na, D] clip embeddings.
      text_emb: [Nt, D] caption embeddings.
      text_to_audio: [Nt] index of each caption's clip in `audio_emb`.
      block_size: queries scored at once; bounds memory at block_size x max(Na, Nt).

    Returns:
      {"t2a_R@1", "t2a_R@5", "t2a_R@10", "t2a_mAP@10",
       "a2t_R@1", "a2t_R@5", "a2t_R@10", "a2t_mAP@10"} -> float in [0, 100].
    """
    audio = l2_normalize(audio_emb, "audio_emb")
    text = l2_normalize(text_emb, "text_emb")
    mapping = _check_inputs(audio, text, text_to_audio)
    if block_size < 1:
        raise EmbeddingError(f"block_size must be positive; got {block_size}")

    t2a_ranks = np.concatenate(
        [
            rank_of_correct(text[s : s + block_size] @ audio.T, mapping[s : s + block_size])
            for s in range(0, text.shape[0], block_size)
        ]
    )

    captions = _captions_per_clip(mapping, audio.shape[0])
    captions = captions[captions[:, 0] >= 0]
    queries = mapping[captions[:, 0]]
    a2t_ranks = np.concatenate(
        [
            ranks_of_relevant(
                audio[queries[s : s + block_size]] @ text.T, captions[s : s + block_size]
            )
            for s in range(0, queries.size, block_size)
        ]
    )
    best = np.where(a2t_ranks > 0, a2t_ranks, np.iinfo(np.int64).max).min(axis=1)

    trivial = [k for k in RECALL_KS if k >= audio.shape[0]]
    if trivial:  # every clip ranks within k: these recalls say nothing
        logging.warning("retrieval over %d clips: t2a R@%s is 100 whatever the model; "
                        "evaluate on more clips than %d", audio.shape[0],
                        "/".join(map(str, trivial)), max(trivial))
    metrics: dict[str, float] = {}
    for k in RECALL_KS:
        metrics[f"t2a_R@{k}"] = 100.0 * float(np.mean(t2a_ranks <= k))
    metrics[f"t2a_mAP@{MAP_K}"] = 100.0 * float(
        np.mean(np.where(t2a_ranks <= MAP_K, 1.0 / t2a_ranks, 0.0))
    )
    for k in RECALL_KS:
        metrics[f"a2t_R@{k}"] = 100.0 * float(np.mean(best <= k))
    metrics[f"a2t_mAP@{MAP_K}"] = 100.0 * float(np.mean(average_precision_at_k(a2t_ranks)))
    return metrics

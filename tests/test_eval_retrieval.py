"""Retrieval metrics against hand-worked rankings."""

import numpy as np
import pytest

from cacophony_jax.evals.retrieval import (
    EmbeddingError,
    average_precision_at_k,
    rank_of_correct,
    ranks_of_relevant,
    retrieval_metrics,
)


def _small_case():
    # 3 clips in 2-D (scaled on purpose: the metric must normalise them).
    audio = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    text = np.array(
        [
            [1.0, 0.2],  # -> clip 0; sims (.98, .20, -.98): rank 1
            [0.2, 1.0],  # -> clip 0; clip 1 scores higher: rank 2
            [0.0, -5.0],  # -> clip 1; sims (0, -1, 0): clips 0 and 2 tie ahead: rank 3
            [-1.0, -1.0],  # -> clip 2; rank 1
            [0.0, 1.0],  # -> clip 2; sims (0, 1, 0): clip 1, then the tie goes to clip 0: rank 3
            [0.0, -1.0],  # -> clip 0; sims (0, -1, 0): the tie goes to clip 0 itself: rank 1
        ]
    )
    mapping = np.array([0, 0, 1, 2, 2, 0])
    return audio, text, mapping


def test_small_case_by_hand():
    metrics = retrieval_metrics(*_small_case())
    # t2a ranks [1, 2, 3, 1, 3, 1].
    assert metrics["t2a_R@1"] == pytest.approx(100 * 3 / 6)
    assert metrics["t2a_R@5"] == pytest.approx(100.0)
    assert metrics["t2a_R@10"] == pytest.approx(100.0)
    assert metrics["t2a_mAP@10"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3 + 1 + 1 / 3 + 1) / 6)
    # Clip 0 (sims = x of the unit captions .98, .20, 0, -.71, 0, 0) ranks its captions
    # 0, 1, 5 at 1, 2, 5: AP = (1/1 + 2/2 + 3/5) / 3.
    # Clip 1 (sims = y: .20, .98, -1, -.71, 1, -1) ranks caption 2 at 5 (tied with
    # caption 5, which has the higher index): AP = 1/5.
    # Clip 2 (sims = -x: -.98, -.20, 0, .71, 0, 0) ranks captions 3, 4 at 1, 3:
    # AP = (1/1 + 2/3) / 2.
    assert metrics["a2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert metrics["a2t_R@5"] == pytest.approx(100.0)
    assert metrics["a2t_R@10"] == pytest.approx(100.0)
    ap = [(1 + 1 + 3 / 5) / 3, 1 / 5, (1 + 2 / 3) / 2]
    assert metrics["a2t_mAP@10"] == pytest.approx(100 * np.mean(ap))
    assert sorted(metrics) == sorted(
        f"{d}_{m}" for d in ("t2a", "a2t") for m in ("R@1", "R@5", "R@10", "mAP@10")
    )


def test_recall_cutoffs_by_hand():
    # 12 clips as one-hot axes, so a caption's similarity to clip i is text[j, i] / |text_j|.
    # Other clips score (i + 1) / 100; the correct clip's score sets its rank.
    num_clips = 12
    text = np.tile((np.arange(num_clips) + 1) / 100, (5, 1))
    text[0, 0] = 0.5  # beats everything: rank 1
    text[1, 1] = 0.095  # clips 9, 10, 11 score higher: rank 4
    text[2, 2] = 0.065  # clips 6..11 score higher: rank 7
    text[3, 3] = 0.025  # clips 2, 4..11 score higher: rank 10
    text[4, 4] = 0.005  # the lowest of all: rank 12
    metrics = retrieval_metrics(np.eye(num_clips), text, np.arange(5))
    assert metrics["t2a_R@1"] == pytest.approx(20.0)
    assert metrics["t2a_R@5"] == pytest.approx(40.0)
    assert metrics["t2a_R@10"] == pytest.approx(80.0)
    assert metrics["t2a_mAP@10"] == pytest.approx(100 * (1 + 1 / 4 + 1 / 7 + 1 / 10 + 0) / 5)


def test_one_caption_per_clip_is_symmetric():
    # With one caption per clip, audio->text is text->audio with the roles swapped.
    rng = np.random.default_rng(0)
    audio, text = rng.normal(size=(2, 15, 4))
    forward = retrieval_metrics(audio, text, np.arange(15))
    swapped = retrieval_metrics(text, audio, np.arange(15))
    for name in ("R@1", "R@5", "R@10", "mAP@10"):
        assert forward[f"a2t_{name}"] == pytest.approx(swapped[f"t2a_{name}"])
        assert forward[f"t2a_{name}"] == pytest.approx(swapped[f"a2t_{name}"])


def test_rank_matches_stable_sort_with_ties():
    rng = np.random.default_rng(1)
    sim = rng.integers(0, 3, size=(20, 9)).astype(float)  # many ties
    correct = rng.integers(0, 9, size=20)
    order = np.argsort(-sim, axis=1, kind="stable")
    expected = 1 + np.argmax(order == correct[:, None], axis=1)
    np.testing.assert_array_equal(rank_of_correct(sim, correct), expected)


def test_ranks_of_relevant_padding():
    sim = np.array([[0.1, 0.9, 0.5, 0.3]])
    np.testing.assert_array_equal(ranks_of_relevant(sim, np.array([[3, 0, -1]])), [[3, 4, 0]])


def test_average_precision_at_k():
    ranks = np.array(
        [
            [2, 5, 0],  # (1/2 + 2/5) / 2
            [12, 3, 0],  # only rank 3 counts: (1/3) / 2
            [4, 0, 0],  # one relevant item: 1/4
            [11, 0, 0],  # beyond the cut-off
        ]
    )
    expected = [(1 / 2 + 2 / 5) / 2, (1 / 3) / 2, 1 / 4, 0.0]
    np.testing.assert_allclose(average_precision_at_k(ranks), expected)
    # With more than k relevant items the denominator is k.
    many = np.arange(1, 13)[None, :]
    np.testing.assert_allclose(average_precision_at_k(many, k=10), [1.0])


def test_block_size_does_not_change_results():
    rng = np.random.default_rng(2)
    audio = rng.normal(size=(23, 8))
    text = rng.normal(size=(61, 8))
    mapping = np.concatenate([np.arange(23), rng.integers(0, 23, size=38)])
    whole = retrieval_metrics(audio, text, mapping, block_size=1000)
    blocked = retrieval_metrics(audio, text, mapping, block_size=7)
    assert whole == pytest.approx(blocked)


def test_clips_without_captions_are_not_audio_queries():
    audio = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = np.array([[1.0, 0.1], [0.1, 1.0]])
    metrics = retrieval_metrics(audio, text, [0, 1])
    # Clip 2 has no caption: it only competes as a t2a answer (and is second for both).
    assert metrics["a2t_R@1"] == pytest.approx(100.0)
    assert metrics["t2a_R@1"] == pytest.approx(100.0)
    assert metrics["t2a_mAP@10"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("audio", "text", "mapping", "match"),
    [
        (np.ones((2, 3)), np.ones((2, 4)), [0, 1], "width"),
        (np.ones((2, 3)), np.ones((2, 3)), [0, 2], "outside"),
        (np.ones((2, 3)), np.ones((2, 3)), [0], "one clip index per caption"),
        (np.zeros((2, 3)), np.ones((2, 3)), [0, 1], "all zeros"),
        (np.full((2, 3), np.nan), np.ones((2, 3)), [0, 1], "NaN"),
        (np.ones(3), np.ones((2, 3)), [0, 1], r"\[N, D\]"),
    ],
)
def test_bad_inputs_name_the_problem(audio, text, mapping, match):
    with pytest.raises(EmbeddingError, match=match):
        retrieval_metrics(audio, text, mapping)


def test_too_few_clips_for_a_recall_cutoff_is_warned(caplog):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((6, 4))
    metrics = retrieval_metrics(emb, emb[::-1], np.arange(6))
    assert metrics["t2a_R@10"] == 100.0
    assert "retrieval over 6 clips: t2a R@10 is 100 whatever the model" in caplog.text
    caplog.clear()
    retrieval_metrics(rng.standard_normal((11, 4)), rng.standard_normal((11, 4)), np.arange(11))
    assert "whatever the model" not in caplog.text


def _uneven_case(rng, num_clips=30, dims=3):
    """Clips with 0..3 captions and one with many; every similarity is exact and tied.

    Captions lie on a signed axis (scaled: the metric normalises them), so a similarity
    is one coordinate of the unit clip row, the same bits however it is computed; clip
    rows take few values, so equal scores abound.
    """
    audio = rng.integers(-2, 3, size=(num_clips, dims)).astype(float)
    audio[~audio.any(axis=1), 0] = 1.0
    counts = rng.integers(0, 4, size=num_clips)
    counts[rng.integers(num_clips)] += 25
    mapping = rng.permutation(np.repeat(np.arange(num_clips), counts))
    text = np.zeros((mapping.size, dims))
    text[np.arange(mapping.size), rng.integers(dims, size=mapping.size)] = rng.choice(
        [-3.0, -1.0, 2.0, 5.0], size=mapping.size)
    return audio, text, mapping


def _brute_force_metrics(audio, text, mapping, k_map=10):
    # Every query ranks all candidates by a stable descending sort (the tie rule).
    from cacophony_jax.evals.retrieval import l2_normalize

    sim = l2_normalize(audio, "a") @ l2_normalize(text, "t").T
    t2a = [1 + list(np.argsort(-sim[:, j], kind="stable")).index(c)
           for j, c in enumerate(mapping)]
    best, ap = [], []
    for clip in np.unique(mapping):
        order = list(np.argsort(-sim[clip], kind="stable"))
        ranks = sorted(1 + order.index(j) for j in np.flatnonzero(mapping == clip))
        best.append(ranks[0])
        hits = [(i + 1) / r for i, r in enumerate(ranks) if r <= k_map]
        ap.append(sum(hits) / min(k_map, len(ranks)))
    t2a, best = np.array(t2a), np.array(best)
    out = {}
    for k in (1, 5, 10):
        out[f"t2a_R@{k}"] = 100 * np.mean(t2a <= k)
        out[f"a2t_R@{k}"] = 100 * np.mean(best <= k)
    out["t2a_mAP@10"] = 100 * np.mean(np.where(t2a <= k_map, 1 / t2a, 0.0))
    out["a2t_mAP@10"] = 100 * np.mean(ap)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_brute_force_with_ties_and_uneven_captions(seed):
    rng = np.random.default_rng(seed)
    audio, text, mapping = _uneven_case(rng)
    expected = _brute_force_metrics(audio, text, mapping)
    for block_size in (1, 7, 256):
        got = retrieval_metrics(audio, text, mapping, block_size=block_size)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), block_size


def test_ranks_of_relevant_match_a_stable_sort_with_uneven_counts():
    rng = np.random.default_rng(3)
    sim = rng.integers(0, 3, size=(7, 40)).astype(float)  # many ties
    relevant = np.full((7, 12), -1)
    for q, count in enumerate([0, 1, 12, 2, 3, 0, 5]):
        relevant[q, :count] = rng.choice(40, size=count, replace=False)
    order = np.argsort(-sim, axis=1, kind="stable")
    expected = np.where(relevant >= 0, 1 + np.argmax(
        order[:, None, :] == relevant[:, :, None], axis=2), 0)
    np.testing.assert_array_equal(ranks_of_relevant(sim, relevant), expected)


def test_audio_to_text_ranks_each_caption_once(monkeypatch):
    # One clip with many captions must not make every clip pay for as many rankings.
    from cacophony_jax.evals import retrieval

    ranked, rank_of_correct_ = [], retrieval.rank_of_correct

    def counted(sim, correct):
        ranked.append(sim.shape)
        return rank_of_correct_(sim, correct)

    monkeypatch.setattr(retrieval, "rank_of_correct", counted)
    rng = np.random.default_rng(4)
    mapping = np.concatenate([np.arange(40), np.zeros(30, int)])  # clip 0: 31 captions
    retrieval_metrics(rng.normal(size=(40, 8)), rng.normal(size=(70, 8)), mapping,
                      block_size=16)
    audio_queries = [rows for rows, candidates in ranked if candidates == 70]
    assert sum(audio_queries) == 70  # one row per caption, not 40 clips x 31 columns

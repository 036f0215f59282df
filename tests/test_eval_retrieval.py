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

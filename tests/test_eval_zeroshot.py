"""Zero-shot classification metrics against hand-worked rankings."""

import numpy as np
import pytest

from cacophony_jax.evals.retrieval import EmbeddingError
from cacophony_jax.evals.zeroshot import (
    PROMPT,
    LabelError,
    average_precision,
    prompts_for,
    release_prompts,
    zeroshot_metrics,
)

# Class embeddings are one-hot axes, so a clip's score for class c is row[c] / |row|.
# Every row is a permutation of 1..6: equal norms, so equal entries tie exactly.
SCORES = np.array(
    [
        [6, 5, 4, 3, 2, 1],  # labels {0}: class 0 first -> top-1 hit
        [5, 6, 1, 2, 3, 4],  # labels {2}: class 2 last -> top-5 miss
        [1, 2, 3, 5, 6, 4],  # labels {3}: class 3 second -> top-5 hit only
        [2, 3, 6, 1, 4, 5],  # labels {5, 1}: class 5 second -> top-5 hit only
        [6, 5, 4, 3, 2, 1],  # unlabelled (-1): skipped
        [1, 2, 3, 4, 6, 5],  # label 4 (plain int): top-1 hit
    ],
    dtype=float,
)
LABELS = [[0], [2], [3], [5, 1], [-1], 4]


def test_prompts():
    assert PROMPT.format("rain") == "This is a sound of rain."
    assert prompts_for(["dog", "chirping_birds"]) == [
        "This is a sound of dog.",
        "This is a sound of chirping birds.",
    ]
    # As the released evaluation code wrote them: no full stop; ESC-50's metadata
    # spelling (the layouts give names with spaces), UrbanSound8K's with spaces.
    assert release_prompts(["dog", "chirping birds"], "esc50") == [
        "This is a sound of dog", "This is a sound of chirping_birds"]
    assert release_prompts(["car horn", "street_music"], "urbansound8k") == [
        "This is a sound of car horn", "This is a sound of street music"]


def test_metrics_by_hand():
    metrics = zeroshot_metrics(SCORES, np.eye(6), LABELS)
    assert metrics["num_examples"] == 5
    assert metrics["top1"] == pytest.approx(100 * 2 / 5)
    assert metrics["top5"] == pytest.approx(100 * 4 / 5)
    # Per class, the rank of its positive clip among the 5 labelled clips (rows 0-3, 5):
    # class 0 column (6, 5, 1, 2, 1): row 0 first -> AP 1
    # class 1 column (5, 6, 2, 3, 2): row 3 third -> 1/3
    # class 2 column (4, 1, 3, 6, 3): row 1 last -> 1/5
    # class 3 column (3, 2, 5, 1, 4): row 2 first -> 1
    # class 4 column (2, 3, 6, 4, 6): row 5 ties row 2, which has the lower index -> 1/2
    # class 5 column (1, 4, 4, 5, 5): row 3 ties row 5 and wins on index -> 1
    assert metrics["mAP"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 5 + 1 + 1 / 2 + 1) / 6)


def test_scale_of_embeddings_does_not_matter():
    # Powers of two keep the normalised rows bit-identical, so the ties survive.
    scaled = SCORES * np.array([[1.0], [4.0], [0.5], [8.0], [1.0], [2.0]])
    assert zeroshot_metrics(scaled, 4 * np.eye(6), LABELS) == pytest.approx(
        zeroshot_metrics(SCORES, np.eye(6), LABELS)
    )


def test_labels_as_padded_array():
    labels = np.array([[0, -1], [2, -1], [3, -1], [5, 1], [-1, -1], [4, -1]])
    assert zeroshot_metrics(SCORES, np.eye(6), labels) == pytest.approx(
        zeroshot_metrics(SCORES, np.eye(6), LABELS)
    )


def test_fewer_classes_than_k():
    # Three classes: top-5 covers them all, top-1 is plain accuracy.
    audio = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    metrics = zeroshot_metrics(audio, np.eye(3), [0, 2])
    assert metrics["top1"] == pytest.approx(50.0)
    assert metrics["top5"] == pytest.approx(100.0)
    # Class 0: clip 0 ties clip 1 and comes first -> 1; class 2: clip 1 second -> 1/2.
    assert metrics["mAP"] == pytest.approx(100 * (1 + 1 / 2) / 2)


def test_average_precision_two_positives():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    positive = np.array([False, True, False, True])
    assert average_precision(scores, positive) == pytest.approx((1 / 2 + 2 / 4) / 2)


@pytest.mark.parametrize(
    ("audio", "classes", "labels", "error", "match"),
    [
        (np.ones((2, 3)), np.eye(3), [0, 3], LabelError, "only 3 class"),
        (np.ones((2, 3)), np.eye(3), [0], LabelError, "one per clip"),
        (np.ones((2, 3)), np.eye(3), [-1, -1], LabelError, "no clip has a label"),
        (np.ones((2, 3)), np.eye(3), [0.5, 1], LabelError, "integer"),
        (np.ones((2, 4)), np.eye(3), [0, 1], EmbeddingError, "width"),
        (np.zeros((2, 3)), np.eye(3), [0, 1], EmbeddingError, "all zeros"),
    ],
)
def test_bad_inputs_name_the_problem(audio, classes, labels, error, match):
    with pytest.raises(error, match=match):
        zeroshot_metrics(audio, classes, labels)


def test_class_names_must_be_a_list():
    with pytest.raises(LabelError, match="list of names"):
        prompts_for("dog")

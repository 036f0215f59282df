"""Linear probe of frozen embeddings: separable vs random data, folds, bad inputs."""

import numpy as np
import pytest

from cacophony_jax.evals.probe import ProbeInputError, linear_probe, probe_set, seeded_folds


def _folds(labels, folds=5):
    return seeded_folds([f"clip{i}" for i in range(len(labels))], labels, folds)


def _blobs(n=80, d=8, classes=4, spread=3.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centers = rng.normal(size=(classes, d)) * spread
    return (centers[labels] + rng.normal(size=(n, d))).astype(np.float32), labels


def test_separable_classes_are_learnt_and_random_features_are_not():
    x, y = _blobs()
    folds = _folds(y, 4)
    result = linear_probe(x, y, folds)
    assert result["probe_top1"] == 100.0
    assert result["probe_fold_top1"] == {str(k): 100.0 for k in range(1, 5)}
    assert (result["probe_examples"], result["probe_classes"]) == (80, 4)
    # Noise features: about chance (25 %) on 400 held-out examples.
    rng = np.random.default_rng(1)
    noise = linear_probe(rng.normal(size=(400, 8)), np.arange(400) % 4, _folds(np.arange(400) % 4))
    assert 15.0 < noise["probe_top1"] < 35.0
    # Deterministic: the same inputs give the same numbers.
    assert linear_probe(x, y, folds) == result


def test_features_are_standardised_before_the_penalty():
    # Features scaled down 10^4 would need weights 10^4 times larger, which the L2 penalty
    # forbids; standardised with the training folds' statistics they are learnt as well.
    x, y = _blobs()
    folds = _folds(y, 4)
    scaled = linear_probe(x * np.float32(1e-4) + np.float32(50.0), y, folds)
    assert scaled["probe_top1"] == 100.0


def test_held_out_fold_is_never_trained_on():
    # Fold 3 alone holds class 2: a probe that saw it would get those right; one trained
    # on folds 1-2 only can never predict class 2, so fold 3 scores 0 %.
    x, y = _blobs(n=60, classes=3)
    folds = np.where(y == 2, 3, np.arange(60) % 2 + 1)
    result = linear_probe(x, y, folds)
    assert result["probe_fold_top1"]["3"] == 0.0
    assert result["probe_fold_top1"]["1"] == result["probe_fold_top1"]["2"] == 100.0
    assert result["probe_top1"] == pytest.approx(200.0 / 3)


def test_seeded_folds_are_stratified_seeded_and_follow_the_ids():
    ids = [f"clip{i}" for i in range(23)]
    labels = [0] * 10 + [1] * 8 + [2] * 5
    folds = seeded_folds(ids, labels, 5, seed=7)
    assert sorted(np.bincount(folds)[1:]) == [4, 4, 5, 5, 5]
    for label, count in ((0, 10), (1, 8), (2, 5)):  # each class spread over the folds
        per_fold = np.bincount(folds[np.asarray(labels) == label], minlength=6)[1:]
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == count
    assert np.array_equal(folds, seeded_folds(ids, labels, 5, seed=7))
    assert not np.array_equal(folds, seeded_folds(ids, labels, 5, seed=8))
    # The order the set lists its clips in does not move a clip to another fold.
    order = np.random.default_rng(0).permutation(23)
    shuffled = seeded_folds([ids[i] for i in order], [labels[i] for i in order], 5, seed=7)
    assert np.array_equal(shuffled, folds[order])
    # A clip listed twice is in one fold: never trained on and scored at once.
    twice = seeded_folds(ids + ["clip3"], labels + [labels[3]], 5, seed=7)
    assert twice[-1] == twice[3] and np.array_equal(twice[:-1], folds)
    # Listed twice with two classes: dealt with the lesser, wherever the rows stand.
    a = seeded_folds(["x", "y", "z", "x"], [2, 0, 1, 0], 2)
    b = seeded_folds(["x", "x", "y", "z"], [0, 2, 0, 1], 2)
    assert a[0] == a[3] == b[0] == b[1] and (a[1], a[2]) == (b[2], b[3])
    with pytest.raises(ProbeInputError, match="3 distinct clip.* cannot be split into 5 folds"):
        seeded_folds(["a", "b", "c", "a"], [0, 1, 0, 0], 5)


def test_standardisation_uses_the_training_folds_only():
    # Fold 1 holds one clip with feature 0 at 1e6 (its class, 1, is the side that value
    # points to). Statistics over every clip would shrink the training clips' feature 0
    # to about 1e-5 standard deviations, too small for the penalised weights to use, and
    # the training folds' 60 % of class 0 would take every prediction; with the
    # training folds' own statistics fold 1 is scored correctly.
    rng = np.random.default_rng(3)
    y = np.array(([0] * 6 + [1] * 4) * 8)
    x = np.stack([np.where(y == 1, 1.0, -1.0) + 0.1 * rng.normal(size=80),
                  rng.normal(size=80)], axis=1).astype(np.float32)
    folds = np.where(np.arange(80) < 40, 1, 2)
    x[0] = [1e6, 0.0]
    y[0] = 1
    result = linear_probe(x, y, folds)
    assert result["probe_fold_top1"]["1"] == 100.0


def test_probe_set_says_what_it_counted():
    embedded = {"audio_emb": np.zeros((5, 4), np.float32), "ids": list("abcde"),
                "labels": [[0], [1], [0, 1], [], [1]]}
    with pytest.raises(ProbeInputError, match=r"own has 3 clip\(s\) with exactly one class "
                       r"label \(2 with several or no labels left out\): 3 distinct"):
        probe_set("own", object(), embedded)


def test_bad_inputs_name_the_problem():
    x, y = _blobs(n=20, classes=2)
    folds = np.arange(20) % 2 + 1
    with pytest.raises(ProbeInputError, match=r"non-empty \[n, d\] array, got shape \(20,\)"):
        linear_probe(x[:, 0], y, folds)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ProbeInputError, match="non-finite"):
        linear_probe(bad, y, folds)
    with pytest.raises(ProbeInputError, match="labels must be 20 integers"):
        linear_probe(x, y[:5], folds)
    with pytest.raises(ProbeInputError, match="labels must be 20 integers"):
        linear_probe(x, y.astype(np.float32), folds)
    with pytest.raises(ProbeInputError, match=r"fold\(s\) \[3\] hold no example"):
        linear_probe(x, y, folds, expected_folds=[1, 2, 3])
    with pytest.raises(ProbeInputError, match="at least 2 folds"):
        linear_probe(x, y, np.ones(20, int))
    # Fold 1 holds every class-1 example: training for fold 1 sees class 0 only.
    with pytest.raises(ProbeInputError, match="for fold 1 sees fewer than 2 classes"):
        linear_probe(x, y, np.where(y == 1, 1, np.arange(20) // 2 % 2 + 1))


def test_fold_layouts_record_each_clips_fold(tmp_path):
    from cacophony_jax.data import layouts
    from tests.helpers import write_tone

    root = tmp_path / "esc50"
    (root / "meta").mkdir(parents=True)
    rows = [("1-1-A-0.wav", 1, 0, "dog"), ("2-1-A-0.wav", 2, 0, "dog"),
            ("3-2-A-1.wav", 3, 1, "rain")]
    (root / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category\n" + "".join(f"{r[0]},{r[1]},{r[2]},{r[3]}\n"
                                                   for r in rows))
    for k, (name, *_) in enumerate(rows):
        write_tone(root / "audio" / name, k)
    assert layouts.esc50_source(root).clip_folds == {r[0]: r[1] for r in rows}
    assert layouts.esc50_source(root, folds=[2, 3]).clip_folds == {"2-1-A-0.wav": 2,
                                                                    "3-2-A-1.wav": 3}

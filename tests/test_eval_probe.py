"""Linear probe of frozen embeddings: separable vs random data, folds, bad inputs."""

import numpy as np
import pytest

from cacophony_jax.evals.probe import ProbeInputError, kfold_ids, linear_probe


def _blobs(n=80, d=8, classes=4, spread=3.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centers = rng.normal(size=(classes, d)) * spread
    return (centers[labels] + rng.normal(size=(n, d))).astype(np.float32), labels


def test_separable_classes_are_learnt_and_random_features_are_not():
    x, y = _blobs()
    folds = kfold_ids(len(y), 4)
    result = linear_probe(x, y, folds)
    assert result["probe_top1"] == 100.0
    assert result["probe_fold_top1"] == {str(k): 100.0 for k in range(1, 5)}
    assert (result["probe_examples"], result["probe_classes"]) == (80, 4)
    # Noise features: about chance (25 %) on 400 held-out examples.
    rng = np.random.default_rng(1)
    noise = linear_probe(rng.normal(size=(400, 8)), np.arange(400) % 4, kfold_ids(400))
    assert 15.0 < noise["probe_top1"] < 35.0
    # Deterministic: the same inputs give the same numbers.
    assert linear_probe(x, y, folds) == result


def test_features_are_standardised_before_the_penalty():
    # Features scaled down 10^4 would need weights 10^4 times larger, which the L2 penalty
    # forbids; standardised with the training folds' statistics they are learnt as well.
    x, y = _blobs()
    folds = kfold_ids(len(y), 4)
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


def test_kfold_ids_are_balanced_and_seeded():
    ids = kfold_ids(23, 5, seed=7)
    assert sorted(np.bincount(ids)[1:]) == [4, 4, 5, 5, 5]
    assert np.array_equal(ids, kfold_ids(23, 5, seed=7))
    assert not np.array_equal(ids, kfold_ids(23, 5, seed=8))
    with pytest.raises(ProbeInputError, match="3 example.* cannot be split into 5 folds"):
        kfold_ids(3, 5)


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

"""`eval --linear-probe`: a stage-1 (MAE) bundle through the command line, and the probe
next to zero-shot on a stage-2 one, from the same embeddings pass."""

import csv
import json
import os

import numpy as np
import pytest

from cacophony_jax import cli
from cacophony_jax.data.sources import ClipSource
from cacophony_jax.evals import benchmark, report
from tests.helpers import write_tone
from tests.test_eval_benchmark import FakeModel, _tone

CLASSES = ("dog", "rain", "bell")


def _esc50(root, per_fold=2, folds=5, tone=write_tone):
    """An ESC-50 layout: `per_fold` clips of each class in each fold; class k is tone k."""
    rows = [[f"{f}-{k}{j}-A-{k}.wav", str(f), str(k), CLASSES[k]]
            for f in range(1, folds + 1) for k in range(3) for j in range(per_fold)]
    os.makedirs(root / "meta")
    with open(root / "meta" / "esc50.csv", "w", newline="") as out:
        csv.writer(out).writerows([["filename", "fold", "target", "category"], *rows])
    for name, _, k, _ in rows:
        tone(root / "audio" / name, int(k))
    return root


def test_mae_bundle_gets_the_probe_and_skips_text_tasks(inference_bundles, tmp_path, capsys):
    mae = str(inference_bundles[1])
    esc50 = _esc50(tmp_path / "esc50")
    clotho = tmp_path / "clotho"  # captions only: nothing an MAE bundle can do with it
    os.makedirs(clotho)
    with open(clotho / "clotho_captions_evaluation.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name"] + [f"caption_{k}" for k in range(1, 6)],
                                 ["a.wav", *(["a tone"] * 5)]])
    write_tone(clotho / "evaluation" / "a.wav", 0)
    out = tmp_path / "out"
    code = cli.main(["eval", "--bundle", mae, "--esc50", str(esc50), "--clotho", str(clotho),
                     "--linear-probe", "--out", str(out), "--batch-size", "8"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["bundle_kind"] == "mae" and results["linear_probe"] is True
    assert list(results["sets"]) == ["esc50"]
    esc = results["sets"]["esc50"]
    assert esc["tasks"] == ["probe"] and esc["clips"] == 30
    m = esc["metrics"]
    assert set(m["probe_fold_top1"]) == {"1", "2", "3", "4", "5"}
    assert m["probe_top1"] == pytest.approx(np.mean(list(m["probe_fold_top1"].values())))
    assert m["probe_top1"] == 100.0  # three pure tones are told apart by any encoder
    assert (m["probe_examples"], m["probe_classes"]) == (30, 3)
    assert m["probe_fold_kind"] == "the set's folds" and "top1" not in m
    assert any("no text tower" in s for s in results["skipped"])
    assert ("the linear probe on clotho, the mae bundle's only task: it has no class labels"
            in results["skipped"])
    md = (out / "results.md").read_text()
    assert "## Linear probe of the frozen audio embeddings" in md
    assert "| ESC-50 (5 folds) (incomplete copy, see below) | 100.0 | 1: 100.0" in md
    assert "Zero-shot" not in md and "retrieval" not in md.split("Notes")[0].lower()
    # Without --linear-probe an MAE bundle has nothing to evaluate: one error line.
    capsys.readouterr()
    assert cli.main(["eval", "--bundle", mae, "--esc50", str(esc50)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bundle ") and \
        "or pass --linear-probe" in err[0]


def test_stage2_bundle_probe_reuses_the_zeroshot_embeddings(tmp_path):
    esc50 = _esc50(tmp_path / "esc50", tone=lambda path, k: _tone(str(path), CLASSES[k]))
    sets = benchmark.open_datasets({"esc50": str(esc50)})
    model = FakeModel()
    results = benchmark.evaluate_bundle(model, sets, batch_size=64, linear_probe=True)
    assert model.audio_calls == 1  # one embeddings pass serves both tasks
    esc = results["sets"]["esc50"]
    assert esc["tasks"] == ["zeroshot", "probe"]
    assert esc["metrics"]["top1"] == 100.0 and esc["metrics"]["probe_top1"] == 100.0
    plain = benchmark.evaluate_bundle(FakeModel(), sets, batch_size=64)
    assert "probe_top1" not in plain["sets"]["esc50"]["metrics"]
    assert plain["linear_probe"] is False and plain["skipped"] == []


def test_own_labelled_set_gets_seeded_folds(tmp_path):
    source = ClipSource("own", str(tmp_path), CLASSES)
    for i in range(15):
        _tone(str(tmp_path / f"{i}.wav"), CLASSES[i % 3])
        source.add(f"{i}.wav", captions=[f"a {CLASSES[i % 3]}"], labels=[i % 3])
    source.add("0.wav", captions=["two labels"], labels=[0, 1])  # not probed
    result = benchmark.evaluate_source(FakeModel(), "own", source, linear_probe=True)
    m = result["metrics"]
    assert result["tasks"] == ["retrieval", "zeroshot", "probe"]
    assert m["probe_fold_kind"] == "5 folds by a hash of the clip ids with seed 0, per class"
    assert len(m["probe_fold_top1"]) == 5 and m["probe_examples"] == 15
    assert m["probe_skipped"] == 1 and m["probe_top1"] == 100.0
    md = report.results_markdown({"sets": {"own": {**result, "origin": None}}})
    assert "- own: 1 clip(s) with several or no class labels left out of the linear probe" in md


def test_mae_bundle_refusals(tmp_path):
    mae = FakeModel()
    mae.kind = "mae"
    source = ClipSource("own", str(tmp_path))  # no class names
    with pytest.raises(ValueError, match="without a text tower, so it has no zero-shot"):
        benchmark.evaluate_bundle(mae, {"own": source})
    with pytest.raises(ValueError, match="--caption-clips: .* without a captioning decoder"):
        benchmark.evaluate_bundle(mae, {"own": source}, linear_probe=True, caption_clips=2)
    with pytest.raises(ValueError, match="none of the sets given has class labels"):
        benchmark.evaluate_bundle(mae, {"own": source}, linear_probe=True)


def test_mae_bundle_with_no_set_probed_is_an_error(inference_bundles, tmp_path, capsys):
    esc50 = _esc50(tmp_path / "esc50")
    for name in os.listdir(esc50 / "audio"):  # fold 3 has no audio left
        if name.startswith("3-"):
            os.remove(esc50 / "audio" / name)
    out = tmp_path / "out"
    code = cli.main(["eval", "--bundle", str(inference_bundles[1]), "--esc50", str(esc50),
                     "--linear-probe", "--out", str(out), "--batch-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("error: no set could be probed") and \
        "esc50: fold(s) [3] hold no example" in err[-1]


def test_a_set_that_cannot_be_probed_is_noted_and_its_other_tasks_run(tmp_path):
    source = ClipSource("own", str(tmp_path), CLASSES)
    for i in range(6):  # every clip has two labels: nothing to probe
        _tone(str(tmp_path / f"{i}.wav"), CLASSES[i % 3])
        source.add(f"{i}.wav", captions=[f"a {CLASSES[i % 3]}"], labels=[i % 3, (i + 1) % 3])
    esc50 = _esc50(tmp_path / "esc50", folds=2, tone=lambda path, k: _tone(str(path), CLASSES[k]))
    for name in os.listdir(esc50 / "audio"):  # fold 2 has no audio left
        if name.startswith("2-"):
            os.remove(esc50 / "audio" / name)
    sets = {"own": source, **benchmark.open_datasets({"esc50": str(esc50)})}
    results = benchmark.evaluate_bundle(FakeModel(), sets, linear_probe=True,
                                        out_dir=str(tmp_path / "out"))
    own, esc = results["sets"]["own"], results["sets"]["esc50"]
    assert own["tasks"] == ["retrieval", "zeroshot"] and "t2a_R@1" in own["metrics"]
    assert own["probe_error"] == "no clip of own has exactly one class label"
    assert esc["tasks"] == ["zeroshot"] and "probe_top1" not in esc["metrics"]
    assert esc["probe_error"].startswith("fold(s) [2] hold no example")
    assert results["skipped"] == [f"the linear probe on {n}: {r['probe_error']}"
                                  for n, r in results["sets"].items()]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "- skipped the linear probe on own: no clip of own has exactly one" in md
    assert "Linear probe of the frozen" not in md

"""Dataset evaluation runner: public layouts, hand-computed metrics, results files."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile

from cacophony_jax.data.sources import ClipSource, SourceError
from cacophony_jax.evals import benchmark, eval_command, report

WORDS = ("dog", "rain", "bell", "car")  # class k is a tone of 1000 (k + 1) Hz


def _tone(path, word, seconds=0.5):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    freq = 1000 * (WORDS.index(word) + 1)
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16), 16000)


def _csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


class FakeModel:
    """Audio -> one-hot of its tone's word; text -> one-hot of its first known word."""

    kind, sample_rate, embedding_size, window_seconds, tokenizer = "cacophony", 16000, 4, 1.0, None

    def __init__(self):
        self.audio_calls = 0

    def embed_audio(self, audio, sample_rate=None, batch_size=32, window_seconds=None):
        assert sample_rate == 16000
        self.audio_calls += 1
        self.window_seconds_used = window_seconds
        out = np.zeros((len(audio), 4), np.float32)
        for row, clip in enumerate(audio):
            peak = np.argmax(np.abs(np.fft.rfft(clip))) * 16000 / len(clip)
            out[row, int(round(peak / 1000)) - 1] = 1.0
        return out

    def embed_text(self, texts, batch_size=256):
        out = np.full((len(texts), 4), 0.5, np.float32)
        for row, text in enumerate(texts):
            hits = [w for w in text.lower().split() if w.strip(".") in WORDS]
            if hits:
                out[row] = np.eye(4)[WORDS.index(hits[0].strip("."))]
        return out

    def caption(self, audio, sample_rate=None, method="greedy", **options):
        return [f"a {WORDS[int(np.argmax(e))]} sound" for e in self.embed_audio(audio, 16000)]


@pytest.fixture
def clotho(tmp_path):
    """Three clips; clip c's captions name 'car' twice and (wrongly) 'dog' three times."""
    root = tmp_path / "clotho"
    rows = [["a.wav", *[f"a dog barks {k}" for k in range(5)]],
            ["b.wav", *[f"rain falls {k}" for k in range(5)]],
            ["c.wav", "a car passes", "car engine", "dog", "dog again", "a dog maybe"]]
    _csv(root / "clotho_captions_evaluation.csv",
         ["file_name"] + [f"caption_{k}" for k in range(1, 6)], rows)
    for name, word in (("a.wav", "dog"), ("b.wav", "rain"), ("c.wav", "car")):
        _tone(root / "evaluation" / name, word)
    return root


@pytest.fixture
def esc50(tmp_path):
    """Four clips; the bell tone is labelled rain, so it is missed (tie -> class 0)."""
    root = tmp_path / "esc50"
    rows = [["1-1-A-0.wav", "1", "0", "dog"], ["2-1-A-0.wav", "2", "0", "dog"],
            ["1-2-A-1.wav", "1", "1", "rain"], ["3-3-A-1.wav", "3", "1", "rain"]]
    _csv(root / "meta" / "esc50.csv", ["filename", "fold", "target", "category"], rows)
    for (name, *_), word in zip(rows, ("dog", "dog", "rain", "bell"), strict=True):
        _tone(root / "audio" / name, word)
    return root


def test_retrieval_on_clotho_layout(clotho):
    sets = benchmark.open_datasets({"clotho": str(clotho)})
    result = benchmark.evaluate_source(FakeModel(), "clotho", sets["clotho"])
    m = result["metrics"]
    assert result["tasks"] == ["retrieval"] and result["clips"] == 3 and result["captions"] == 15
    # T->A: 12 captions rank their clip first, c's three "dog" captions rank it third.
    assert m["t2a_R@1"] == pytest.approx(80.0) and m["t2a_R@5"] == 100.0
    assert m["t2a_mAP@10"] == pytest.approx(100 * (12 + 3 / 3) / 15)
    # A->T: a and b find all five captions first (AP 1); c finds two at ranks 1-2 and its
    # other three at ranks 13-15, so AP@10 = 2 / 5.
    assert m["a2t_R@1"] == 100.0 and m["a2t_mAP@10"] == pytest.approx(100 * 2.4 / 3)


def test_zeroshot_on_esc50_layout(esc50):
    model = FakeModel()
    result = benchmark.evaluate_source(model, "esc50", benchmark.open_datasets(
        {"esc50": str(esc50)})["esc50"], batch_size=3)
    assert result["tasks"] == ["zeroshot"] and result["clips"] == 4
    assert result["metrics"]["top1"] == pytest.approx(75.0)
    assert result["metrics"]["top5"] == 100.0  # two classes only
    assert model.audio_calls == 2  # batches of 3 + 1


def test_clips_shorter_than_a_patch_are_padded_not_dropped(esc50):
    class StrictModel(FakeModel):  # refuses a short clip as the real model does
        def embed_audio(self, audio, sample_rate=None, batch_size=32):
            if any(len(clip) < 2401 for clip in audio):
                raise ValueError("clip 0 is too short")
            return super().embed_audio(audio, sample_rate, batch_size)

    _tone(esc50 / "audio" / "2-1-A-0.wav", "dog", seconds=0.05)  # 800 samples
    result = benchmark.evaluate_source(StrictModel(), "esc50", benchmark.open_datasets(
        {"esc50": str(esc50)})["esc50"], batch_size=4)
    assert result["clips"] == 4 and result["unreadable"] == 0 and result["padded"] == 1
    assert result["metrics"]["top1"] == pytest.approx(75.0)  # the short dog tone still heard


def test_unreadable_clip_is_skipped_and_reported(esc50, tmp_path):
    (esc50 / "audio" / "3-3-A-1.wav").write_bytes(b"RIFF....WAVEjunk")
    results = benchmark.evaluate_bundle(FakeModel(), benchmark.open_datasets(
        {"esc50": str(esc50)}), out_dir=str(tmp_path / "out"))
    esc = results["sets"]["esc50"]
    assert esc["clips"] == 3 and esc["unreadable"] == 1
    assert esc["metrics"]["top1"] == 100.0
    text = (tmp_path / "out" / "results.md").read_text()
    assert "esc50: 1 unreadable" in text
    assert "| ESC-50 (folds 1, 2, 3) (incomplete copy, see below) | 100.0 | 93.4 |" in text


def test_own_manifest_lists_absent_and_unreadable_clips_apart(esc50, tmp_path):
    from cacophony_jax.data.manifest import ManifestSource

    (esc50 / "audio" / "3-3-A-1.wav").write_bytes(b"RIFF....WAVEjunk")
    (esc50 / "audio" / "2-1-A-0.wav").unlink()
    rows = [{"id": n, "audio": f"audio/{n}", "captions": [f"a {w} sound"]}
            for n, w in (("1-1-A-0.wav", "dog"), ("2-1-A-0.wav", "dog"),
                         ("1-2-A-1.wav", "rain"), ("3-3-A-1.wav", "rain"))]
    manifest = esc50 / "own.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = benchmark.evaluate_bundle(FakeModel(), {"own.jsonl": ManifestSource(
        str(manifest))}, out_dir=str(tmp_path / "out"))
    own = results["sets"]["own.jsonl"]
    assert own["clips"] == 2 and own["missing"] == 1 and own["unreadable"] == 1
    assert own["missing_ids"] == ["2-1-A-0.wav"] and own["unreadable_ids"] == ["3-3-A-1.wav"]
    assert ("own.jsonl: 1 unreadable and 1 missing clip(s) skipped (results.json lists "
            "them: missing_ids, unreadable_ids)") in (tmp_path / "out" / "results.md").read_text()


def test_own_manifest_bad_rows_are_recorded_and_mark_the_copy_incomplete(esc50, tmp_path,
                                                                         caplog):
    import logging

    from cacophony_jax.data.manifest import ManifestSource

    rows = [json.dumps({"id": n, "audio": f"audio/{n}", "captions": [f"a {w} sound"]})
            for n, w in (("1-1-A-0.wav", "dog"), ("1-2-A-1.wav", "rain"),
                         ("1-2-A-1.wav", "rain"))] + ["{not json", '{"caption": "no audio"}']
    manifest = esc50 / "own.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        results = benchmark.evaluate_bundle(FakeModel(), {"own.jsonl": ManifestSource(
            str(manifest), skip_bad_rows=True)}, out_dir=str(tmp_path / "out"))
    own = results["sets"]["own.jsonl"]
    assert own["clips"] == 3 and own["bad_rows"] == 2
    assert json.loads((tmp_path / "out" / "results.json").read_text())[
        "sets"]["own.jsonl"]["bad_rows"] == 2
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| own.jsonl (incomplete copy, see below) | this model | 3 | 3 |" in text
    assert "- own.jsonl: 2 bad manifest row(s) skipped" in text
    assert "own.jsonl: 1 clip(s) repeat an id listed earlier" in caplog.text


def test_results_files_put_paper_numbers_next_to_ours(clotho, esc50, tmp_path):
    out = tmp_path / "results"
    sets = benchmark.open_datasets({"clotho": str(clotho), "esc50": str(esc50)})
    model = FakeModel()
    results = benchmark.evaluate_bundle(model, sets, out_dir=str(out), bundle="B",
                                        window_seconds=30.0)
    assert model.window_seconds_used == 30.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["window_seconds"] == 30.0
    assert "Clips of up to 30 s are embedded in one pass" in (out / "results.md").read_text()
    benchmark.evaluate_bundle(model, sets, bundle="B")  # None: the model's own window
    assert model.window_seconds_used is None
    assert saved["bundle"] == "B" and set(saved["sets"]) == {"clotho", "esc50"}
    assert saved["sets"]["esc50"]["metrics"]["top1"] == results["sets"]["esc50"]["metrics"]["top1"]
    text = (out / "results.md").read_text()
    # These copies hold a few clips: not the published sets, and the tables say so.
    clotho_row = "| Clotho evaluation (incomplete copy, see below) |"
    assert f"{clotho_row} this model | 3 | 15 | 80.0 | 100.0 | 100.0 | 86.7 | 100.0 |" in text
    assert f"{clotho_row} Cacophony (paper) | — | — | 20.0 | 46.3 | 58.2 | — | 26.1 |" in text
    assert "| ESC-50 (folds 1, 2, 3) (incomplete copy, see below) | 75.0 | 93.4 | 100.0 |" in text
    assert "- clotho: the copy lists 3 of the published set's 1045 clips" in text
    assert "- esc50: the copy lists 4 of the published set's 2000 clips (folds [1, 2, 3])" in text
    assert "| UrbanSound8K (10 folds) | — (not evaluated) | 77.1 |" in text
    assert "| TUT Acoustic Scenes 2017 | — (no reader) | 48.6 |" in text
    assert "| VGGSound test | — (no reader) | 27.1 |" in text
    assert not any(name.startswith(".") for name in os.listdir(out))  # no temporary left


def test_published_table_matches_the_paper():
    audiocaps = report.PUBLISHED["audiocaps"]["Cacophony (released weights)"]
    assert [audiocaps[k] for k in ("t2a_R@1", "t2a_R@5", "t2a_R@10", "a2t_R@1", "a2t_R@5",
                                   "a2t_R@10")] == [41.0, 75.3, 86.4, 55.3, 83.6, 92.4]
    clotho = report.PUBLISHED["clotho"]["Cacophony (paper)"]
    assert list(clotho.values()) == [20.0, 46.3, 58.2, 26.1, 53.3, 66.1]
    assert {k: v["Cacophony (paper)"]["top1"] for k, v in report.PUBLISHED.items()
            if "top1" in v.get("Cacophony (paper)", {})} == {
        "esc50": 93.4, "urbansound8k": 77.1, "tut2017": 48.6, "vggsound": 27.1}


def test_audiocaps_and_urbansound8k_layouts(tmp_path):
    ac, us = tmp_path / "audiocaps", tmp_path / "us8k"
    _csv(ac / "test.csv", ["audiocap_id", "youtube_id", "start_time", "caption"],
         [["1", "yA", "30", "a dog barks"], ["2", "yA", "30", "dog barking"],
          ["3", "yB", "0", "heavy rain"]])
    _tone(ac / "audio" / "test" / "yA.wav", "dog")
    _tone(ac / "audio" / "test" / "yB_0.wav", "rain")
    _csv(us / "metadata" / "UrbanSound8K.csv",
         ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"],
         [["1-0.wav", "1", "0", "1", "1", "1", "0", "car_horn"],
          ["2-1.wav", "2", "0", "1", "1", "2", "1", "dog_bark"]])
    _tone(us / "audio" / "fold1" / "1-0.wav", "car")
    _tone(us / "audio" / "fold2" / "2-1.wav", "dog")
    sets = benchmark.open_datasets({"audiocaps": str(ac), "urbansound8k": str(us)})
    seen = []
    results = benchmark.evaluate_bundle(FakeModel(), sets,
                                        progress=lambda *a: seen.append(a))
    assert results["sets"]["audiocaps"]["metrics"]["t2a_R@1"] == 100.0
    assert results["sets"]["audiocaps"]["captions"] == 3
    # "car horn" and "dog bark": both prompts name the clip's word.
    assert results["sets"]["urbansound8k"]["metrics"]["top1"] == 100.0
    assert ("audiocaps: audio", 2, 2) in seen and ("urbansound8k: audio", 2, 2) in seen


def test_other_sets_and_class_mentions():
    class Tones:
        name, class_names = "tones", ("dog", "bell")

        def __len__(self):
            return 2

        def __getitem__(self, i):
            word = ("dog", "bell")[i]
            t = np.arange(8000) / 16000
            audio = (0.3 * np.sin(2 * np.pi * 1000 * (WORDS.index(word) + 1) * t) * 32767)
            return {"id": word, "audio": audio.astype(np.int16), "labels": [i],
                    "captions": [f"a {word} sound"], "synthetic_captions": []}

    methods = []

    class Recording(FakeModel):
        def caption(self, audio, sample_rate=None, method="greedy", **options):
            methods.append(method)
            return super().caption(audio, sample_rate, method, **options)

    result = benchmark.evaluate_source(Recording(), "tones", Tones(), caption_clips=2)
    assert methods == ["greedy"]  # as training's evaluation decodes
    assert result["tasks"] == ["retrieval", "zeroshot"]
    assert result["metrics"]["t2a_R@1"] == 100.0 and result["metrics"]["top1"] == 100.0
    assert result["metrics"]["class_mention_rate"] == 100.0
    assert result["metrics"]["captioned_clips"] == 2
    text = report.results_markdown({"sets": {"tones": result}, "caption_method": "greedy"})
    assert "| tones | 100.0 | 2 |" in text and "(%, greedy decoding)" in text
    benchmark.evaluate_source(Recording(), "tones", Tones(), caption_clips=2,
                              caption_method="beam")
    assert methods[-1] == "beam"

    class LabelsOnly(Tones):  # an own labelled set without captions: zero-shot alone
        def __getitem__(self, i):
            return {**super().__getitem__(i), "captions": []}

    class Partly(Tones):  # one clip with a caption, the other with a label only
        class_names = ("dog", "bell")

        def __getitem__(self, i):
            record = super().__getitem__(i)
            return {**record, "captions": record["captions"] if i == 0 else [],
                    "labels": record["labels"] if i == 1 else []}

    result = benchmark.evaluate_source(FakeModel(), "partly", Partly())
    text = report.results_markdown({"sets": {"partly": result}})
    assert result["captioned"] == 1 and result["metrics"]["num_examples"] == 1
    assert "| partly | this model | 2 (1 with captions) | 1 |" in text
    (zeroshot_row,) = [line for line in text.splitlines()
                       if line.startswith("| partly | ") and "this model" not in line]
    assert zeroshot_row.endswith("| 1 |")  # the labelled clips scored, not all clips

    result = benchmark.evaluate_source(FakeModel(), "labels", LabelsOnly())
    assert result["tasks"] == ["zeroshot"] and result["metrics"]["top1"] == 100.0
    assert "t2a_R@1" not in result["metrics"]
    LabelsOnly.class_names = ()
    with pytest.raises(SourceError, match="no captions.*nor labels"):
        benchmark.evaluate_source(FakeModel(), "labels", LabelsOnly())


def test_user_errors(tmp_path):
    with pytest.raises(SourceError, match="no reader for evaluation set 'vggsound'"):
        benchmark.open_datasets({"vggsound": str(tmp_path)})
    with pytest.raises(SourceError, match="does not exist"):
        benchmark.open_datasets({"esc50": str(tmp_path / "missing")})
    headers = {"audiocaps": ["audiocap_id", "youtube_id", "start_time", "caption"],
               "clotho": ["file_name"] + [f"caption_{k}" for k in range(1, 6)],
               "esc50": ["filename", "fold", "target", "category"],
               "urbansound8k": ["slice_file_name", "fold", "classID", "class"]}
    for name, header in headers.items():  # a listing with only its header
        _csv(tmp_path / name / benchmark.LISTINGS[name], header, [])
        with pytest.raises(SourceError, match=rf"^{tmp_path / name / benchmark.LISTINGS[name]} "
                                              r"lists no clips \(it holds only a header\)"):
            benchmark.open_datasets({name: str(tmp_path / name)})
    with pytest.raises(SourceError, match="^empty lists no clips; nothing to evaluate"):
        benchmark.embed_source(FakeModel(), ClipSource("empty", str(tmp_path)))
    mae = FakeModel()
    mae.kind = "mae"
    with pytest.raises(ValueError, match="without a text tower"):
        benchmark.evaluate_bundle(mae, {"x": None})
    with pytest.raises(ValueError, match="no evaluation set"):
        benchmark.evaluate_bundle(FakeModel(), {})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, official_dir):
    """A real stage-2 bundle: the tiny official-format checkpoint and a small BPE."""
    from cacophony_jax.convert import export
    from cacophony_jax.data.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("bundle")
    texts = [f"a {w} sound number {k}" for w in WORDS for k in range(20)]
    tokenizer = Tokenizer.train_bpe(texts, 300).save(folder / "tokenizer.json")
    return export.export_from_official(
        official_dir / "Cacophony_tiny.ckpt", folder / "bundle", tokenizer_path=tokenizer,
        window_seconds=1.0, text_length=16)


def test_real_bundle_matches_direct_scoring(bundle, clotho, esc50):
    from cacophony_jax import inference
    from cacophony_jax.evals.retrieval import retrieval_metrics
    from cacophony_jax.evals.zeroshot import prompts_for, release_prompts, zeroshot_metrics

    model = inference.load(bundle)
    sets = benchmark.open_datasets({"clotho": str(clotho), "esc50": str(esc50)})
    results = benchmark.evaluate_bundle(model, sets, batch_size=2)["sets"]
    source = sets["clotho"]
    audio = model.embed_audio([source[i]["audio_path"] for i in range(3)])
    texts = [c for i in range(3) for c in source[i]["captions"]]
    expected = retrieval_metrics(audio, model.embed_text(texts), np.repeat(np.arange(3), 5))
    for key, value in expected.items():
        assert results["clotho"]["metrics"][key] == pytest.approx(value, abs=1e-6), key
    source = sets["esc50"]
    audio = model.embed_audio([source[i]["audio_path"] for i in range(4)])
    labels = [source[i]["labels"] for i in range(4)]
    # By default the prompts are the released evaluation code's (no full stop, ESC-50's
    # metadata spelling); "sentence" is the paper's wording.
    expected = zeroshot_metrics(audio, model.embed_text(
        release_prompts(source.class_names, "esc50")), labels)
    assert results["esc50"]["metrics"]["top1"] == pytest.approx(expected["top1"])
    assert results["esc50"]["metrics"]["mAP"] == pytest.approx(expected["mAP"])
    sentence = benchmark.evaluate_bundle(model, {"esc50": source}, batch_size=2,
                                         prompt="sentence")
    expected = zeroshot_metrics(audio, model.embed_text(prompts_for(source.class_names)),
                                labels)
    assert sentence["sets"]["esc50"]["metrics"]["mAP"] == pytest.approx(expected["mAP"])
    assert sentence["zeroshot_prompt"] == "sentence"


def test_results_are_not_written_into_the_bundle_folder(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    bundle = tmp_path / "bundle"
    (bundle / "params").mkdir(parents=True)
    (bundle / "bundle.json").write_text("{}")

    def load(path):
        raise AssertionError("refused before loading")

    for out in (bundle, bundle / "ev1", bundle / "params"):
        args = parser.parse_args(["--bundle", str(bundle), "--synthetic", "2", "--out", str(out)])
        with pytest.raises(ValueError, match=r"--out .* is \(inside\) an inference bundle's fo"):
            eval_command.command(args, load, None)
    other = tmp_path / "other"  # a bundle given by another path
    (other / "params").mkdir(parents=True)
    (other / "bundle.json").write_text("{}")
    args = parser.parse_args(["--bundle", str(bundle), "--synthetic", "2", "--out", str(other)])
    with pytest.raises(ValueError, match="inference bundle's folder"):
        eval_command.command(args, load, None)

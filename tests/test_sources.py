"""Sources: manifest JSONL/CSV, public layouts, open_source dispatch."""

import csv
import json
import logging
import os
import pickle
import unicodedata

import numpy as np
import pytest
import soundfile

from cacophony_jax.data.layouts import (
    audiocaps_source,
    clotho_source,
    esc50_source,
    urbansound8k_source,
)
from cacophony_jax.data.manifest import ManifestError, ManifestSource
from cacophony_jax.data.sources import ClipSource, SourceError, open_source


def _wav(path, n=160):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subtype = "VORBIS" if str(path).endswith(".ogg") else "PCM_16"
    soundfile.write(path, np.arange(n, dtype=np.int16), 16000, subtype=subtype)


def _csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_manifest_jsonl(tmp_path):
    _wav(str(tmp_path / "clips/a.wav"))
    elsewhere = tmp_path / "other" / "b.wav"
    _wav(str(elsewhere))
    manifest = tmp_path / "train.jsonl"
    _jsonl(manifest, [
        {"audio": "clips/a.wav", "captions": ["a dog barks", ""], "caption": "barking",
         "label": "dog", "synthetic_captions": ["dog outdoors"]},
        {"audio": str(elsewhere), "caption": "rain " * 5000, "label": ["rain", "dog"],
         "id": "clip-b", "duration": 3.5},
        {"audio": "clips/c.wav"},
    ])
    source = ManifestSource(manifest)
    assert len(source) == 3 and source.name == "train" and source.num_skipped == 0
    assert source.class_names == ("dog", "rain")
    assert source[0] == {
        "id": "clips/a.wav", "captions": ["a dog barks", "barking"],
        "synthetic_captions": ["dog outdoors"], "labels": [0],
        "audio_path": str(tmp_path / "clips" / "a.wav"),
    }
    assert source[1]["id"] == "clip-b" and source[1]["labels"] == [1, 0]
    assert source[1]["captions"] == ["rain " * 5000]  # long captions kept; tokenizer cuts
    assert source[1]["audio_path"] == str(elsewhere)
    assert source[2]["captions"] == [] and source[2]["labels"] == []
    assert source[np.int64(2)]["id"] == "clips/c.wav"
    with pytest.raises(IndexError):
        source[3]
    clone = pickle.loads(pickle.dumps(source))
    assert [clone[i] for i in range(3)] == [source[i] for i in range(3)]


def test_manifest_classes_file(tmp_path):
    (tmp_path / "classes.txt").write_text("rain\ndog\n\n")
    manifest = tmp_path / "m.jsonl"
    _jsonl(manifest, [{"audio": "a.wav", "label": "dog"}, {"audio": "b.wav", "label": "cat"}])
    with pytest.raises(ManifestError, match=r"line 2: label\(s\) \['cat'\] are not in classes"):
        ManifestSource(manifest)
    source = ManifestSource(manifest, skip_bad_rows=True)
    assert source.class_names == ("rain", "dog") and source[0]["labels"] == [1]
    assert len(source) == 1 and source.num_skipped == 1


def test_manifest_csv_merges_rows(tmp_path):
    manifest = tmp_path / "m.csv"
    _csv(str(manifest), ["audio", "caption", "label"], [
        ["x/1.wav", "a bell rings", "bell"],
        ["x/2.flac", "birds sing", "bird"],
        ["x/1.wav", "a bell, ringing twice", "bell"],
        ["x/1.wav", "", ""],
        ["x/1.wav", "a bell rings", "bell"],  # a repeated row
    ])
    source = ManifestSource(manifest)
    assert len(source) == 2 and source.class_names == ("bell", "bird")
    assert source[0]["captions"] == ["a bell rings", "a bell, ringing twice"]
    assert source[0]["labels"] == [0] and source[1]["labels"] == [1]
    assert source[1]["audio_path"] == str(tmp_path / "x" / "2.flac")


def test_manifest_misspelt_names_a_bom_and_spaced_headers(tmp_path, caplog):
    jsonl = tmp_path / "m.jsonl"
    rows = [{"audio": "a.wav", "captoins": ["a dog"], "raw": {}},
            {"audio": "b.wav", "caption": "rain", "lable": "rain"}]
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    with caplog.at_level(logging.WARNING):
        source = ManifestSource(jsonl)
    assert len(source) == 2 and source[0]["captions"] == []  # the BOM row is read
    assert "key 'captoins' is not read; did you mean 'captions'?" in caplog.text
    assert "key 'lable' is not read; did you mean 'label'?" in caplog.text
    assert "'raw'" not in caplog.text  # other keys are ignored quietly
    caplog.clear()
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("audio, caption , label\nx.wav,a bell,bell\n")
    source = ManifestSource(spaced)
    assert source[0]["captions"] == ["a bell"] and source.class_names == ("bell",)
    misspelt = tmp_path / "misspelt.csv"
    misspelt.write_text("audio,Caption,labels\nx.wav,a bell,bell\n")
    with caplog.at_level(logging.WARNING):
        ManifestSource(misspelt)
    assert "column 'Caption' is not read; did you mean 'caption'?" in caplog.text
    assert "column 'labels' is not read; did you mean 'label'?" in caplog.text
    assert "has no caption column (columns: audio, Caption, labels)" in caplog.text


def test_manifest_bad_rows(tmp_path, caplog):
    manifest = tmp_path / "m.jsonl"
    _jsonl(manifest, [
        {"audio": "ok1.wav", "caption": "fine"},
        "{not json",
        {"caption": "no audio"},
        {"audio": "x.wav", "captions": ["ok", 3]},
        {"audio": "y.wav", "captions": "one string"},
        {"audio": "ok2.wav", "captions": ["also fine"]},
        "[1, 2]",
        {"audio": "z.wav", "label": 5},
    ])
    with pytest.raises(ManifestError) as info:
        ManifestSource(manifest)
    message = str(info.value)
    assert str(manifest) in message and "6 bad row(s)" in message
    for line in ("line 2:", "line 3:", "line 4:", "line 5:", "line 7:"):
        assert line in message
    assert "and 1 more" in message and "skip_bad_rows=True" in message
    with caplog.at_level(logging.WARNING):
        source = ManifestSource(manifest, skip_bad_rows=True)
    assert source.num_skipped == 6 and len(source) == 2
    assert [source[i]["id"] for i in range(2)] == ["ok1.wav", "ok2.wav"]
    assert "skipped 6 bad row(s)" in caplog.text


def test_manifest_unusable(tmp_path):
    empty = tmp_path / "empty.jsonl"
    _jsonl(empty, ["{}"])
    with pytest.raises(ManifestError, match="no usable rows"):
        ManifestSource(empty, skip_bad_rows=True)
    with pytest.raises(ManifestError, match="does not exist"):
        ManifestSource(tmp_path / "missing.jsonl")
    with pytest.raises(ManifestError, match="is a folder; a manifest is a .jsonl or .csv"):
        ManifestSource(tmp_path)
    (tmp_path / "m.txt").write_text("a.wav\n")
    with pytest.raises(ManifestError, match="unknown extension"):
        ManifestSource(tmp_path / "m.txt")
    _csv(str(tmp_path / "h.csv"), ["path", "caption"], [["a.wav", "x"]])
    with pytest.raises(ManifestError, match="columns audio, caption"):
        ManifestSource(tmp_path / "h.csv")


def test_audiocaps(tmp_path, caplog):
    header = ["audiocap_id", "youtube_id", "start_time", "caption"]
    _csv(str(tmp_path / "train.csv"), header, [
        ["11", "abc", "30", "a car passes"],
        ["12", "def", "0", "people talk"],
        ["13", "ghi", "10", "music plays"],
        ["14", "jkl", "20", "a cat meows"],
        ["15", "mno", "40", "lost clip"],
    ])
    _wav(str(tmp_path / "audio/train/abc.wav"))
    _wav(str(tmp_path / "audio/train/def_0.flac"))
    _wav(str(tmp_path / "audio/train/Yghi.wav"))
    _wav(str(tmp_path / "audio/train/14.ogg"))
    with caplog.at_level(logging.WARNING):
        source = audiocaps_source(tmp_path, "train")
    assert source.name == "audiocaps/train" and len(source) == 4 and source.num_missing == 1
    assert "1 of 5 clips have no audio" in caplog.text
    names = [os.path.basename(source[i]["audio_path"]) for i in range(4)]
    assert names == ["abc.wav", "def_0.flac", "Yghi.wav", "14.ogg"]
    assert [source[i]["id"] for i in range(4)] == ["abc", "def", "ghi", "jkl"]
    assert source.class_names == ()

    _csv(str(tmp_path / "test.csv"), header,
         [[str(k), "abc", "30.0", f"caption {k}"] for k in range(5)])
    _wav(str(tmp_path / "audio/test/abc_30.wav"))
    test = audiocaps_source(tmp_path, "test")
    assert audiocaps_source(tmp_path, "eval").name == "audiocaps/test"  # the config default
    assert len(test) == 1 and test[0]["captions"] == [f"caption {k}" for k in range(5)]
    with pytest.raises(SourceError, match=r"val\.csv, which does not exist"):
        audiocaps_source(tmp_path, "validation")
    with pytest.raises(SourceError, match="splits"):
        audiocaps_source(tmp_path, "dev")
    assert source.missing_ids == ["mno"]
    # AudioSet's segment names, as AudioSet downloaders write them.
    _csv(str(tmp_path / "val.csv"), header, [["21", "abc", "30", "x"], ["22", "-d_e", "0", "y"]])
    _wav(str(tmp_path / "audio/val/Yabc_30.000_40.000.wav"))
    _wav(str(tmp_path / "audio/val/-d_e_0.000_10.000.flac"))
    val = audiocaps_source(tmp_path, "val")
    assert [os.path.basename(val[i]["audio_path"]) for i in range(2)] == [
        "Yabc_30.000_40.000.wav", "-d_e_0.000_10.000.flac"]


def test_audiocaps_as_downloaders_lay_it_out(tmp_path):
    # root/test/<audiocap_id>.<ext> (no audio/ level), upper-case extensions.
    _csv(str(tmp_path / "test.csv"), ["audiocap_id", "youtube_id", "start_time", "caption"],
         [["101", "abc", "30", "a car"], ["102", "def", "0", "a dog"], ["103", "xyz", "0", "x"]])
    _wav(str(tmp_path / "test" / "101.WAV"))
    _wav(str(tmp_path / "test" / "def.flac"))
    source = audiocaps_source(tmp_path, "test")
    assert len(source) == 2 and source.missing_ids == ["xyz"]
    assert source[0]["audio_path"] == str(tmp_path / "test" / "101.WAV")
    os.remove(tmp_path / "test" / "101.WAV")
    os.remove(tmp_path / "test" / "def.flac")
    _wav(str(tmp_path / "test" / "abc-30.wav"))  # a naming not recognised
    with pytest.raises(SourceError, match=r"no audio found under .*audio/test \(it does not "
                                          r"exist; .*also looked in .*test"):
        audiocaps_source(tmp_path, "test")


def test_clotho(tmp_path):
    header = ["file_name"] + [f"caption_{k}" for k in range(1, 6)]
    rows = [["a b.wav"] + [f"a{k}" for k in range(5)], ["c.wav"] + [f"c{k}" for k in range(5)]]
    _csv(str(tmp_path / "clotho_captions_evaluation.csv"), header, rows)
    _wav(str(tmp_path / "evaluation/a b.wav"))
    _wav(str(tmp_path / "evaluation/c.wav"))
    source = clotho_source(tmp_path, "test")
    assert source.name == "clotho/evaluation" and len(source) == 2
    assert source[0]["captions"] == ["a0", "a1", "a2", "a3", "a4"] and source[0]["id"] == "a b.wav"
    assert source[1]["audio_path"] == str(tmp_path / "evaluation" / "c.wav")
    with pytest.raises(SourceError, match="clotho_captions_development.csv"):
        clotho_source(tmp_path, "development")
    # A copy split over two of the folders looked in is whole.
    os.rename(tmp_path / "evaluation/c.wav", tmp_path / "c.wav")
    split_copy = clotho_source(tmp_path, "evaluation")
    assert len(split_copy) == 2 and split_copy.num_missing == 0
    assert split_copy[1]["audio_path"] == str(tmp_path / "c.wav")
    os.remove(tmp_path / "evaluation/a b.wav")
    os.remove(tmp_path / "c.wav")
    with pytest.raises(SourceError, match="no audio found"):
        clotho_source(tmp_path, "evaluation")
    # Unpacked on macOS: names in decomposed Unicode (NFD), the CSV composed (NFC).
    _csv(str(tmp_path / "clotho_captions_validation.csv"), header,
         [["Café – Zürich.wav"] + [f"z{k}" for k in range(5)]])
    nfd = unicodedata.normalize("NFD", "Café – Zürich.wav")
    _wav(str(tmp_path / "clotho_audio_validation" / nfd))
    found = clotho_source(tmp_path, "validation")
    assert len(found) == 1 and found.num_missing == 0 and found[0]["id"] == "Café – Zürich.wav"
    _csv(str(tmp_path / "clotho_captions_validation.csv"), header,
         [[name] + [f"z{k}" for k in range(5)] for name in ("Café – Zürich.wav",
                                                             "Café – Zürich.WAV")])
    assert len(clotho_source(tmp_path, "validation")) == 1  # one file, evaluated once
    assert found[0]["audio_path"] == str(tmp_path / "clotho_audio_validation" / nfd)
    # A hand-edited copy with an unquoted comma in a caption: its captions would shift.
    (tmp_path / "clotho_captions_validation.csv").write_text(
        ",".join(header) + "\nCafé – Zürich.wav,a dog barks, loudly,c2,c3,c4,c5\n")
    with pytest.raises(SourceError, match="data row 1 has more fields than the header"):
        clotho_source(tmp_path, "validation")
    # Empty trailing fields (a spreadsheet's export) shift nothing.
    (tmp_path / "clotho_captions_validation.csv").write_text(
        ",".join(header) + "\nCafé – Zürich.wav,z0,z1,z2,z3,z4,,\n")
    assert clotho_source(tmp_path, "validation")[0]["captions"] == [f"z{k}" for k in range(5)]


def test_esc50(tmp_path):
    _csv(str(tmp_path / "meta/esc50.csv"),
         ["filename", "fold", "target", "category", "esc10", "src_file", "take"], [
             ["1-1-A-1.wav", "1", "1", "crying_baby", "True", "1", "A"],
             ["2-2-A-0.wav", "2", "0", "dog", "True", "2", "A"],
             ["1-3-A-0.wav", "1", "0", "dog", "True", "3", "A"],
         ])
    for name in ("1-1-A-1.wav", "2-2-A-0.wav", "1-3-A-0.wav"):
        _wav(str(tmp_path / "audio" / name))
    source = esc50_source(tmp_path)
    assert source.class_names == ("dog", "crying baby") and len(source) == 3
    assert [source[i]["labels"] for i in range(3)] == [[1], [0], [0]]
    assert source[0]["captions"] == [] and source[0]["id"] == "1-1-A-1.wav"
    fold1 = esc50_source(tmp_path, folds=[1])
    assert [fold1[i]["id"] for i in range(len(fold1))] == ["1-1-A-1.wav", "1-3-A-0.wav"]
    assert fold1.class_names == source.class_names
    with pytest.raises(SourceError, match=r"folds \[1, 2\]"):
        esc50_source(tmp_path, folds=[7])
    # A split names folds (as `curate build --input x=esc50:PATH:fold1` gives it).
    from cacophony_jax.data.sources import open_source

    assert len(open_source("esc50", str(tmp_path), "fold1")) == 2
    assert len(open_source("esc50", str(tmp_path), "folds1-2")) == 3
    assert len(open_source("esc50", str(tmp_path), "train")) == 3
    with pytest.raises(SourceError, match="esc50 has folds, not splits: 'fold_a' names none"):
        open_source("esc50", str(tmp_path), "fold_a")
    with pytest.raises(SourceError, match=r"meta.esc50\.csv, which does not exist"):
        esc50_source(tmp_path / "nowhere")
    _csv(str(tmp_path / "bad/meta/esc50.csv"), ["filename", "fold", "target", "category"],
         [["a.wav", "1", "dog", "dog"]])
    with pytest.raises(SourceError, match="fold/target must be integers"):
        esc50_source(tmp_path / "bad")


def test_urbansound8k(tmp_path, caplog):
    header = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
    _csv(str(tmp_path / "metadata/UrbanSound8K.csv"), header, [
        ["100-1-0-0.wav", "100", "0", "1", "1", "5", "1", "car_horn"],
        ["200-0-0-0.wav", "200", "0", "1", "1", "2", "0", "air_conditioner"],
        ["300-0-0-0.wav", "300", "0", "1", "1", "2", "0", "air_conditioner"],
    ])
    _wav(str(tmp_path / "audio/fold5/100-1-0-0.wav"))
    _wav(str(tmp_path / "audio/fold2/200-0-0-0.wav"))
    with caplog.at_level(logging.WARNING):
        source = urbansound8k_source(tmp_path)
    assert source.class_names == ("air conditioner", "car horn")
    assert len(source) == 2 and source.num_missing == 1 and "1 of 3 clips" in caplog.text
    assert source[0]["audio_path"] == str(tmp_path / "audio" / "fold5" / "100-1-0-0.wav")
    assert source[0]["labels"] == [1] and source[1]["labels"] == [0]
    assert len(urbansound8k_source(tmp_path, folds=[5])) == 1


def test_open_source(tmp_path):
    manifest = tmp_path / "m.jsonl"
    _jsonl(manifest, [{"audio": "a.wav", "caption": "x"}, "oops"])
    source = open_source("manifest", str(manifest), skip_bad_rows=True)
    assert isinstance(source, ManifestSource) and source.num_skipped == 1
    _csv(str(tmp_path / "meta/esc50.csv"), ["filename", "fold", "target", "category"],
         [["a.wav", "1", "0", "dog"], ["b.wav", "2", "0", "dog"]])
    _wav(str(tmp_path / "audio/a.wav"))
    _wav(str(tmp_path / "audio/b.wav"))
    esc = open_source("esc50", tmp_path, split="test", folds=[2])
    assert isinstance(esc, ClipSource) and len(esc) == 1 and esc[0]["id"] == "b.wav"
    with pytest.raises(SourceError, match=r"unknown source kind 'cloto' \(did you mean 'clotho'"):
        open_source("cloto", str(tmp_path))
    with pytest.raises(SourceError, match="valid kinds: .*'urbansound8k'"):
        open_source("zzz")
    with pytest.raises(SourceError, match=r"takes options \['folds'\], not \['fold'\]"):
        open_source("esc50", str(tmp_path), fold=[1])
    with pytest.raises(SourceError, match="needs a path"):
        open_source("clotho")


def test_open_source_synthetic():
    synthetic = pytest.importorskip("cacophony_jax.data.synthetic")
    source = open_source("synthetic", split="train", size=3, clip_seconds=1.0, seed=0)
    assert isinstance(source, synthetic.SyntheticCorpus) and len(source) == 3


def test_a_path_for_the_synthetic_kind_is_refused():
    from cacophony_jax.tasks import common
    from tests.helpers import tiny_config

    config = tiny_config("mae", 2, **{"data.train.path": "data/train.jsonl"})
    with pytest.raises(ValueError, match="config.data.train.path='data/train.jsonl' is set "
                                         "but config.data.train.kind is 'synthetic'"):
        common.open_train_source(config)
    assert common.open_eval_source(config) is not None  # the eval block is untouched


def test_synthetic_evaluation_of_a_run_on_real_data_is_pointed_out(caplog):
    from cacophony_jax.tasks import common
    from tests.helpers import tiny_config

    with caplog.at_level(logging.WARNING):
        common.open_eval_source(tiny_config("mae", 2))
        assert "synthetic corpus" not in caplog.text
        common.open_eval_source(tiny_config("mae", 2, **{"data.train.kind": "manifest"}))
    assert "evaluating on the embedded synthetic corpus" in caplog.text
    assert "while training on manifest data" in caplog.text

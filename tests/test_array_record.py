"""array_record datasets: write/read round trip, sharding, atomicity, errors."""

import os
import pickle
import sys
import types

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from cacophony_jax.data.array_record import (
    DATASET_NAME,
    ArrayRecordError,
    ArrayRecordSource,
)
from cacophony_jax.data.array_record_write import write_array_record
from cacophony_jax.data.sources import open_source

CLASSES = ("dog", "rain", "car horn")


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        audio = rng.integers(-32768, 32768, size=k * 3 + 1, dtype=np.int16)
        audio[0] = -32768 if k % 2 else 32767
        out.append({
            "id": f"clip-{k}",
            "captions": [f"caption {k} ünï 你好", "second"] if k % 3 else [],
            "synthetic_captions": ["synthetic"] if k % 2 else [],
            "labels": [k % 3, 0] if k % 2 else [],
            "audio": audio,
        })
    return out


def _shards(path, split):
    return sorted(f for f in os.listdir(path)
                  if f.startswith(f"{DATASET_NAME}-{split}.array_record"))


def _texts(path, split):
    return sorted(f for f in os.listdir(path) if f.startswith(f"{DATASET_NAME}-{split}.texts"))


def test_round_trip_bit_exact(tmp_path):
    records = _records(7)
    path = write_array_record(iter(records), tmp_path / "ds", "train", 3, CLASSES)
    assert path == str(tmp_path / "ds")
    source = ArrayRecordSource(path, "train")
    assert len(source) == 7 and source.class_names == CLASSES and source.name == "ds/train"
    for k, want in enumerate(records):
        got = source[k]
        assert got.keys() == {"id", "captions", "synthetic_captions", "labels", "audio"}
        assert got["audio"].dtype == np.int16
        np.testing.assert_array_equal(got["audio"], want["audio"])
        assert {key: got[key] for key in got if key != "audio"} == {
            key: want[key] for key in want if key != "audio"}
    assert source[np.int32(6)]["id"] == "clip-6"
    with pytest.raises(IndexError):
        source[7]
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone[5]["audio"], records[5]["audio"])
    # Plain TFDS reads the same folder, shard by shard (0,3,6 | 1,4 | 2,5).
    plain = tfds.builder_from_directory(path).as_data_source("train")
    assert [plain[i]["id"] for i in range(7)] == [
        f"clip-{k}".encode() for k in (0, 3, 6, 1, 4, 2, 5)]
    reopened = open_source("array_record", path, split="train")
    assert reopened[2]["captions"] == records[2]["captions"]


def test_captions_and_labels_are_read_without_the_audio(tmp_path, monkeypatch, caplog):
    records = _records(7)
    path = write_array_record(iter(records), tmp_path / "ds", "train", 3, CLASSES)
    source = ArrayRecordSource(path, "train")
    want = [{key: r[key] for key in r if key != "audio"} for r in records]
    reads = []
    real_getitem = ArrayRecordSource.__getitem__
    monkeypatch.setattr(ArrayRecordSource, "__getitem__",
                        lambda self, i: reads.append(i) or real_getitem(self, i))
    assert list(source.iter_metadata()) == want
    assert len(reads) == 2  # the first and last ids, to check the texts file fits
    assert [row["id"] for row in open_source("array_record", path, "train").iter_metadata()
            ] == [r["id"] for r in records]
    # A texts file that does not match its split (or a split written without one) is
    # not trusted: the records are read instead, with a warning that says how to fix it.
    texts = tmp_path / "ds" / _texts(path, "train")[0]
    lines = texts.read_text().splitlines(keepends=True)
    for broken in (lines[:-1], [lines[1], *lines[1:]], lines[:3] + ["{not json\n"] + lines[4:]):
        texts.write_text("".join(broken))
        reads.clear()
        caplog.clear()
        assert list(ArrayRecordSource(path, "train").iter_metadata()) == want
        assert len(reads) >= 7 and "curate build --overwrite" in caplog.text
    texts.unlink()
    assert list(ArrayRecordSource(path, "train").iter_metadata()) == want
    assert "no texts file" in caplog.text


def test_shards_balanced(tmp_path):
    write_array_record(_records(10), tmp_path, "train", 4, CLASSES)
    info = tfds.builder_from_directory(str(tmp_path)).info
    assert list(info.splits["train"].shard_lengths) == [3, 3, 2, 2]
    assert _shards(tmp_path, "train") == [
        f"{DATASET_NAME}-train.array_record-0000{s}-of-00004" for s in range(4)]
    # More shards than records: the empty ones are dropped and the rest renumbered.
    write_array_record(_records(2), tmp_path, "test", 5, CLASSES)
    assert _shards(tmp_path, "test") == [
        f"{DATASET_NAME}-test.array_record-0000{s}-of-00002" for s in range(2)]
    test = ArrayRecordSource(tmp_path, "test")
    assert [test[i]["id"] for i in range(2)] == ["clip-0", "clip-1"]
    assert len(ArrayRecordSource(tmp_path, "train")) == 10
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".incomplete")]


def test_splits_and_class_names(tmp_path):
    write_array_record(_records(3), tmp_path, "train", 2, CLASSES)
    with pytest.raises(ArrayRecordError, match="already holds split 'train'"):
        write_array_record(_records(3), tmp_path, "train", 2, CLASSES)
    with pytest.raises(ArrayRecordError, match="same class names"):
        write_array_record(_records(3), tmp_path, "test", 2, ("dog",))
    write_array_record(_records(4, seed=1), tmp_path, "validation", 1, CLASSES)
    assert len(ArrayRecordSource(tmp_path, "validation")) == 4
    assert len(ArrayRecordSource(tmp_path, "train")) == 3
    with pytest.raises(ArrayRecordError, match=r"has splits \['train', 'validation'\]"):
        ArrayRecordSource(tmp_path, "test")


def test_interrupted_write_leaves_nothing_readable(tmp_path):
    def dies_midway(records):
        yield from records
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_array_record(dies_midway(_records(5)), tmp_path / "ds", "train", 2, CLASSES)
    assert os.listdir(tmp_path / "ds") == []
    with pytest.raises(ArrayRecordError, match="not an array_record dataset"):
        ArrayRecordSource(tmp_path / "ds", "train")
    write_array_record(_records(3), tmp_path / "ds", "train", 2, CLASSES)
    with pytest.raises(KeyboardInterrupt):
        write_array_record(dies_midway(_records(5)), tmp_path / "ds", "test", 2, CLASSES)
    assert len(ArrayRecordSource(tmp_path / "ds", "train")) == 3
    with pytest.raises(ArrayRecordError, match="not 'test'"):
        ArrayRecordSource(tmp_path / "ds", "test")
    assert _shards(tmp_path / "ds", "test") == []


def test_overwrite_replaces_one_split_and_keeps_the_old_until_done(tmp_path, monkeypatch):
    ds = tmp_path / "ds"
    write_array_record(_records(3), ds, "train", 2, CLASSES)
    write_array_record(_records(2), ds, "test", 1, CLASSES)

    def dies_midway(records):
        yield from records
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_array_record(dies_midway(_records(5, seed=1)), ds, "train", 2, CLASSES,
                           overwrite=True)
    assert len(ArrayRecordSource(ds, "train")) == 3  # the old split is untouched
    # A rewrite killed during its commit: the new shards were moved in, dataset_info.json
    # was not replaced. The old split is still the one read.
    real_replace = os.replace

    def stop_at_commit(src, dst):
        if os.path.basename(dst) == "dataset_info.json":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", stop_at_commit)
    with pytest.raises(KeyboardInterrupt):
        write_array_record(_records(5, seed=1), ds, "train", 3, CLASSES, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(ArrayRecordSource(ds, "train")) == 3 and len(_shards(ds, "train")) == 5
    # Rewritten for real: new records, new shard names (past the killed write's r1); the
    # test split is kept and the leftover and replaced shards are gone.
    write_array_record(_records(5, seed=1), ds, "train", 3, CLASSES, overwrite=True)
    train = ArrayRecordSource(ds, "train")
    expected = _records(5, seed=1)
    assert len(train) == 5 and all(
        np.array_equal(train[i]["audio"], expected[i]["audio"]) for i in range(5))
    assert _shards(ds, "train") == [
        f"{DATASET_NAME}-train.array_record-r2-0000{s}-of-00003" for s in range(3)]
    assert _texts(ds, "train") == [f"{DATASET_NAME}-train.texts-r2.jsonl"]
    assert [r["id"] for r in train.iter_metadata()] == [r["id"] for r in expected]
    assert len(ArrayRecordSource(ds, "test")) == 2
    write_array_record(_records(1), ds, "train", 1, CLASSES, overwrite=True)
    assert _shards(ds, "train") == [f"{DATASET_NAME}-train.array_record-r3-00000-of-00001"]
    # Other splits pin the class names; a dataset's only split may change them.
    with pytest.raises(ArrayRecordError, match="same class names"):
        write_array_record(_records(1), ds, "train", 1, ("dog",), overwrite=True)
    write_array_record(_records(1), tmp_path / "one", "train", 1, CLASSES)
    write_array_record([{**_records(1)[0], "labels": [0]}], tmp_path / "one", "train", 1,
                       ("dog",), overwrite=True)
    assert ArrayRecordSource(tmp_path / "one", "train").class_names == ("dog",)


def test_damaged_shards_are_named_when_opened_and_a_bad_record_is_one_error(tmp_path):
    ds = tmp_path / "ds"
    write_array_record(_records(9), ds, "train", 3, CLASSES)
    shards = [ds / name for name in _shards(ds, "train")]
    middle = shards[1].read_bytes()
    shards[1].unlink()  # deleted after the build
    with pytest.raises(ArrayRecordError, match=r"shard 1 of split 'train' .* cannot be read "
                                               r".*curate build --overwrite"):
        ArrayRecordSource(ds, "train")
    shards[1].write_bytes(middle[: len(middle) // 2])  # truncated (a copy cut short)
    with pytest.raises(ArrayRecordError, match="shard 1 of split 'train'"):
        ArrayRecordSource(ds, "train")
    # Damaged inside a record's data: the source opens; that record is one
    # ArrayRecordError (which training skips and counts), the others read.
    records = _records(9)
    records[7]["audio"] = np.full(4000, 12345, np.int16)  # shard 1's 3rd, found by its bytes
    write_array_record(records, tmp_path / "ds2", "train", 3, CLASSES)
    shard = tmp_path / "ds2" / _shards(tmp_path / "ds2", "train")[1]
    data = bytearray(shard.read_bytes())
    at = data.index(np.full(64, 12345, "<i2").tobytes()) + 1000
    data[at:at + 16] = bytes(16)
    shard.write_bytes(bytes(data))
    source = ArrayRecordSource(tmp_path / "ds2", "train")
    outcomes = []
    for i in range(9):
        try:
            outcomes.append(source[i]["id"])
        except ArrayRecordError as e:
            outcomes.append(str(e))
    assert outcomes[0] == "clip-0" and outcomes[4] == "clip-4"
    # Named by the index asked for and by its place in the shard file that holds it.
    assert outcomes[7].startswith(f"ds2/train record 7 (entry 2 of {shard.name}) cannot be "
                                  "read (")
    source._round_robin = False  # as a split written before records were dealt in turn
    with pytest.raises(ArrayRecordError, match=rf"record 5 \(entry 2 of {shard.name}\) "):
        source[5]


def test_bad_records(tmp_path):
    bad_label = _records(2)
    bad_label[1]["labels"] = [3]
    with pytest.raises(ArrayRecordError, match=r"'clip-1': labels \[3\] do not index the 3"):
        write_array_record(bad_label, tmp_path, "train", 1, CLASSES)
    bad_audio = _records(1)
    bad_audio[0]["audio"] = bad_audio[0]["audio"].astype(np.float32)
    with pytest.raises(ArrayRecordError, match="'clip-0': inline audio must be int16"):
        write_array_record(bad_audio, tmp_path, "train", 1, CLASSES)
    no_audio = [{"id": "x", "captions": []}]
    with pytest.raises(ArrayRecordError, match="neither 'audio' nor 'audio_path'"):
        write_array_record(no_audio, tmp_path, "train", 1)
    with pytest.raises(ArrayRecordError, match="no clips were written"):
        write_array_record([], tmp_path, "train", 1)
    with pytest.raises(ArrayRecordError, match="split name"):
        write_array_record(_records(1), tmp_path, "tr-ain", 1, CLASSES)
    assert os.listdir(tmp_path) == []


def test_audio_paths_failures_counted(tmp_path, monkeypatch, caplog):
    # A stand-in decoder: files named *bad* fail the way load_audio reports errors.
    fake = types.ModuleType("cacophony_jax.audio.io")

    class AudioError(ValueError):
        pass

    def load_audio(path, sample_rate=16000):
        if "bad" in path:
            raise AudioError(f"cannot decode {path}")
        return np.full(4, len(path), np.int16)

    fake.AudioError, fake.load_audio = AudioError, load_audio
    monkeypatch.setitem(sys.modules, "cacophony_jax.audio.io", fake)
    records = [{"id": name, "captions": [name], "synthetic_captions": [], "labels": [],
                "audio_path": f"/clips/{name}.wav"} for name in ("a", "bad1", "bc", "bad2")]
    with caplog.at_level("WARNING"):
        write_array_record(records, tmp_path, "train", 2, num_workers=2)
    source = ArrayRecordSource(tmp_path, "train")
    assert [source[i]["id"] for i in range(len(source))] == ["a", "bc"]
    assert source[1]["audio"].tolist() == [13, 13, 13, 13]
    assert "skipped 2 clip(s)" in caplog.text and "bad2" in caplog.text


def test_audio_paths_real_decoder(tmp_path):
    pytest.importorskip("cacophony_jax.audio.io")
    audio = np.array([0, 1, -1, 32767, -32768, 1234], np.int16)
    soundfile.write(tmp_path / "a.wav", audio, 16000, subtype="PCM_16")
    record = {"id": "a", "captions": ["x"], "synthetic_captions": [], "labels": [],
              "audio_path": str(tmp_path / "a.wav")}
    write_array_record([record], tmp_path / "ds", "train", 1)
    np.testing.assert_array_equal(ArrayRecordSource(tmp_path / "ds", "train")[0]["audio"], audio)


def test_foreign_or_missing(tmp_path):
    with pytest.raises(ArrayRecordError, match="not an array_record dataset"):
        ArrayRecordSource(tmp_path / "nowhere", "train")
    (tmp_path / "dataset_info.json").write_text("{broken")
    with pytest.raises(ArrayRecordError, match="cannot read the TFDS metadata"):
        ArrayRecordSource(tmp_path, "train")

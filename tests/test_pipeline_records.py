"""Reading records: clips decoded from windows of long files, bad records skipped and counted."""

import numpy as np
import pytest
import soundfile

from cacophony_jax.audio import io
from cacophony_jax.data import pipeline
from tests.test_pipeline import CLIP, IndexSource, make, record_ids, take


def test_long_files_are_cropped_from_a_decoded_window(tmp_path, monkeypatch):
    from cacophony_jax.data import manifest

    # Sample i of the 60 s file holds i // 32 - 16384, so a clip shows where it starts.
    ramp = (np.arange(16000 * 60) // 32 - 16384).astype(np.int16)
    soundfile.write(tmp_path / "long.wav", ramp, 16000, subtype="PCM_16")
    (tmp_path / "m.jsonl").write_text('{"audio": "long.wav", "captions": ["a"]}\n')
    source = manifest.ManifestSource(str(tmp_path / "m.jsonl"))
    read = []
    real_read = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda self, frames=-1, **kw:
                        read.append(frames) or real_read(self, frames, **kw))
    fmt = pipeline.ExampleFormat(clip_samples=16000)
    rows = [row for b in take(make(source, fmt=fmt), 4) for row in b["audio"]]
    starts = []
    for row in rows:
        start = (int(row[0]) + 16384) * 32
        start += int(np.argmax(ramp[start:start + 32] == row[0]))
        candidates = [s for s in range(start, start + 32) if np.array_equal(
            ramp[s:s + 16000], row)]
        assert candidates, "a crop that is not a slice of the file"
        starts.append(candidates[0])
    assert len(set(starts)) == len(rows) and max(starts) > 16000 * 30  # all over the file
    assert read and set(read) == {16000}  # one clip decoded per draw, never the whole file
    # Evaluation takes the file's first clip, also without decoding the rest (the
    # training iterator's read-ahead threads may still be reading clips too).
    read.clear()
    batch = next(pipeline.eval_batches(source, 16000, global_batch_size=1, read_threads=1))
    np.testing.assert_array_equal(batch["audio"][0], ramp[:16000])
    assert read and set(read) == {16000}


def test_undecodable_records_are_skipped_and_counted(tmp_path):
    from cacophony_jax.data import manifest

    good = tmp_path / "good.wav"
    soundfile.write(good, np.full(3000, 7, np.int16), 16000, subtype="PCM_16")
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav file")
    lines = ['{"audio": "good.wav", "captions": ["fine"]}',
             '{"audio": "broken.wav", "captions": ["bad"]}',
             '{"audio": "missing.wav", "captions": ["gone"]}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    source = manifest.ManifestSource(str(tmp_path / "m.jsonl"))
    batches = take(make(source, batch=3), 3)
    assert all(np.all(b["audio"][:, :CLIP] == 7) for b in batches)
    failed = sum(int(b["num_failed"].sum()) for b in batches)
    assert failed == 6  # each epoch (one batch of 3) draws both bad records once
    # Nothing readable: one error naming the cause, not an endless search.
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[1:]) + "\n")
    source = manifest.ManifestSource(str(tmp_path / "bad.jsonl"))
    with pytest.raises(io.AudioError, match="records of bad tried for one draw all failed .*"
                                            "the last with: .*Check the data paths"):
        take(make(source, batch=2), 1)


def test_a_record_that_fails_to_decode_is_not_read_again(tmp_path, monkeypatch, caplog):
    from cacophony_jax.data import manifest

    soundfile.write(tmp_path / "good.wav", np.full(3000, 7, np.int16), 16000, subtype="PCM_16")
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav file")
    # long.wav fails once its crop is drawn (a damaged window: another crop may decode).
    soundfile.write(tmp_path / "long.wav", np.full(48000, 5, np.int16), 16000, subtype="PCM_16")
    rows = ["good", "broken", "long"]
    (tmp_path / "m.jsonl").write_text("".join(
        f'{{"audio": "{name}.wav", "captions": ["x"]}}\n' for name in rows))
    opened = []
    real = io.load_audio_clip

    def load_audio_clip(path, length, choose_start, **kw):
        if path.startswith(str(tmp_path)):  # not a reader thread another test left running
            opened.append(path.rsplit("/", 1)[-1])
        if path.endswith("long.wav"):
            choose_start(48000)
            raise io.AudioError(f"cannot decode the window of {path}")
        return real(path, length, choose_start, **kw)

    monkeypatch.setattr(io, "load_audio_clip", load_audio_clip)
    decoded = pipeline.DecodedSource(manifest.ManifestSource(str(tmp_path / "m.jsonl")))
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING"):
        draws = [decoded.draw(1, CLIP, rng) for _ in range(4)]
    # Every draw is replaced and counted; the file is read (and warned about) once.
    assert [d["num_failed"] for d in draws] == [1] * 4
    assert all(np.all(d["audio"] == 7) for d in draws)
    assert opened.count("broken.wav") == 1
    assert len(caplog.records) == 1
    assert "skipping record 1 of m from now on, without reading it again (failure 1 of " \
           "this process): cannot decode" in caplog.text
    # A failure after the crop is drawn may not recur with another crop: tried again.
    for _ in range(3):
        assert decoded.draw(2, CLIP, rng)["num_failed"] == 1
    assert opened.count("long.wav") == 3
    # Nothing usable: still one clear error after the tries, also from memory.
    (tmp_path / "bad.jsonl").write_text('{"audio": "broken.wav", "captions": ["x"]}\n')
    decoded = pipeline.DecodedSource(manifest.ManifestSource(str(tmp_path / "bad.jsonl")))
    opened.clear()
    for _ in range(2):
        with pytest.raises(io.AudioError, match="tried for one draw all failed.*broken.wav"):
            decoded.draw(0, CLIP, rng)
    assert opened == ["broken.wav"]


@pytest.mark.skipif(not io._MP3_SUPPORTED, reason="libsndfile without MP3")
def test_a_damaged_mp3_is_decoded_and_reported_once(tmp_path, capfd, caplog):
    from cacophony_jax.data import manifest

    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(22050) / 44100)
    soundfile.write(tmp_path / "damaged.mp3", wave, 44100, format="MP3",
                    subtype="MPEG_LAYER_III")
    data = bytearray((tmp_path / "damaged.mp3").read_bytes())
    middle = len(data) // 2
    data[middle - 1200:middle + 1200] = b"\x55" * 2400  # no frame sync to resume at
    (tmp_path / "damaged.mp3").write_bytes(bytes(data))
    soundfile.write(tmp_path / "good.wav", np.full(3000, 7, np.int16), 16000, subtype="PCM_16")
    (tmp_path / "m.jsonl").write_text('{"audio": "good.wav", "captions": ["x"]}\n'
                                      '{"audio": "damaged.mp3", "captions": ["x"]}\n')
    decoded = pipeline.DecodedSource(manifest.ManifestSource(str(tmp_path / "m.jsonl")))
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING"):
        assert decoded.draw(1, 16000, rng)["num_failed"] == 1
        capfd.readouterr()  # libmpg123's lines about the file, written by the C library
        assert [decoded.draw(1, 16000, rng)["num_failed"] for _ in range(3)] == [1] * 3
    assert capfd.readouterr().err == ""  # not decoded again, so not heard from again
    [warning] = caplog.records
    assert "damaged.mp3" in warning.getMessage()
    assert "from now on, without reading it again" in warning.getMessage()
    assert "libmpg123 may have printed lines about it on stderr" in warning.getMessage()


def test_a_run_of_bad_records_is_replaced_from_all_over_the_source():
    class Gap(IndexSource):  # records 10-79 missing (a folder not downloaded), 5 too short
        def __getitem__(self, i):
            if 10 <= i < 80:
                raise io.AudioError(f"clip {i} does not exist")
            record = super().__getitem__(i)
            if i == 5:
                record["audio"] = record["audio"][:100]
            return record

    decoded = pipeline.DecodedSource(Gap(100))
    stand_ins = [record_ids({"audio": decoded[i]["audio"][None]})[0] for i in range(5, 80)]
    assert not {5, *range(10, 80)} & set(stand_ins)  # only usable records stand in
    # Spread over the source, not the first good record after the gap 70 times.
    assert max(stand_ins.count(r) for r in set(stand_ins)) <= 8 and len(set(stand_ins)) >= 15
    assert decoded[3]["num_failed"] == 0 and decoded[40]["num_failed"] == 1


def test_a_record_failed_by_two_reader_threads_at_once_is_warned_about_once(caplog):
    import pickle
    import threading

    both_in = threading.Barrier(2, timeout=10)

    class Damaged(IndexSource):  # record 3 fails, read by both threads before either fails
        def __getitem__(self, i):
            if i == 3:
                both_in.wait()
                raise io.AudioError("record 3 is damaged")
            return super().__getitem__(i)

    decoded = pipeline.DecodedSource(Damaged(10))
    got = []
    with caplog.at_level("WARNING"):
        readers = [threading.Thread(target=lambda: got.append(decoded[3]["num_failed"]))
                   for _ in range(2)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
    assert got == [1, 1]  # both draws replaced and counted
    assert [r.getMessage().count("record 3 is damaged") for r in caplog.records] == [1]
    # A Grain worker process gets a copy with a lock of its own.
    copy = pickle.loads(pickle.dumps(pipeline.DecodedSource(IndexSource(4))))
    assert copy[1]["num_failed"] == 0

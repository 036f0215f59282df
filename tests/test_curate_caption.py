"""Synthetic captioning of unlabeled audio, its resumable driver, class mention rate,
finding audio files."""

import json
import logging
import os

import numpy as np
import pytest
import soundfile

from cacophony_jax.audio import files
from cacophony_jax.audio.io import AudioError
from cacophony_jax.curate import caption
from cacophony_jax.curate.caption_inputs import CaptionError
from cacophony_jax.data.manifest import ManifestSource
from cacophony_jax.evals import benchmark
from cacophony_jax.evals.captioning import CaptionInputError, class_mention_rate, mentions

WORDS = ("dog", "rain", "bell", "car")


def _tone(path, word, samples=8000):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = np.arange(samples) / 16000
    freq = 1000 * (WORDS.index(word) + 1)
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16), 16000)


class FakeCaptioner:
    """Names the tone's word; "sample" captions depend on the seed's parity only."""

    kind = "cacophony"

    def __init__(self):
        self.calls, self.words = [], []

    def caption(self, audio, sample_rate=None, method="greedy", max_len=32, beam_size=4,
                temperature=1.0, seed=0, length_penalty=0.0):
        assert sample_rate == 16000
        self.calls.append((method, len(audio), seed))
        out, words = [], []
        for clip in audio:
            if len(clip) < 2401:
                raise ValueError("clip too short")  # like inference: refuses the batch
            peak = np.argmax(np.abs(np.fft.rfft(clip))) * 16000 / len(clip)
            word = WORDS[int(round(peak / 1000)) - 1]
            words.append(word)
            out.append(f"a {word} sound" if method != "sample" else f"{word} {seed % 2}")
        self.words += words
        return out


# ---------------------------------------------------------------- class mentions


def test_mentions_tolerate_inflections():
    assert mentions("A bird trilling in the distance", "bird trill")
    assert mentions("an engine humming", "engine_hum")
    assert mentions("crackling fire", "crackle") and mentions("whistling wind", "whistle")
    assert mentions("a clock ticks", "ticking") and mentions("loud knocks", "knocking")
    assert mentions("someone hissing", "hiss") and mentions("two rising chirps", "rising chirp")
    assert mentions("Bells ring", "bell") and mentions("the buzzer buzzes", "buzzer")
    assert mentions("a cat purring softly", "purr") and mentions("a dog sniffing", "sniffs")
    assert mentions("running water", "run") and mentions("a fan whirrs", "whirring")
    assert not mentions("this is quiet", "hiss")  # "this"/"is" are not "hiss"
    assert not mentions("a rising tone", "rising chirp")  # every word must be there
    assert not mentions("chirp rising", "rising chirp")  # ... in order
    assert not mentions("a drumming sound", "")


def test_class_mention_rate_hand_cases():
    captions = ["a bird trilling in the distance", "an engine humming", "loud beeps",
                "crackling fire", "a siren"]
    labels = [["bird trill"], ["engine hum"], ["bell"], ["crackle", "hiss"], []]
    assert class_mention_rate(captions, labels) == pytest.approx(3 / 4)  # last: unlabelled
    assert class_mention_rate([["nothing", "a drum beating"]], [["drum"]]) == 1.0
    assert class_mention_rate(["a siren"], [["bell", "beep"]]) == 0.0
    with pytest.raises(CaptionInputError, match="one per clip"):
        class_mention_rate(["a"], [["x"], ["y"]])
    with pytest.raises(CaptionInputError, match="no clip has a label"):
        class_mention_rate(["a"], [[]])
    with pytest.raises(CaptionInputError, match="list of class names"):
        class_mention_rate(["a"], ["bell"])


def test_class_mention_report():
    class Tones:
        class_names = WORDS

        def __len__(self):
            return 4

        def __getitem__(self, i):
            t = np.arange(8000) / 16000
            tone = 0.3 * np.sin(2 * np.pi * 1000 * (i + 1) * t) * 32767
            return {"id": str(i), "audio": tone.astype(np.int16), "labels": [i ^ (i == 3)]}

    report = benchmark.class_mention_report(FakeCaptioner(), Tones(), batch_size=3)
    # Clip 3 (a car tone) is labelled "bell": 3 of 4 captions name the right class.
    assert report["clips"] == 4 and report["class_mention_rate"] == pytest.approx(0.75)
    assert report["examples"][0] == {"id": "0", "labels": ["dog"], "caption": "a dog sound"}
    assert benchmark.class_mention_report(FakeCaptioner(), Tones(), limit=2)["clips"] == 2


# ---------------------------------------------------------------- drawing K captions


def test_caption_batch_policy():
    clips = [np.sin(np.arange(8000) * 2 * np.pi * 1000 / 16000).astype(np.float32)]
    model = FakeCaptioner()
    got = caption.caption_batch(model, clips, 3, "beam", seed=10)
    assert got == [["a dog sound", "dog 1", "dog 0"]]
    assert [(m, s) for m, _, s in model.calls] == [("beam", 10), ("sample", 11), ("sample", 12)]
    # Three samples with seeds 10, 11, 12 give only two distinct captions: kept once each.
    assert caption.caption_batch(FakeCaptioner(), clips, 3, "sample", seed=10) == [
        ["dog 0", "dog 1"]]
    short = np.zeros(100, np.float32)
    got = caption.caption_batch(FakeCaptioner(), [clips[0], short], 1, "greedy")
    assert got[0] == ["a dog sound"] and isinstance(got[1], ValueError)
    with pytest.raises(CaptionError, match="unknown captioning method"):
        caption.caption_batch(model, clips, 1, "nucleus")
    with pytest.raises(CaptionError, match="at least 1"):
        caption.caption_batch(model, clips, 0)


# ---------------------------------------------------------------- the resumable driver


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path)


def make_folder(tmp_path):
    """Five tones (two in a subfolder), a broken file, a too-short clip, a text file."""
    root = tmp_path / "unlabeled"
    for i, word in enumerate(("dog", "rain", "bell", "car", "dog")):
        _tone(root / ("sub" if i % 2 else "") / f"clip{i}.wav", word)
    (root / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    _tone(root / "tiny.wav", "dog", samples=400)
    (root / "notes.txt").write_text("not audio")
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_caption_folder(folder, tmp_path):
    out = tmp_path / "out" / "captioned.jsonl"
    counts = caption.run_caption(FakeCaptioner(), str(folder), str(out), num_captions=2,
                                 batch_size=3)
    # broken.wav cannot be read and tiny.wav is too short: a folder's files are skipped.
    assert counts == {"clips": 7, "written": 5, "resumed": 0, "unreadable": 1,
                      "uncaptioned": 1, "passed_through": 0, "captions": 10,
                      "no_new_caption": 0, "bad_rows": 0, "dropped": 0}
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["clip0.wav", "clip2.wav", "clip4.wav", "sub/clip1.wav",
                                       "sub/clip3.wav"]
    assert rows[0]["audio"] == os.path.join("..", "unlabeled", "clip0.wav")
    assert rows[1]["synthetic_captions"][0] == "a bell sound" and rows[1]["captions"] == []
    assert all(len(r["synthetic_captions"]) == 2 for r in rows)


def test_run_caption_skips_a_file_name_a_manifest_cannot_hold(folder, tmp_path, caplog):
    _tone(folder / "cafe.wav", "dog")  # renamed to a Latin-1 name (lone surrogates here)
    os.rename(folder / "cafe.wav", os.path.join(os.fsencode(folder), b"caf\xe9.wav"))
    out = tmp_path / "captioned.jsonl"
    with caplog.at_level(logging.WARNING):
        counts = caption.run_caption(FakeCaptioner(), str(folder), str(out), num_captions=1)
    assert counts["clips"] == 8 and counts["unreadable"] == 2 and counts["written"] == 5
    assert "caf\\xe9.wav: the file name is not valid UTF-8" in caplog.text
    assert "convmv" in caplog.text
    assert len(ManifestSource(str(out))) == 5  # every row it wrote reads back


def test_run_caption_resumes_after_a_cut(folder, tmp_path):
    out = tmp_path / "captioned.jsonl"
    caption.run_caption(FakeCaptioner(), str(folder), str(out), num_captions=1)
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])  # killed while writing row 3
    model = FakeCaptioner()
    counts = caption.run_caption(model, str(folder), str(out), num_captions=1)
    assert counts["resumed"] == 2 and counts["written"] == 3
    assert out.read_text() == full
    assert sorted(model.words) == ["car", "dog", "rain"]  # clip4, sub/clip1, sub/clip3 only
    # Another bundle or other settings would mix two kinds of rows.
    with pytest.raises(CaptionError, match=r"begun with another setting: num_captions \(1 "
                                           r"before, 2 now\).*--overwrite"):
        caption.run_caption(model, str(folder), str(out), num_captions=2)
    with pytest.raises(CaptionError, match=r"length_penalty \(0.0 before, 1.0 now\)"):
        caption.run_caption(model, str(folder), str(out), num_captions=1, length_penalty=1.0)
    (tmp_path / "a.bin").write_text("a")
    (tmp_path / "b.bin").write_text("b")
    model.bundle_path = str(tmp_path / "a.bin")
    caption.run_caption(model, str(folder), str(out), num_captions=1, overwrite=True)
    assert caption.run_caption(model, str(folder), str(out), num_captions=1)["resumed"] == 5
    model.bundle_path = str(tmp_path / "b.bin")
    with pytest.raises(CaptionError, match="begun with another bundle: bundle"):
        caption.run_caption(model, str(folder), str(out), num_captions=1)
    del model.bundle_path
    with pytest.raises(CaptionError, match="--overwrite"):
        out.write_text("not json\n")
        caption.run_caption(model, str(folder), str(out), num_captions=1)
    assert caption.run_caption(model, str(folder), str(out), overwrite=True)["written"] == 5


class FailingCaptioner(FakeCaptioner):
    """Fails for good (not a clip's fault) after `calls_left` calls."""

    def __init__(self, calls_left):
        super().__init__()
        self.calls_left = calls_left

    def caption(self, audio, **options):
        if self.calls_left == 0:
            raise RuntimeError("device lost")
        self.calls_left -= 1
        return super().caption(audio, **options)


def test_run_caption_overwrite_keeps_the_old_output_until_complete(folder, tmp_path):
    out = tmp_path / "captioned.jsonl"
    out.write_text('{"id": "old", "audio": "old.wav", "captions": ["An old caption."]}\n')
    old = out.read_text()
    with pytest.raises(RuntimeError, match="device lost"):
        caption.run_caption(FailingCaptioner(1), str(folder), str(out), num_captions=1,
                            batch_size=2, overwrite=True, workers=1)
    assert out.read_text() == old
    partial = tmp_path / "captioned.jsonl.partial"
    assert [r["id"] for r in _rows(partial)] == ["clip0.wav"]  # batch 1: it and broken.wav
    with pytest.raises(CaptionError, match=r"\.partial .*--overwrite"):
        caption.run_caption(FakeCaptioner(), str(folder), str(out), num_captions=1)
    counts = caption.run_caption(FakeCaptioner(), str(folder), str(out), num_captions=1,
                                 overwrite=True)
    assert counts["resumed"] == 1 and counts["written"] == 4
    assert len(_rows(out)) == 5 and "old" not in out.read_text() and not partial.exists()


def test_run_caption_manifest_keeps_existing_fields(tmp_path):
    _tone(tmp_path / "clips" / "a.wav", "rain")
    _tone(tmp_path / "clips" / "b.wav", "car")
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"audio": "clips/a.wav", "id": "a", "captions": ["rain on a roof"], "label": "rain",
         "synthetic_captions": ["a rain sound"], "license": "CC0",
         "source": {"url": "https://example.org/a"}},
        {"audio": "clips/b.wav", "caption": "a car"},
        "{broken",
    ]) + "\n\n")  # a blank last line: rows are matched to lines by number
    out = tmp_path / "o" / "out.jsonl"
    counts = caption.run_caption(FakeCaptioner(), str(tmp_path / "in.jsonl"), str(out),
                                 num_captions=2, method="greedy")
    assert counts["written"] == 2
    first, second = _rows(out)
    assert first == {"id": "a", "audio": os.path.join("..", "clips", "a.wav"),
                     "captions": ["rain on a roof"], "label": ["rain"],
                     "synthetic_captions": ["a rain sound", "rain 1"],  # no duplicate
                     "license": "CC0", "source": {"url": "https://example.org/a"}}
    assert second["id"] == "clips/b.wav" and second["captions"] == ["a car"]


def test_run_caption_passes_manifest_rows_it_cannot_caption_through(tmp_path, caplog):
    _tone(tmp_path / "clips" / "a.wav", "rain")
    _tone(tmp_path / "clips" / "tiny.wav", "dog", samples=400)
    rows = [{"audio": "clips/gone.wav", "id": "gone", "captions": ["a door slams"],
             "label": "door", "synthetic_captions": ["a door"]},
            {"audio": "clips/a.wav", "id": "a", "caption": "rain"},
            {"audio": "clips/tiny.wav", "id": "tiny", "caption": "a yelp", "label": "dog"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    counts = caption.run_caption(FakeCaptioner(), str(tmp_path / "in.jsonl"), str(out),
                                 num_captions=1)
    assert counts == {"clips": 3, "written": 3, "resumed": 0, "unreadable": 1,
                      "uncaptioned": 1, "passed_through": 2, "captions": 1,
                      "no_new_caption": 0, "bad_rows": 0, "dropped": 0}
    gone, a, tiny = _rows(out)
    assert gone == {"id": "gone", "audio": os.path.join("clips", "gone.wav"),
                    "captions": ["a door slams"], "synthetic_captions": ["a door"],
                    "label": ["door"]}
    assert a["synthetic_captions"] == ["a rain sound"]
    assert tiny == {"id": "tiny", "audio": os.path.join("clips", "tiny.wav"),
                    "captions": ["a yelp"], "synthetic_captions": [], "label": ["dog"]}
    assert "2 clip(s) could not be captioned, written unchanged" in caplog.text

def test_run_caption_user_errors(tmp_path, folder):
    model = FakeCaptioner()
    with pytest.raises(CaptionError, match="does not exist"):
        caption.run_caption(model, str(tmp_path / "nope"), str(tmp_path / "o.jsonl"))
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav"}\n')
    with pytest.raises(CaptionError, match="overwrite the input"):
        caption.run_caption(model, str(tmp_path / "m.jsonl"), str(tmp_path / "m.jsonl"))
    (tmp_path / "twice.jsonl").write_text('{"audio": "a.wav", "id": "x"}\n'
                                          '{"audio": "b.wav", "id": "x"}\n')
    with pytest.raises(CaptionError, match=r"gives 1 id\(s\) to more than one row, e.g. \['x'\]"):
        caption.run_caption(model, str(tmp_path / "twice.jsonl"), str(tmp_path / "o.jsonl"))
    with pytest.raises(CaptionError, match=r"--seed 4294967295 is out of range"):
        caption.run_caption(model, str(folder), str(tmp_path / "o.jsonl"), seed=2**32 - 1,
                            num_captions=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionError, match="no audio files"):
        caption.run_caption(model, str(tmp_path / "empty"), str(tmp_path / "o.jsonl"))
    model.kind = "mae"
    with pytest.raises(CaptionError, match="no captioning decoder"):
        caption.run_caption(model, str(folder), str(tmp_path / "o.jsonl"))


def test_find_audio_files(folder):
    found = files.find_audio_files([str(folder)], ["WAV"])
    assert [name for _, name in found] == ["broken.wav", "clip0.wav", "clip2.wav", "clip4.wav",
                                           "tiny.wav", "sub/clip1.wav", "sub/clip3.wav"]
    (folder / "elsewhere").mkdir()
    (folder / "elsewhere" / "far.wav").write_bytes(b"")
    (folder / "sub" / "far").symlink_to(folder / "elsewhere")  # a linked folder is followed
    (folder / "sub" / "loop").symlink_to(folder)  # a link cycle ends, files listed once
    found = [name for _, name in files.find_audio_files([str(folder)], ["wav"])]
    assert found == ["broken.wav", "clip0.wav", "clip2.wav", "clip4.wav", "tiny.wav",
                     "elsewhere/far.wav", "sub/clip1.wav", "sub/clip3.wav"]
    linked_only = files.find_audio_files([str(folder / "sub")], ["wav"])
    assert [name for _, name in linked_only][:2] == ["clip1.wav", "clip3.wav"]
    assert "far/far.wav" in [name for _, name in linked_only]
    direct = str(folder / "notes.txt")
    assert files.find_audio_files([direct]) == [(direct, direct)]
    # A file reached twice comes once, where it was first reached.
    clip = str(folder / "clip0.wav")
    twice = files.find_audio_files([clip, str(folder), clip, str(folder / "sub")], ["wav"])
    assert len(twice) == len(found) and twice[0] == (clip, clip)
    with pytest.raises(AudioError, match="does not exist"):
        files.find_audio_files([str(folder / "missing")])


def test_real_bundle_captions(tmp_path, official_dir):
    from cacophony_jax import inference
    from cacophony_jax.convert import export
    from cacophony_jax.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.train_bpe([f"a {w} sound" for w in WORDS], 280)
    path = export.export_from_official(
        official_dir / "Cacophony_tiny.ckpt", tmp_path / "bundle",
        tokenizer_path=tokenizer.save(tmp_path / "tokenizer.json"), window_seconds=1.0,
        text_length=12)
    model = inference.load(path)
    for word in WORDS[:3]:
        _tone(tmp_path / "clips" / f"{word}.wav", word)
    out = tmp_path / "real.jsonl"
    counts = caption.run_caption(model, str(tmp_path / "clips"), str(out), num_captions=2,
                                 beam_size=2, max_len=8, batch_size=4)
    assert counts["written"] == 3 and counts["unreadable"] == 0
    rows = _rows(out)
    direct = model.caption([str(tmp_path / "clips" / r["id"]) for r in rows], method="beam",
                           beam_size=2, max_len=8)
    for row, text in zip(rows, direct, strict=True):
        assert len(row["synthetic_captions"]) <= 2
        if text:  # the beam caption comes first (random weights may emit eos at once)
            assert row["synthetic_captions"][0] == text


def test_run_caption_counts_bad_manifest_rows_and_keeps_those_it_can(tmp_path, caplog):
    _tone(tmp_path / "clips" / "a.wav", "rain")
    bad_captions = {"id": "b", "audio": "clips/b.wav", "captions": "a dog", "label": "dog"}
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"audio": "clips/a.wav", "id": "a"},
        bad_captions,
        {"audio": "clips/c.wav", "synthetic_captions": [1]},  # id defaults to audio
        "{broken",
        [1, 2],
    ]) + "\n")
    out = tmp_path / "o" / "out.jsonl"
    counts = caption.run_caption(FakeCaptioner(), str(tmp_path / "in.jsonl"), str(out),
                                 num_captions=1)
    assert counts["bad_rows"] == 4 and counts["dropped"] == 2
    assert counts["written"] == 3 and counts["passed_through"] == 2
    rows = {r["id"]: r for r in _rows(out)}
    assert rows["b"] == {**bad_captions, "audio": os.path.join("..", "clips", "b.wav")}
    assert rows["clips/c.wav"]["synthetic_captions"] == [1]
    assert "4 bad row(s) (named above): 2 written as they are" in caplog.text
    again = caption.run_caption(FakeCaptioner(), str(tmp_path / "in.jsonl"), str(out),
                                num_captions=1)
    assert again["written"] == 0 and again["resumed"] == 1 and len(_rows(out)) == 3

"""The embedded synthetic corpus: determinism, contract, captions, sound, disk copy."""

import json
import pickle
import re

import numpy as np
import pytest
import soundfile

from cacophony_jax.data.synthetic import (
    EVENT_CLASSES,
    SyntheticCorpus,
    description_key,
    write_corpus,
)
from cacophony_jax.data.synthetic_events import (
    NOISE_COLOURS,
    PITCHES,
    SPEEDS,
    active_level,
    background_noise,
    synthesize_event,
)

SR = 16_000


def _dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum) * SR / samples.size)


def _frame_db(samples: np.ndarray) -> float:
    """Loudest 20 ms frame RMS of int16 samples in dBFS."""
    x = samples.astype(np.float64) / 32768.0
    frames = x[: x.size // 320 * 320].reshape(-1, 320)
    return 10 * np.log10(np.max(np.mean(frames**2, axis=1)))


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def test_classes_are_many_and_each_sounds():
    assert len(EVENT_CLASSES) >= 12 and len(set(EVENT_CLASSES)) == len(EVENT_CLASSES)
    rng = np.random.default_rng(0)
    for name in EVENT_CLASSES:
        assert re.fullmatch(r"[a-z]+( [a-z]+)?", name), name
        for pitch in PITCHES:
            for speed in SPEEDS:
                samples, params = synthesize_event(name, rng, SR // 2, pitch, speed)
                assert samples.dtype == np.float32 and samples.shape == (SR // 2,)
                assert np.all(np.isfinite(samples))
                # Unit active level, and well above silence on average too.
                assert active_level(samples, SR) == pytest.approx(1.0, rel=0.05), name
                assert np.sqrt(np.mean(samples**2)) > 0.05, (name, pitch, speed)
                assert params["frequency_hz"] > 0 and params["rate_hz"] > 0


def test_pitch_moves_the_dominant_frequency():
    rng = np.random.default_rng(1)
    for name, (low_band, high_band) in {
        "beep": ((300, 500), (1200, 2000)),
        "whistle": ((650, 1100), (1900, 3200)),
        "bell": ((280, 420), (900, 1400)),
    }.items():
        low, _ = synthesize_event(name, rng, SR, "low", "slow")
        high, _ = synthesize_event(name, rng, SR, "high", "slow")
        assert low_band[0] - 5 <= _dominant_hz(low) <= low_band[1] + 5, name
        assert high_band[0] - 5 <= _dominant_hz(high) <= high_band[1] + 5, name


def test_chirps_sweep_in_their_direction():
    # A slow sweep lasts 0.8 / rate >= 0.44 s, so 0.30-0.40 s is still the first sweep.
    rng = np.random.default_rng(2)
    for name, sign in (("rising chirp", 1), ("falling chirp", -1)):
        samples, params = synthesize_event(name, rng, SR, "low", "slow")
        early = _dominant_hz(samples[int(0.01 * SR):int(0.06 * SR)])
        late = _dominant_hz(samples[int(0.30 * SR):int(0.40 * SR)])
        assert sign * (late - early) > 150, (name, early, late)
        assert early == pytest.approx(params["frequency_hz"], abs=120)


def test_speed_sets_the_pulse_rate():
    rng = np.random.default_rng(3)
    counts = {}
    for speed in SPEEDS:
        samples, params = synthesize_event("beep", rng, 2 * SR, "high", speed)
        frames = samples[: samples.size // 80 * 80].reshape(-1, 80)  # 5 ms frames
        on = np.sqrt(np.mean(frames**2, axis=1)) > 0.5
        counts[speed] = int(np.sum(on[1:] & ~on[:-1])) + int(on[0])
        # Slow 1.5-2.5 Hz -> 3 to 5 pulses in 2 s; fast 5-7 Hz -> 10 to 14.
        assert abs(counts[speed] - 2 * params["rate_hz"]) <= 1.0
    assert counts["fast"] >= 2 * counts["slow"]


def test_background_noise_level_and_colour():
    rng = np.random.default_rng(4)
    low_share = {}
    for colour in NOISE_COLOURS:
        noise = background_noise(rng, SR, colour, -40.0)
        assert noise.dtype == np.float32
        assert 20 * np.log10(np.sqrt(np.mean(noise.astype(np.float64) ** 2))) == pytest.approx(
            -40.0, abs=0.01)
        power = np.abs(np.fft.rfft(noise)) ** 2
        low_share[colour] = power[:500].sum() / power.sum()  # below 500 Hz (1 Hz bins)
    # White noise puts 500/8000 of its power below 500 Hz; redder noise far more.
    assert low_share["white"] == pytest.approx(1 / 16, abs=0.02)
    assert low_share["white"] < low_share["pink"] < low_share["brown"]


def test_same_seed_split_index_gives_the_same_clip():
    a = SyntheticCorpus("train", 8, 2.0, seed=5)
    b = SyntheticCorpus("train", 8, 2.0, seed=5)
    first, again = a[3], b[3]
    np.testing.assert_array_equal(first["audio"], again["audio"])
    for key in ("id", "captions", "synthetic_captions", "labels", "events", "background"):
        assert first[key] == again[key], key
    others = [a[4], SyntheticCorpus("eval", 8, 2.0, seed=5)[3], SyntheticCorpus("train", 8, 2.0)[3]]
    for other in others:
        assert other["id"] != first["id"]
        assert not np.array_equal(other["audio"], first["audio"])
    # Worker processes get a pickled copy of the source and make the same clip.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(a))[3]["audio"], first["audio"])
    # Negative indices count from the end, as for any sequence.
    np.testing.assert_array_equal(a[-5]["audio"], first["audio"])


def test_record_contract():
    corpus = SyntheticCorpus("eval", 6, 1.5, seed=1)
    assert corpus.name == "synthetic_eval" and corpus.class_names == EVENT_CLASSES
    assert len(corpus) == 6
    for index in range(len(corpus)):
        record = pickle.loads(pickle.dumps(corpus[index]))
        audio = record["audio"]
        assert audio.dtype == np.int16 and audio.shape == (24_000,)
        assert 300 < np.abs(audio.astype(np.int32)).max() < 32767
        assert isinstance(record["id"], str)
        assert len(record["captions"]) >= 3 and len(record["synthetic_captions"]) >= 1
        assert all(isinstance(c, str) and c for c in
                   record["captions"] + record["synthetic_captions"])
        labels = record["labels"]
        assert 1 <= len(labels) <= 3 and len(set(labels)) == len(labels)
        assert all(isinstance(i, int) and 0 <= i < len(EVENT_CLASSES) for i in labels)
        assert labels == [EVENT_CLASSES.index(e["class"]) for e in record["events"]]
        without_audio = corpus.metadata(index)
        assert without_audio["captions"] == record["captions"]
        assert [e["onset_s"] for e in without_audio["events"]] == [
            e["onset_s"] for e in record["events"]]
    with pytest.raises(IndexError):
        corpus[6]


def test_events_are_placed_in_order_with_their_durations():
    corpus = SyntheticCorpus("train", 300, 10.0, seed=2)
    for index in range(len(corpus)):
        events = corpus.metadata(index)["events"]
        ends = 0.0
        for event in events:
            assert event["onset_s"] >= ends - 1e-3  # one after another, no overlap
            ends = event["onset_s"] + event["length_s"]
            low, high = (1.0, 1.5) if event["duration"] == "short" else (2.5, 3.0)
            assert low - 1e-3 <= event["length_s"] <= high + 1e-3
        assert ends <= 10.0 + 1e-3
        if len(events) == 1:
            centre = events[0]["onset_s"] + events[0]["length_s"] / 2
            low, high = {"start": (0, 3), "middle": (4, 6), "end": (7, 10)}[events[0]["position"]]
            assert low - 1e-3 <= centre <= high + 1e-3


def test_captions_name_each_class_with_its_attributes():
    corpus = SyntheticCorpus("train", 120, 4.0, seed=3)
    opposite = {"low": "high", "high": "low", "quiet": "loud", "loud": "quiet",
                "short": "long", "long": "short"}
    speed_word = {"slow": "slowly", "fast": "quickly"}
    seen: dict[str, set] = {}
    for index in range(len(corpus)):
        record = corpus.metadata(index)
        events = record["events"]
        for caption in record["captions"]:
            for event in events:
                assert event["class"] in caption.lower(), (caption, event["class"])
        clauses = record["captions"][0].split(", then ")
        assert len(clauses) == len(events)
        for clause, event in zip(clauses, events, strict=True):
            clause = clause.lower()
            assert event["class"] in clause
            for word in (event["pitch"], event["loudness"], event["duration"]):
                assert _has_word(clause, word) and not _has_word(clause, opposite[word]), clause
            other = "fast" if event["speed"] == "slow" else "slow"
            assert _has_word(clause, speed_word[event["speed"]])
            assert not _has_word(clause, speed_word[other])
            seen.setdefault(event["class"], set()).add(
                (event["pitch"], event["speed"], event["loudness"], event["duration"]))
        # Captioner style: shorter than the descriptive captions.
        assert max(map(len, record["synthetic_captions"])) < len(record["captions"][0])
    # The same class is described with different attributes in different clips.
    assert len(seen) == len(EVENT_CLASSES)
    assert all(len(attributes) >= 3 for attributes in seen.values())


def test_quickstart_captions_fit_its_text_length(tmp_path):
    # A longer caption is cut in training, and its captioning target loses its end.
    from etils import epath

    from cacophony_jax.tasks import common
    from cacophony_jax.train import init
    from configs import quickstart

    config = quickstart.get_config().stages.cacophony
    train = common.open_block(config, "train", *common.block_sizes(config, "train"),
                              reuse=False)
    tok = init.prepare_tokenizer(config, epath.Path(tmp_path), train)
    for which in ("train", "eval"):
        source = common.open_block(config, which, *common.block_sizes(config, which),
                                   reuse=False)
        captions = list(init.iter_captions(source))
        longest = int(np.max(tok.token_counts(captions))) + 2  # bos and eos
        assert longest <= config.data.text_length, (which, longest)

def test_train_and_eval_descriptions_are_disjoint():
    # 500 eval clips hold ~125 lone events among 672 possible lone descriptions, so
    # without the split rule many would repeat a train description.
    train = {description_key(SyntheticCorpus("train", 2000, 4.0).metadata(i)["events"])
             for i in range(2000)}
    evals = {description_key(SyntheticCorpus("eval", 500, 4.0).metadata(i)["events"])
             for i in range(500)}
    assert len(evals) > 300
    assert not train & evals


def test_loudness_attribute_is_measurable_in_the_audio():
    corpus = SyntheticCorpus("train", 40, 4.0, seed=4)
    measured = {"quiet": [], "loud": []}
    for index in range(len(corpus)):
        record = corpus[index]
        for event in record["events"]:
            start = int(event["onset_s"] * SR)
            piece = record["audio"][start:start + int(event["length_s"] * SR)]
            level = _frame_db(piece)
            measured[event["loudness"]].append(level)
            # Impulsive loud events may be turned down (peak 0.9) by a few dB.
            assert event["level_db"] - 5.0 <= level <= event["level_db"] + 1.0
    assert max(measured["quiet"]) + 10.0 < min(measured["loud"])


@pytest.mark.parametrize("audio_format", ["wav", "flac"])
def test_write_corpus_round_trip(tmp_path, audio_format):
    out = tmp_path / "corpus"
    manifest = write_corpus(out, "eval", 3, 1.0, seed=7, audio_format=audio_format)
    assert manifest == out / "manifest.jsonl"
    corpus = SyntheticCorpus("eval", 3, 1.0, seed=7)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 3
    for index, row in enumerate(rows):
        record = corpus[index]
        assert set(row) == {"id", "audio", "captions", "synthetic_captions", "label"}
        assert row["id"] == record["id"] and row["captions"] == record["captions"]
        assert row["synthetic_captions"] == record["synthetic_captions"]
        assert row["label"] == [EVENT_CLASSES[i] for i in record["labels"]]
        assert row["audio"] == f"audio/{record['id']}.{audio_format}"
        audio, rate = soundfile.read(out / row["audio"], dtype="int16")
        assert rate == SR and soundfile.info(out / row["audio"]).subtype == "PCM_16"
        np.testing.assert_array_equal(audio, record["audio"])
    assert (out / "classes.txt").read_text().splitlines() == list(EVENT_CLASSES)
    assert not list(out.rglob("*.partial"))


def test_user_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="split 'test'"):
        SyntheticCorpus("test", 4, 2.0)
    with pytest.raises(ValueError, match="size"):
        SyntheticCorpus("train", -1, 2.0)
    with pytest.raises(ValueError, match="clip_seconds"):
        SyntheticCorpus("train", 4, 0.2)
    with pytest.raises(ValueError, match="seed"):
        SyntheticCorpus("train", 4, 2.0, seed=-3)
    with pytest.raises(ValueError, match="audio_format 'mp3'"):
        write_corpus(tmp_path, "train", 1, 1.0, audio_format="mp3")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="a_file"):
        write_corpus(blocker, "train", 1, 1.0)
    with pytest.raises(ValueError, match="unknown event class 'gong'"):
        synthesize_event("gong", np.random.default_rng(0), 100, "low", "slow")

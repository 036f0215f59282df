"""Decoding, resampling and writing audio files (all generated in tmp_path)."""

import numpy as np
import pytest
import soundfile as sf

from cacophony_jax.audio import io as audio_io
from cacophony_jax.audio.io import AudioError


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


def peak_hz(audio: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float64) * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * rate / len(audio))


def test_int16_float_conversions():
    got = audio_io.to_int16(np.array([0.0, 0.5, -1.0, 1.0, 2.0, -3.0, 1e-5]))
    np.testing.assert_array_equal(got, [0, 16384, -32768, 32767, 32767, -32768, 0])
    assert got.dtype == np.int16
    np.testing.assert_array_equal(
        audio_io.to_float32(np.array([-32768, 16384, 0], np.int16)), [-1.0, 0.5, 0.0]
    )
    every = np.arange(-32768, 32768).astype(np.int16)
    np.testing.assert_array_equal(audio_io.to_int16(audio_io.to_float32(every)), every)
    with pytest.raises(AudioError, match="NaN"):
        audio_io.to_int16(np.array([0.0, np.nan]))
    with pytest.raises(AudioError, match="int16"):
        audio_io.to_float32(np.zeros(3, np.float32))


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_lossless_formats_round_trip(tmp_path, suffix):
    audio = audio_io.to_int16(sine(440, 0.5, 16000))
    path = tmp_path / f"clip{suffix}"
    audio_io.write_audio(path, audio)
    loaded = audio_io.load_audio(path)
    assert loaded.dtype == np.int16
    np.testing.assert_array_equal(loaded, audio)


@pytest.mark.parametrize("suffix", [".ogg", ".mp3"])
def test_lossy_formats_decode(tmp_path, suffix):
    if suffix not in audio_io._WRITE_FORMATS:
        pytest.skip(f"this libsndfile cannot write {suffix}")
    audio = audio_io.to_int16(sine(1000, 1.0, 16000))
    path = tmp_path / f"clip{suffix}"
    audio_io.write_audio(path, audio)
    loaded = audio_io.load_audio(path)
    assert loaded.dtype == np.int16
    assert abs(len(loaded) - 16000) <= 1200  # codec frame padding
    assert abs(peak_hz(loaded) - 1000) <= 2
    assert 0.4 < np.abs(loaded).max() / 32768 < 0.6


def test_fast_path_reads_int16_without_float(tmp_path, monkeypatch):
    audio = np.random.default_rng(0).integers(-32768, 32768, 3000).astype(np.int16)
    path = tmp_path / "fast.wav"
    sf.write(path, audio, 16000, subtype="PCM_16")

    def forbidden(*args, **kwargs):
        raise AssertionError("the 16 kHz mono int16 path must not convert through float")

    monkeypatch.setattr(audio_io, "to_int16", forbidden)
    monkeypatch.setattr(audio_io, "resample", forbidden)
    np.testing.assert_array_equal(audio_io.load_audio(path), audio)
    np.testing.assert_array_equal(audio_io.load_audio(path, max_seconds=0.1), audio[:1600])
    data = path.read_bytes()
    np.testing.assert_array_equal(audio_io.decode_audio_bytes(data, "fast.wav"), audio)


def test_stereo_is_averaged_to_mono(tmp_path):
    left = np.full(800, 1000, np.int16)
    right = np.full(800, 3000, np.int16)
    right[400:] = -1000
    path = tmp_path / "stereo.wav"
    audio_io.write_audio(path, np.stack([left, right], axis=1))
    loaded = audio_io.load_audio(path)
    np.testing.assert_array_equal(loaded, [2000] * 400 + [0] * 400)


@pytest.mark.parametrize(("rate", "freq"), [(44100, 1000.0), (8000, 440.0)])
def test_resampled_to_16k(tmp_path, rate, freq):
    path = tmp_path / f"at_{rate}.wav"
    sf.write(path, sine(freq, 1.0, rate), rate, subtype="PCM_16")
    loaded = audio_io.load_audio(path)
    assert abs(len(loaded) - 16000) <= 1
    assert abs(peak_hz(loaded) - freq) <= 1


def test_resample_function():
    out = audio_io.resample(sine(1000, 0.5, 48000), 48000, 16000)
    assert out.dtype == np.float32 and abs(len(out) - 8000) <= 1
    assert abs(peak_hz(out) - 1000) <= 2
    with pytest.raises(AudioError, match="orig_sr"):
        audio_io.resample(np.zeros(10), 0, 16000)


def test_float_file_is_clipped_and_cropped(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, np.array([0.25, 1.5, -2.0, 0.0] * 8000, np.float32), 16000, subtype="FLOAT")
    loaded = audio_io.load_audio(path, max_seconds=0.5)
    np.testing.assert_array_equal(loaded, [8192, 32767, -32768, 0] * 2000)
    cropped = audio_io.load_audio(tmp_path / "loud.wav", sample_rate=8000, max_seconds=0.25)
    assert len(cropped) == 2000


def test_broken_files_name_the_file(tmp_path):
    good = tmp_path / "good.wav"
    audio_io.write_audio(good, np.zeros(1600, np.int16))
    cases = {
        "random.wav": np.random.default_rng(0).bytes(4000),
        "truncated.wav": good.read_bytes()[:20],
        "empty.flac": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AudioError, match=name):
            audio_io.load_audio(tmp_path / name)
        with pytest.raises(AudioError, match=f"record-{name}"):
            audio_io.decode_audio_bytes(data, f"record-{name}")
    # libsndfile calls a damaged MP3 it cannot parse a file that "does not exist".
    (tmp_path / "damaged.mp3").write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(AudioError, match="damaged.mp3") as info:
        audio_io.load_audio(tmp_path / "damaged.mp3")
    assert "does not exist" not in str(info.value)
    # libmpg123 writes its own lines on stderr about such a file; the error says whose.
    if audio_io._MP3_SUPPORTED:
        assert "libmpg123 may have printed lines about it on stderr" in str(info.value)
    with pytest.raises(AudioError, match="missing.wav.*does not exist"):
        audio_io.load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="folder"):
        audio_io.load_audio(tmp_path)


def test_a_name_spelt_in_the_other_unicode_form_finds_the_file(tmp_path):
    import unicodedata
    # "é" as one character (NFC, as most tools write it) on disk, asked for as "e" and
    # a combining accent (NFD, as macOS spells names), and the other way round.
    for on_disk, asked in (("NFC", "NFD"), ("NFD", "NFC")):
        folder = tmp_path / on_disk
        folder.mkdir()
        audio = np.arange(800, dtype=np.int16)
        audio_io.write_audio(folder / unicodedata.normalize(on_disk, "café.wav"), audio)
        path = folder / unicodedata.normalize(asked, "café.wav")
        np.testing.assert_array_equal(audio_io.load_audio(path), audio)
        with pytest.raises(AudioError, match="does not exist"):
            audio_io.load_audio(folder / unicodedata.normalize(asked, "cafés.wav"))


def test_zero_samples_and_non_finite(tmp_path):
    silent = tmp_path / "nothing.wav"
    sf.write(silent, np.zeros(0, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match="nothing.wav contains no audio samples"):
        audio_io.load_audio(silent)
    resampled = tmp_path / "nothing44.wav"
    sf.write(resampled, np.zeros((0, 2), np.int16), 44100, subtype="PCM_16")
    with pytest.raises(AudioError, match="nothing44.wav contains no audio samples"):
        audio_io.load_audio(resampled)
    one = tmp_path / "one.wav"  # one frame at 48 kHz: less than a sample at 16 kHz
    sf.write(one, np.zeros((1, 1)), 48000)
    with pytest.raises(AudioError, match="one.wav contains no audio samples at 16000 Hz"):
        audio_io.load_audio(one)
    with pytest.raises(AudioError, match="one.wav contains no audio samples at 16000 Hz"):
        audio_io.load_audio_clip(one, 100, lambda n: 0)
    bad = tmp_path / "nan.wav"
    sf.write(bad, np.array([0.0, np.nan, 0.1], np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav holds NaN"):
        audio_io.load_audio(bad)


def test_write_audio_errors(tmp_path):
    with pytest.raises(AudioError, match="unknown suffix '.aiff'"):
        audio_io.write_audio(tmp_path / "x.aiff", np.zeros(10, np.int16))
    with pytest.raises(AudioError, match="to_int16"):
        audio_io.write_audio(tmp_path / "x.wav", np.zeros(10, np.float32))
    with pytest.raises(AudioError, match="no_such_dir"):
        audio_io.write_audio(tmp_path / "no_such_dir" / "x.wav", np.zeros(10, np.int16))
    with pytest.raises(AudioError, match="max_seconds"):
        audio_io.load_audio(tmp_path / "x.wav", max_seconds=0)


def test_decoded_batches_are_bounded_by_audio_length(tmp_path):
    from cacophony_jax.audio import files

    paths = []
    for name, seconds in (("a", 1.0), ("b", 1.0), ("c", 3.0), ("d", 0.5), ("e", 0.5)):
        sf.write(tmp_path / f"{name}.wav", sine(440, seconds, 8000), 8000)
        paths.append(str(tmp_path / f"{name}.wav"))
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")  # no header: counts as 0 s
    paths.append(str(tmp_path / "bad.wav"))
    got = [[(p.rsplit("/", 1)[1], None if isinstance(a, Exception) else a.size) for p, a in b]
           for b in files.decode_files(paths, batch_size=3, max_seconds=2.5)]
    # a + b fit 2.5 s; c (3 s, longer than the bound) comes alone; then the count rules.
    assert got == [[("a.wav", 16000), ("b.wav", 16000)], [("c.wav", 48000)],
                   [("d.wav", 8000), ("e.wav", 8000), ("bad.wav", None)]]


def test_load_audio_clip_decodes_only_a_window_of_a_long_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    native = (rng.standard_normal(16000 * 40) * 3000).astype(np.int16)
    sf.write(tmp_path / "native.wav", native, 16000)
    stereo = (0.2 * rng.standard_normal((44100 * 40, 2))).astype(np.float32)
    sf.write(tmp_path / "stereo.flac", stereo, 44100)  # resampled and mixed down
    short = native[:16000 * 3]
    sf.write(tmp_path / "short.wav", short, 16000)
    read = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read",
                        lambda self, frames=-1, **kw: read.append(frames)
                        or real_read(self, frames, **kw))
    length = 16000 * 2
    for name in ("native.wav", "stereo.flac"):
        whole = audio_io.load_audio(tmp_path / name)
        for start in (0, 7, 123_457, whole.size - length, whole.size - 100):
            read.clear()
            seen = []
            clip, total = audio_io.load_audio_clip(
                tmp_path / name, length, lambda n, s=start, seen=seen: seen.append(n) or s)
            assert seen == [whole.size] == [total]
            want = whole[start:start + length]
            assert clip.dtype == np.int16 and clip.shape == want.shape
            # 16 kHz mono int16 is read exactly; a resampled window is the whole
            # file's resampling to within one int16 step.
            tolerance = 0 if name == "native.wav" else 1
            assert np.abs(clip.astype(int) - want).max() <= tolerance, (name, start)
            rate = 44100 if name == "stereo.flac" else 16000
            assert 0 < read[0] <= (length + 2 * 800 + 320) * rate / 16000  # only a window
    # A file under WINDOW_FACTOR clips long is decoded whole: exactly load_audio's slice.
    clip, total = audio_io.load_audio_clip(tmp_path / "short.wav", 16000 * 2, lambda n: n - 5)
    np.testing.assert_array_equal(clip, short[-5:])
    assert total == short.size and read[-1] == -1
    with pytest.raises(AudioError, match="length must be at least 1"):
        audio_io.load_audio_clip(tmp_path / "short.wav", 0, lambda n: 0)
    with pytest.raises(AudioError, match="does not exist"):
        audio_io.load_audio_clip(tmp_path / "gone.wav", 100, lambda n: 0)


def test_load_audio_clip_of_a_truncated_file_is_an_audio_error(tmp_path):
    samples = (np.random.default_rng(1).standard_normal(44100 * 30) * 3000).astype(np.int16)
    sf.write(tmp_path / "full.flac", samples, 44100)
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[:len(data) // 2])  # header: all 30 s
    # A window in the part that is there decodes; one past the cut is an AudioError
    # (skipped and counted by training), not a crash or silence.
    clip, total = audio_io.load_audio_clip(tmp_path / "cut.flac", 16000, lambda n: 16000)
    assert clip.size == 16000 and total == 16000 * 30
    with pytest.raises(AudioError, match="cut.flac"):
        audio_io.load_audio_clip(tmp_path / "cut.flac", 16000, lambda n: n - 16000)


@pytest.mark.skipif(not audio_io._MP3_SUPPORTED, reason="libsndfile without MP3")
def test_load_audio_clip_of_a_file_shorter_than_its_header_decodes_it_whole(tmp_path):
    noise = (0.2 * np.random.default_rng(2).standard_normal(44100 * 30)).astype(np.float32)
    sf.write(tmp_path / "full.mp3", noise, 44100, format="MP3")
    data = (tmp_path / "full.mp3").read_bytes()
    (tmp_path / "cut.mp3").write_bytes(data[:len(data) // 3])  # its header: all 30 s
    real = audio_io.load_audio(tmp_path / "cut.mp3").size
    assert real < 16000 * 12
    for start in (16000 * 20, 16000 * 27):  # past the real end
        seen = []

        def choose(n, s=start, seen=seen):
            seen.append(n)
            return min(s, n - 32000)

        clip, total = audio_io.load_audio_clip(tmp_path / "cut.mp3", 32000, choose)
        assert clip.size == 32000 and total == real
        assert seen[0] > real and seen[1] == real  # the header's length, then the real one


def test_load_audio_of_a_flac_without_a_length_is_one_clear_error(tmp_path):
    sf.write(tmp_path / "a.flac", np.zeros(44100, np.int16), 44100)
    data = bytearray((tmp_path / "a.flac").read_bytes())
    data[21] &= 0xF0  # STREAMINFO's 36-bit total-samples field: 0 = unknown
    data[22:26] = bytes(4)
    (tmp_path / "a.flac").write_bytes(bytes(data))
    for load in (lambda p: audio_io.load_audio(p),
                 lambda p: audio_io.load_audio_clip(p, 16000, lambda n: 0)):
        with pytest.raises(AudioError, match="a.flac: its header does not give its length"):
            load(tmp_path / "a.flac")


@pytest.mark.skipif(not audio_io._MP3_SUPPORTED, reason="libsndfile without MP3")
def test_an_mp3_window_matches_the_whole_decode(tmp_path):
    # After a seek libmpg123 fades in while its bit reservoir refills: windows start
    # far enough back that none of that reaches the clip (a VBR 48 kHz file showed it
    # most, up to 40 ms).
    rate = 48000
    t = np.arange(rate * 12) / rate
    phase = 2 * np.pi * np.cumsum(150 + 50 * np.sin(2 * np.pi * 0.5 * t)) / rate
    x = (np.sin(2 * np.pi * 1.7 * t) > 0.2) * (0.2 * np.sin(phase) + 0.1 * np.sin(2 * phase))
    sf.write(tmp_path / "v.mp3", x, rate, bitrate_mode="VARIABLE", compression_level=0.9)
    whole = audio_io.load_audio(tmp_path / "v.mp3").astype(np.int32)
    for start in range(1000, whole.size - 40000, 9999):
        clip, _ = audio_io.load_audio_clip(tmp_path / "v.mp3", 32000, lambda n, s=start: s)
        assert np.abs(clip - whole[start:start + 32000]).max() <= 2, start


@pytest.mark.skipif(not audio_io._MP3_SUPPORTED, reason="libsndfile without MP3")
def test_low_rate_mp3s_are_not_seeked(tmp_path, monkeypatch):
    # libmpg123 prints a warning on stderr for most seeks in an MPEG-2 (under 32 kHz)
    # stream; such files are decoded whole, quietly.
    sf.write(tmp_path / "low.mp3", np.zeros(16000 * 10, np.float32), 16000, format="MP3")
    reads = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, frames=-1, **kw: reads.append(
        (self.tell(), frames)) or real_read(self, frames, **kw))
    clip, total = audio_io.load_audio_clip(tmp_path / "low.mp3", 16000, lambda n: n // 2)
    assert clip.size == 16000 and total >= 16000 * 10 and reads == [(0, -1)]


def test_sample_conversions_are_a_module_of_their_own_and_still_io_names():
    import inspect

    from cacophony_jax.audio import samples

    for name in ("SAMPLE_RATE", "AudioError", "to_int16", "to_float32", "resample",
                 "resampled_length"):
        assert getattr(audio_io, name) is getattr(samples, name)
    for module in (audio_io, samples):  # the house cap on a module's length
        assert len(inspect.getsource(module).splitlines()) <= 400, module.__name__

"""The log-mel front end against the official float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from cacophony_jax.audio import frontend

CLIPS = ("chirp_2s", "noise_1p37s", "tone_440hz_odd_len", "silence_1s")
SILENCE_LOGMEL = np.log(1e-5) * 0.2 + 0.9


@pytest.fixture(scope="module")
def reference(official_dir):
    with np.load(official_dir / "frontend_reference.npz") as data:
        return dict(data)


def reference_logmel(wave: np.ndarray) -> np.ndarray:
    """The release's log-mel formula in float64 numpy (checked against the fixture)."""
    frames = -(-len(wave) // 160)
    padded = np.concatenate([wave.astype(np.float64), np.zeros(frames * 160 + 400)])
    windows = np.stack([padded[i * 160 : i * 160 + 400] for i in range(frames)])
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    magnitude = np.abs(np.fft.rfft(windows * hann, 512))
    return np.log(magnitude @ frontend.mel_matrix() + 1e-5) * 0.2 + 0.9


def linear_mel(logmel: np.ndarray) -> np.ndarray:
    return np.exp((np.asarray(logmel, np.float64) - 0.9) / 0.2) - 1e-5


def assert_official(logmel: np.ndarray, expected: np.ndarray) -> None:
    """README tolerances: linear mel within 1e-5 of the clip's peak, log-mel 1e-2."""
    assert logmel.shape == expected.shape
    peak = linear_mel(expected).max()
    linear_error = np.abs(linear_mel(logmel) - linear_mel(expected)).max()
    # A silent clip has peak 0; its linear mel must then be zero to 1e-5 absolute.
    assert linear_error <= 1e-5 * max(peak, 1.0), (linear_error, peak)
    np.testing.assert_allclose(logmel, expected, atol=1e-2, rtol=0)


def run(audio, lengths, method="auto"):
    fn = jax.jit(lambda a, n: frontend.log_mel(a, n, method=method))
    logmel, valid = fn(jnp.asarray(audio), jnp.asarray(lengths, jnp.int32))
    return np.asarray(logmel), np.asarray(valid)


def test_constants_and_num_frames():
    assert (frontend.SAMPLE_RATE, frontend.WINDOW, frontend.HOP) == (16000, 400, 160)
    assert (frontend.N_FFT, frontend.N_MELS, frontend.MEL_FMAX) == (512, 128, 8000)
    lengths = [0, 1, 159, 160, 161, 11213, 160000]
    assert [frontend.num_frames(n) for n in lengths] == [0, 1, 1, 1, 2, 71, 1000]


def test_mel_matrix_matches_reference(reference):
    expected = reference["mel_matrix"]
    weights32 = frontend.mel_matrix(np.float32)
    assert weights32.shape == (257, 128) and weights32.dtype == np.float32
    assert np.abs(weights32 - expected).max() <= 1e-6
    assert np.abs(frontend.mel_matrix() - expected).max() <= 1e-12
    assert not frontend.mel_matrix()[0].any()
    # Banded: every FFT bin feeds at most two mel bands.
    assert (frontend.mel_matrix() > 0).sum(axis=1).max() == 2


def test_numpy_reference_reproduces_fixture(reference):
    # Lets the int16 checks below compare against the same formula.
    for clip in CLIPS:
        expected = reference[f"logmel_{clip}"]
        np.testing.assert_allclose(reference_logmel(reference[f"wave_{clip}"]), expected, atol=1e-9)


@pytest.mark.parametrize("clip", CLIPS)
def test_float_clip_matches_official(reference, clip):
    wave = reference[f"wave_{clip}"]
    logmel, valid = run(wave[None], [len(wave)])
    assert logmel.dtype == np.float32
    assert_official(logmel[0], reference[f"logmel_{clip}"])
    assert valid.all()


@pytest.mark.parametrize("method", ["folded", "dft"])
def test_int16_batch_matches_official(reference, method):
    # int16 is the batch contract: quantise the reference clips and pad them into
    # one batch; every method meant for int16 must meet the official tolerance.
    waves = [np.round(reference[f"wave_{c}"] * 32767).astype(np.int16) for c in CLIPS]
    lengths = [len(w) for w in waves]
    audio = np.zeros((len(waves), max(lengths)), np.int16)
    for row, wave in zip(audio, waves, strict=True):
        row[: len(wave)] = wave
    logmel, valid = run(audio, lengths, method)
    for row, wave in enumerate(waves):
        frames = frontend.num_frames(len(wave))
        assert_official(logmel[row, :frames], reference_logmel(wave / 32768.0))
        assert valid[row].sum() == frames and valid[row, :frames].all()


def test_padded_batch_gives_unpadded_frames(reference):
    waves = [reference[f"wave_{c}"] for c in CLIPS]
    lengths = [len(w) for w in waves]
    samples = max(lengths) + 500  # not a multiple of the hop
    # Noise past each clip's length must be ignored exactly like zeros.
    audio = np.random.default_rng(0).uniform(-1, 1, (len(waves), samples)).astype(np.float32)
    for row, wave in zip(audio, waves, strict=True):
        row[: len(wave)] = wave
    logmel, valid = run(audio, lengths)
    total = frontend.num_frames(samples)
    assert logmel.shape == (4, total, 128) and valid.shape == (4, total)
    for row, (clip, length) in enumerate(zip(CLIPS, lengths, strict=True)):
        frames = -(-length // 160)
        assert_official(logmel[row, :frames], reference[f"logmel_{clip}"])
        np.testing.assert_array_equal(valid[row], np.arange(total) < frames)
        # Frames past the end see only zeros: the log-mel of silence.
        np.testing.assert_allclose(logmel[row, frames + 2 :], SILENCE_LOGMEL, atol=1e-6)


def test_fft_method_linear_mel_within_tolerance(reference):
    wave = reference["wave_chirp_2s"]
    logmel, _ = run(wave[None], [len(wave)], "fft")
    expected = reference["logmel_chirp_2s"]
    peak = linear_mel(expected).max()
    assert np.abs(linear_mel(logmel[0]) - linear_mel(expected)).max() <= 1e-5 * peak


def test_int16_is_scaled_by_1_over_32768():
    audio = np.random.default_rng(1).integers(-20000, 20000, (2, 1000)).astype(np.int16)
    from_int, _ = run(audio, [1000, 700], "dft")
    from_float, _ = run(audio.astype(np.float32) / 32768.0, [1000, 700], "dft")
    np.testing.assert_allclose(from_int, from_float, atol=1e-6)


def test_folded_equals_dft_on_int16_noise():
    audio = np.random.default_rng(2).integers(-30000, 30000, (2, 2400)).astype(np.int16)
    folded, _ = run(audio, [2400, 1111], "folded")
    dft, _ = run(audio, [2400, 1111], "dft")
    np.testing.assert_allclose(folded, dft, atol=1e-4)


@pytest.mark.parametrize("sub_batches", [1, 2])
def test_sharded_batch_matches_unsharded(sub_batches):
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(3)
    audio = rng.integers(-9000, 9000, (16, 1600)).astype(np.int16)
    lengths = rng.integers(1, 1601, 16).astype(np.int32)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.device_put(audio, sharding), jax.device_put(lengths, sharding)
    fn = jax.jit(
        lambda a, n: frontend.log_mel(a, n, sub_batches=sub_batches),
        out_shardings=(sharding, sharding),
    )
    # Every clip is computed on the device that holds it: no collectives at all.
    hlo = fn.lower(*sharded).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))
    logmel, valid = fn(*sharded)
    assert len(logmel.sharding.device_set) == 8
    expected, expected_valid = run(audio, lengths)
    np.testing.assert_allclose(np.asarray(logmel), expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(valid), expected_valid)


def test_sub_batches_give_the_same_result():
    audio = np.random.default_rng(4).normal(0, 0.2, (6, 900)).astype(np.float32)
    lengths = [900, 1, 450, 0, 899, 160]
    whole, whole_valid = run(audio, lengths)
    fn = jax.jit(lambda a, n: frontend.log_mel(a, n, sub_batches=3))
    logmel, valid = fn(audio, np.asarray(lengths, np.int32))
    np.testing.assert_allclose(np.asarray(logmel), whole, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(valid), whole_valid)
    np.testing.assert_array_equal(whole_valid.sum(axis=1), [6, 1, 3, 0, 6, 1])


def test_bad_inputs_raise_clear_errors():
    audio = jnp.zeros((2, 800), jnp.int16)
    lengths = jnp.array([800, 800])
    with pytest.raises(ValueError, match="batch axis"):
        frontend.log_mel(audio[0], lengths[:1])
    with pytest.raises(ValueError, match="audio_len"):
        frontend.log_mel(audio, lengths[:1])
    with pytest.raises(ValueError, match="int16 or float"):
        frontend.log_mel(audio.astype(jnp.int32), lengths)
    with pytest.raises(ValueError, match="method"):
        frontend.log_mel(audio, lengths, method="stft")
    with pytest.raises(ValueError, match="sub_batches"):
        frontend.log_mel(audio, lengths, sub_batches=3)

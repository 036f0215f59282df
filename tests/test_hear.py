"""The HEAR API module against the rules of the official validator (numpy input)."""

import numpy as np
import pytest

from cacophony_jax import hear
from cacophony_jax.convert import export
from cacophony_jax.convert.bundle import BundleError
from cacophony_jax.data.tokenizer import Tokenizer

LENGTHS = (1.07, 4.0)  # the validator's shortest and longest clips, in seconds
BATCHES = (1, 3)


@pytest.fixture(scope="module")
def bundles(official_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hear")
    tok = Tokenizer.train_bpe(["a dog barks", "rain on a roof", "an engine idles"] * 5, 400)
    caco = export.export_from_official(official_dir / "Cacophony_tiny.ckpt", root / "caco",
                                       tokenizer_path=tok.save(root / "tokenizer.json"),
                                       text_length=16)
    mae = export.export_from_official(official_dir / "AudioMAE_tiny.ckpt", root / "mae")
    return {"cacophony": caco, "mae": mae}


@pytest.fixture(scope="module", params=["cacophony", "mae"])
def model(request, bundles):
    return hear.load_model(str(bundles[request.param]))


def noise(batch, seconds, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (batch, round(seconds * 16000))).astype(np.float32)


def test_model_attributes(model):
    for name in ("sample_rate", "scene_embedding_size", "timestamp_embedding_size"):
        assert type(getattr(model, name)) is int, name
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == 64 and model.timestamp_embedding_size == 64


@pytest.mark.parametrize("seconds", LENGTHS)
@pytest.mark.parametrize("batch", BATCHES)
def test_scene_embeddings(model, batch, seconds):
    audio = noise(batch, seconds)
    out = hear.get_scene_embeddings(audio, model)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (batch, model.scene_embedding_size)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, hear.get_scene_embeddings(audio, model))


@pytest.mark.parametrize("seconds", LENGTHS)
@pytest.mark.parametrize("batch", BATCHES)
def test_timestamp_embeddings(model, batch, seconds):
    audio = noise(batch, seconds, seed=1)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    # Every 40 ms from 0 to the end: 1.07 s -> 0 .. 1040 ms; 4 s -> 0 .. 4000 ms.
    steps = {1.07: 27, 4.0: 101}[seconds]
    assert isinstance(emb, np.ndarray) and emb.dtype == np.float32
    assert emb.shape == (batch, steps, model.timestamp_embedding_size)
    assert isinstance(ts, np.ndarray) and ts.dtype == np.float32 and ts.shape == (batch, steps)
    assert np.isfinite(emb).all() and np.isfinite(ts).all()
    np.testing.assert_array_equal(ts[0], 40.0 * np.arange(steps))
    # HEAR's rules: a hop of at most 50 ms, timestamps covering the clip.
    assert np.all(np.diff(ts, axis=1) <= 50.0)
    assert seconds * 1000.0 - 50.0 < ts[0, -1] <= seconds * 1000.0
    # Neighbouring timestamps come from different encodings and differ.
    assert not np.allclose(emb[:, 0], emb[:, 1]) and not np.allclose(emb[:, 1], emb[:, 2])
    empty, empty_ts = hear.get_timestamp_embeddings(audio[:0], model)
    assert empty.shape == (0, steps, model.timestamp_embedding_size)
    assert empty_ts.shape == (0, steps)
    for nothing in (audio[:0], audio[:0, :0]):  # an empty batch, of any length
        assert hear.get_scene_embeddings(nothing, model).shape == (
            0, model.scene_embedding_size)
    again, ts_again = hear.get_timestamp_embeddings(audio, model)
    np.testing.assert_array_equal(emb, again)
    np.testing.assert_array_equal(ts, ts_again)


def _freq_means(model, audio):
    states, _, _ = model.model.audio_states(audio, 16000)
    return states.reshape(audio.shape[0], -1, 8, states.shape[-1]).mean(2)


def test_timestamp_embedding_is_the_frequency_mean_of_the_step_centred_on_it(model):
    audio = noise(2, 1.07, seed=2)
    samples = audio.shape[1]
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    # A step's frames cover 175 ms (2,800 samples): 87.5 ms of silence in front centres
    # step m on 160 m ms; starting the clip 40, 80 or 120 ms later gives the others.
    # Every encoding reads 87.5 ms + the clip (18,520 samples), silence after the clip.
    for k, front in enumerate((1400, 760, 120, -520)):
        shifted = np.zeros((2, 1400 + samples), np.float32)
        if front >= 0:
            shifted[:, front:front + samples] = audio
        else:
            shifted[:, :samples + front] = audio[:, -front:]
        want = _freq_means(model, shifted)
        np.testing.assert_allclose(emb[:, k::4], want[:, :len(ts[0, k::4])], rtol=1e-5,
                                   atol=1e-6)
    assert not np.allclose(emb[0], emb[1])  # different clips, different embeddings


@pytest.mark.parametrize("samples", [17120, 17280, 24000, 24001, 2401, 700])
def test_each_timestamp_step_reads_the_175_ms_centred_on_it(model, monkeypatch, samples):
    """The audio behind every timestamp's step, read off what the encoder is given."""
    # Every sample tells where it came from (kept exact through float32 and int16).
    audio = (np.arange(1, samples + 1) % 30000 / 32767.0).astype(np.float32)[None]
    seen = []
    real = model.model.audio_states

    def spy(wave, rate):
        seen.append(np.array(wave))
        return real(wave, rate)

    monkeypatch.setattr(model.model, "audio_states", spy)
    _, ts = hear.get_timestamp_embeddings(audio, model)
    assert len(seen) == 4 and len({w.shape for w in seen}) == 1  # one compiled shape
    clip = np.pad(audio[0], (1400, 2800))  # the clip from 87.5 ms before its start
    for j, t in enumerate(ts[0]):
        k, m = j % 4, j // 4
        start = round(t * 16)  # the step's 175 ms centred on t, from the padded clip
        got = seen[k][0, 2560 * m:2560 * m + 2800]
        np.testing.assert_array_equal(got, clip[start:start + 2800], err_msg=f"t={t} ms")
    assert ts[0, -1] > samples / 16 - 40


def test_load_model_reads_the_environment(bundles, monkeypatch):
    monkeypatch.delenv(hear.ENV_VAR, raising=False)
    with pytest.raises(hear.HearError, match="CACOPHONY_BUNDLE"):
        hear.load_model()
    monkeypatch.setenv(hear.ENV_VAR, str(bundles["mae"]))
    assert hear.load_model().model.kind == "mae"
    with pytest.raises(BundleError, match="does not exist"):
        hear.load_model(str(bundles["mae"]) + "-missing")


def test_bad_audio_is_refused(model):
    with pytest.raises(hear.HearError, match=r"\[n, samples\]"):
        hear.get_scene_embeddings(noise(1, 1.0)[0], model)
    with pytest.raises(hear.HearError, match="float"):
        hear.get_timestamp_embeddings((noise(1, 1.0) * 1000).astype(np.int32), model)
    with pytest.raises(hear.HearError, match="load_model"):
        hear.get_scene_embeddings(noise(1, 1.0), object())
    with pytest.raises(hear.HearError, match="holds no samples"):
        hear.get_scene_embeddings(np.zeros((2, 0), np.float32), model)


def test_short_clips_get_timestamps_and_timestamps_are_writable(model):
    for samples in (1, 8, 2400):  # 8 samples used to pass for 8 channels
        audio = noise(2, 1.0)[:, :samples]
        scene = hear.get_scene_embeddings(audio, model)
        emb, ts = hear.get_timestamp_embeddings(audio, model)
        count = 1 + samples // 640
        assert scene.shape == (2, 64) and np.isfinite(scene).all()
        assert emb.shape == (2, count, 64) and np.isfinite(emb).all()
        assert ts.tolist() == [[40.0 * j for j in range(count)]] * 2
        padded = np.pad(audio, ((0, 0), (0, 2401 - samples)))
        np.testing.assert_array_equal(scene, hear.get_scene_embeddings(padded, model))
        empty, empty_ts = hear.get_timestamp_embeddings(audio[:0], model)
        assert empty.shape == (0, count, 64) and empty_ts.shape == (0, count)
    ts += 87.5  # a caller may shift its own timestamps in place
    assert (ts[:, 0] == 87.5).all()

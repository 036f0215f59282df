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
    # 16-frame steps of 160 ms: 1.07 s -> 107 frames -> 6 steps; 4 s -> 400 -> 25.
    steps = {1.07: 6, 4.0: 25}[seconds]
    assert isinstance(emb, np.ndarray) and emb.dtype == np.float32
    assert emb.shape == (batch, steps, model.timestamp_embedding_size)
    assert isinstance(ts, np.ndarray) and ts.dtype == np.float32 and ts.shape == (batch, steps)
    assert np.isfinite(emb).all() and np.isfinite(ts).all()
    # The middle of the audio each step's frames cover: 160 k ms to 160 k + 175 ms.
    np.testing.assert_array_equal(ts[0], 87.5 + 160.0 * np.arange(steps))
    assert np.all(np.abs(np.diff(ts, axis=1) - 160.0) < 1.0)  # evenly spaced within 1 ms
    assert ts[0, -1] < seconds * 1000.0
    empty, empty_ts = hear.get_timestamp_embeddings(audio[:0], model)
    assert empty.shape == (0, steps, model.timestamp_embedding_size)
    assert empty_ts.shape == (0, steps)
    for nothing in (audio[:0], audio[:0, :0]):  # an empty batch, of any length
        assert hear.get_scene_embeddings(nothing, model).shape == (
            0, model.scene_embedding_size)
    again, ts_again = hear.get_timestamp_embeddings(audio, model)
    np.testing.assert_array_equal(emb, again)
    np.testing.assert_array_equal(ts, ts_again)


def test_timestamp_embedding_is_the_mean_over_frequency(model):
    audio = noise(2, 1.07, seed=2)
    emb, _ = hear.get_timestamp_embeddings(audio, model)
    states, _, _ = model.model.audio_states(audio, 16000)
    np.testing.assert_allclose(emb, states.reshape(2, 6, 8, -1).mean(2), rtol=1e-6)
    # Different clips in one batch get different embeddings.
    assert not np.allclose(emb[0], emb[1])


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


def test_clips_shorter_than_a_step_are_padded_and_timestamps_are_writable(model):
    for samples in (1, 8, 2400):  # 8 samples used to pass for 8 channels
        audio = noise(2, 1.0)[:, :samples]
        scene = hear.get_scene_embeddings(audio, model)
        emb, ts = hear.get_timestamp_embeddings(audio, model)
        assert scene.shape == (2, 64) and np.isfinite(scene).all()
        assert emb.shape == (2, 1, 64) and ts.tolist() == [[87.5], [87.5]]
        padded = np.pad(audio, ((0, 0), (0, 2401 - samples)))
        np.testing.assert_array_equal(scene, hear.get_scene_embeddings(padded, model))
        empty, empty_ts = hear.get_timestamp_embeddings(audio[:0], model)
        assert empty.shape == (0, 1, 64) and empty_ts.shape == (0, 1)
    ts -= 87.5  # a caller may shift its own timestamps in place
    assert not ts.any()

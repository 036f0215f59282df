"""The inference API on bundles exported from the official tiny fixtures (its errors and
warnings are in test_inference_errors.py)."""

import functools

import jax
import numpy as np
import pytest

from cacophony_jax import inference
from cacophony_jax.audio import frontend, io, patches
from cacophony_jax.convert import export, official
from cacophony_jax.data import tokenizer
from cacophony_jax.data.tokenizer import Tokenizer
from cacophony_jax.models.audio_encoder import AudioEncoder
from cacophony_jax.models.cacophony import Cacophony

WINDOW = 1.5  # seconds: long-audio rules show up on short, cheap clips
CAPTIONS = ["a dog barks twice", "rain falls on a tin roof", "a car engine idles",
            "birds sing in the morning", "a door slams shut"] * 4


def export_bundles(official_dir, root):
    """The official tiny Cacophony and AudioMAE checkpoints as bundles under `root`."""
    tok = Tokenizer.train_bpe(CAPTIONS, 500).save(root / "tokenizer.json")
    caco = export.export_from_official(official_dir / "Cacophony_tiny.ckpt", root / "caco",
                                       tokenizer_path=tok, text_length=16,
                                       window_seconds=WINDOW)
    mae = export.export_from_official(official_dir / "AudioMAE_tiny.ckpt", root / "mae",
                                      window_seconds=WINDOW)
    return caco, mae


@pytest.fixture(scope="module")
def model(inference_bundles):
    return inference.load(inference_bundles[0])


@pytest.fixture(scope="module")
def converted(official_dir):
    return official.load_official_cacophony(official_dir / "Cacophony_tiny.ckpt")


def noise(seconds, seed=0, scale=0.3):
    n = round(seconds * 16000)
    return (np.random.default_rng(seed).uniform(-scale, scale, n)).astype(np.float32)


def tone(seconds, hz, scale=0.5):
    t = np.arange(round(seconds * 16000)) / 16000
    return (scale * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _tower(config, params, audio):
    feats = patches.patchify(*frontend.log_mel(audio, np.asarray([audio.shape[1]])))
    return Cacophony(config).apply({"params": params}, *feats, method="encode_audio")


def direct(converted, wave):
    """Front end + audio tower on one unpadded clip, outside inference.py."""
    states, emb = _tower(converted[0], converted[1], io.to_int16(wave)[None])
    return np.asarray(states[0]), np.asarray(emb[0])


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_reference_outputs_through_the_bundle(model, official_dir):
    ref = dict(np.load(official_dir / "reference_io.npz"))
    states, emb = model.encode_patches(ref["audio_patches"], ref["audio_time_inds"],
                                       ref["audio_freq_inds"], ref["audio_mask"])
    text_states, text_emb = model.encode_token_ids(ref["text_input_ids"], ref["text_mask"])
    for name, value in (("audio_hidden_state", states), ("audio_embedding", emb),
                        ("text_hidden_state", text_states), ("text_embedding", text_emb)):
        err = np.linalg.norm(value - ref[name]) / np.linalg.norm(ref[name])
        assert err <= 1e-4, (name, err)
    assert model.embedding_size == 64 and model.state_size == 64
    assert model.sample_rate == 16000 and model.window_seconds == WINDOW


def test_embed_audio_is_the_front_end_and_tower(model, converted):
    clips = [noise(0.8, 1), tone(1.2, 440)]
    out = model.embed_audio(clips, sample_rate=16000)
    assert out.shape == (2, 64) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    for row, clip in zip(out, clips, strict=True):
        np.testing.assert_allclose(row, unit(direct(converted, clip)[1]), atol=2e-5)


def test_paths_arrays_and_sample_rates(model, tmp_path):
    wave = noise(1.0, 2)
    pcm = io.to_int16(wave)
    io.write_audio(tmp_path / "a16.wav", pcm, 16000)
    pcm44 = io.to_int16(noise(1.0, 3))
    io.write_audio(tmp_path / "a44.wav", pcm44, 44100)
    from_path = model.embed_audio([tmp_path / "a16.wav", str(tmp_path / "a44.wav")])
    # A path, its int16 samples and the same samples as float are one input.
    np.testing.assert_array_equal(from_path[0], model.embed_audio([pcm], sample_rate=16000)[0])
    np.testing.assert_array_equal(from_path[0], model.embed_audio(wave, sample_rate=16000)[0])
    # 44.1 kHz audio is resampled, from a file and from an array alike.
    at44 = model.embed_audio([pcm44], sample_rate=44100)[0]
    np.testing.assert_array_equal(from_path[1], at44)
    resampled = io.to_int16(io.resample(io.to_float32(pcm44), 44100, 16000))
    np.testing.assert_array_equal(at44, model.embed_audio([resampled], sample_rate=16000)[0])
    assert not np.allclose(at44, model.embed_audio([pcm44], sample_rate=16000)[0])
    # A 2-D array is a batch of clips.
    batch = np.stack([noise(0.7, 4), noise(0.7, 5)])
    np.testing.assert_allclose(model.embed_audio(batch, sample_rate=16000),
                               model.embed_audio(list(batch), sample_rate=16000), atol=1e-6)


def test_long_audio_windows_are_averaged(model, converted):
    w = round(WINDOW * 16000)
    kept = noise(4.0, 6)  # 1.5 + 1.5 + 1.0: the 1 s tail is kept
    dropped = noise(3.5, 7)  # 1.5 + 1.5 + 0.5: the tail is dropped
    out = model.embed_audio([kept, dropped], sample_rate=16000)
    pieces = [kept[:w], kept[w:2 * w], kept[2 * w:]]
    want = unit(np.mean([direct(converted, p)[1] for p in pieces], axis=0))
    np.testing.assert_allclose(out[0], want, atol=2e-5)
    want = unit(np.mean([direct(converted, p)[1] for p in (dropped[:w], dropped[w:2 * w])],
                        axis=0))
    np.testing.assert_allclose(out[1], want, atol=2e-5)
    # Averaging windows is not the same as embedding the first window.
    assert not np.allclose(out[1], unit(direct(converted, dropped[:w])[1]), atol=1e-3)
    # window_seconds: the whole clip in one pass (as the release evaluated Clotho).
    whole = model.embed_audio([kept, dropped], sample_rate=16000, window_seconds=4.0)
    for row, clip in zip(whole, (kept, dropped), strict=True):
        np.testing.assert_allclose(row, unit(direct(converted, clip)[1]), atol=2e-5)
    np.testing.assert_allclose(model.embed_audio([kept], sample_rate=16000,
                                                 window_seconds=WINDOW), out[:1], atol=1e-6)
    with pytest.raises(inference.InferenceError, match=r"window_seconds=0.5 is outside"):
        model.embed_audio([kept], sample_rate=16000, window_seconds=0.5)


def test_caption_describes_the_first_window_seconds(model, monkeypatch):
    seen, real = [], model._over_windows

    def spy(windows, fn, batch_size, window=None):
        seen.append(([w.shape[0] for w in windows], window))
        return real(windows, fn, batch_size, window)

    monkeypatch.setattr(model, "_over_windows", spy)
    clip, w = noise(3.5, 2), round(WINDOW * 16000)
    model.caption([clip], sample_rate=16000, max_len=8)
    model.caption([clip], sample_rate=16000, max_len=8, window_seconds=4.0)
    model.caption([clip], sample_rate=16000, max_len=8, window_seconds=2.0)
    assert seen == [([w], w), ([clip.shape[0]], 64000), ([32000], 32000)]
    with pytest.raises(inference.InferenceError, match=r"window_seconds=700 is outside"):
        model.caption([clip], sample_rate=16000, window_seconds=700)
    with pytest.raises(inference.InferenceError, match=r"a number of seconds or None, got '5'"):
        model.caption([clip], sample_rate=16000, window_seconds="5")


def test_determinism_and_batch_size_invariance(model):
    clips = [noise(s, i) for i, s in enumerate((1.2, 0.9, 1.4, 3.4, 1.5))]  # one bucket
    a = model.embed_audio(clips, sample_rate=16000)
    np.testing.assert_array_equal(a, model.embed_audio(clips, sample_rate=16000))
    np.testing.assert_allclose(a, model.embed_audio(clips, sample_rate=16000, batch_size=1),
                               atol=2e-5)


def test_embed_text_and_similarity(model, converted, caplog):
    texts = ["a dog barks", "rain on a roof", "an engine"]
    out = model.embed_text(texts)
    assert out.shape == (3, 64) and out.dtype == np.float32
    config, params = converted
    ids, mask = model.tokenizer.encode(texts, 16)
    _, want = jax.jit(functools.partial(Cacophony(config).apply, method="encode_text"))(
        {"params": params}, ids, mask)
    np.testing.assert_allclose(out, unit(np.asarray(want)), atol=2e-5)
    audio = model.embed_audio([noise(1.0, 1), tone(1.0, 300)], sample_rate=16000)
    sim = model.similarity(audio, out)
    assert sim.shape == (2, 3)
    np.testing.assert_allclose(sim, audio @ out.T, atol=1e-6)
    np.testing.assert_allclose(model.similarity(audio * 7.0, out * 0.1), sim, atol=1e-6)
    assert model.embed_text([]).shape == (0, 64)
    # One text is one row, as one path is one clip for embed_audio.
    np.testing.assert_allclose(model.embed_text("rain on a roof"), out[1:2], atol=1e-6)
    for bad in (None, 3, b"bytes"):
        with pytest.raises(inference.InferenceError, match="takes a text or a list"):
            model.embed_text(bad)
    # A text longer than the model's text length is cut, and the caller told so.
    long = " ".join(["a dog barks loudly"] * 10)
    with caplog.at_level("WARNING"):
        model.embed_text(["rain", long])
    assert "1 of 2 texts are longer than the model's 16 tokens" in caplog.text
    assert "e.g. text 1" in caplog.text
    # A command-line word that is not UTF-8 reaches Python with lone surrogates.
    np.testing.assert_allclose(model.embed_text("a\udcffb"), model.embed_text("a\ufffdb"))


def test_caption_returns_strings(model):
    clips = [noise(1.0, 1), tone(1.2, 300), noise(3.5, 2)]  # windows share one bucket
    greedy = model.caption(clips, sample_rate=16000, max_len=8)
    assert len(greedy) == 3 and all(isinstance(c, str) for c in greedy)
    # Only the first window of a long clip is described.
    firsts = clips[:2] + [clips[2][:round(WINDOW * 16000)]]
    assert greedy == model.caption(firsts, sample_rate=16000, max_len=8)
    beam = model.caption(clips, sample_rate=16000, method="beam", beam_size=2, max_len=8)
    sampled = model.caption(clips, sample_rate=16000, method="sample", seed=3, max_len=8)
    assert len(beam) == 3 and all(isinstance(c, str) for c in beam)
    assert sampled == model.caption(clips, sample_rate=16000, method="sample", seed=3, max_len=8)
    # A clip's sampled caption depends on the seed and the clip, not on its batch mates.
    alone = [model.caption([c], sample_rate=16000, method="sample", seed=3, max_len=8)[0]
             for c in clips]
    assert alone == sampled
    assert model.caption(clips[::-1], sample_rate=16000, method="sample", seed=3,
                         max_len=8) == sampled[::-1]
    assert model.caption(clips, sample_rate=16000, method="sample", seed=4,
                         max_len=8) != sampled
    with pytest.raises(inference.InferenceError, match="unknown decoding method .nucleus."):
        model.caption(clips, sample_rate=16000, method="nucleus")
    for seed in (2**32, -1):  # JAX's keys hold 32 bits: these would repeat others
        with pytest.raises(inference.InferenceError, match=r"seed must be in \[0, 2\*\*32"):
            model.caption(clips, sample_rate=16000, method="sample", seed=seed)
    # What a byte-level tokenizer gives for cut UTF-8 or control bytes is dropped.
    assert all(inference.printable(c) == c for c in greedy + beam + sampled)
    assert inference.printable(" car\ufffd\ufffdflac\x0e\bm\r\n a\u2028b ") == "car flac m a b"
    # A caption that reaches max_len without eos ends at its last whole word.
    seen = []
    real = model.tokenizer.decode

    def decode(ids):
        seen.append(np.asarray(ids))
        return real(ids)

    model.tokenizer.decode = decode
    try:
        texts = model.caption(clips, sample_rate=16000, max_len=8)
    finally:
        del model.tokenizer.decode
    for row, full, text in zip(seen[0], real(seen[0]), texts, strict=True):
        if 2 in row:  # eos: the whole caption
            assert text == tokenizer.printable(full)
        else:
            assert text == tokenizer.cut_caption(full)
            assert tokenizer.printable(full).startswith(text)
    assert tokenizer.cut_caption("a dog barks noti") == "a dog barks"
    assert tokenizer.cut_caption("dogbark") == "dogbark"
    # A cut inside a character leaves U+FFFD: that piece is the word that goes; a word
    # with nothing printable before it stays, as a one-word caption does.
    assert tokenizer.cut_caption("a dog bar\ufffd") == "a dog"
    assert tokenizer.cut_caption("a dog \ufffd") == "a dog"
    assert tokenizer.cut_caption("\ufffd dog") == "dog"


def test_bucketing_reuses_compiled_functions(inference_bundles):
    model = inference.load(inference_bundles[0])
    model.embed_audio([noise(0.50)], sample_rate=16000)  # 8000 samples -> bucket 10240
    model.embed_audio([noise(0.55)], sample_rate=16000)
    assert model.trace_counts["encode_audio"] == 1
    model.embed_audio([noise(0.5), noise(0.6), noise(0.62)], sample_rate=16000)  # 3 -> 4 rows
    model.embed_audio([noise(0.45), noise(0.52), noise(0.58), noise(0.6)], sample_rate=16000)
    assert model.trace_counts["encode_audio"] == 2
    assert model._encode_audio._cache_size() == 2
    model.embed_text(["a dog"])
    model.embed_text(["rain falls on a roof today"])
    assert model.trace_counts["encode_text"] == 1


def test_audio_states_chunk_long_clips(model, converted):
    config, params = converted
    clip = noise(4.0, 8)  # 400 frames = 25 steps; a 1.5 s window holds 9 steps
    states, time_idx, mask = model.audio_states(np.stack([clip, clip * 0.5]), 16000)
    assert states.shape == (2, 200, 64) and states.dtype == np.float32
    assert time_idx.dtype == np.int32 and mask.dtype == bool and mask.all()
    np.testing.assert_array_equal(time_idx[0], np.arange(200) // 8)
    # Chunk 2 (steps 9..17) is encoded as a clip of its own, starting at time 0.
    audio = io.to_int16(clip)[None]
    p, t, f, m = jax.jit(lambda a: patches.patchify(*frontend.log_mel(
        a, np.asarray([a.shape[1]]))))(audio)
    chunk = slice(72, 144)
    want = jax.jit(AudioEncoder(config.audio).apply)(
        {"params": params["audio_encoder"]}, p[:, chunk], t[:, chunk] - 9, f[:, chunk],
        m[:, chunk])
    np.testing.assert_allclose(states[0, chunk], np.asarray(want[0]), atol=1e-5)
    # A clip within one window is one chunk: the tower's own states.
    short = noise(1.07, 9)
    states, time_idx, _ = model.audio_states(short[None], 16000)
    assert states.shape == (1, 48, 64)  # 107 frames -> 6 steps
    np.testing.assert_allclose(states[0], direct(converted, short)[0], atol=1e-5)


def test_audio_states_of_long_clips_encode_a_bounded_number_of_chunks(model, monkeypatch):
    rows = []
    real = model._chunk_states
    monkeypatch.setattr(model, "_chunk_states", lambda p, patch, *a: rows.append(
        patch.shape[0]) or real(p, patch, *a))
    clip = noise(14.0, 3)  # 1400 frames = 87 steps: 10 chunks of a 1.5 s window
    whole = model.audio_states(np.stack([clip, clip * 0.5, clip * 0.25]), 16000)
    rows.clear()
    small = model.audio_states(np.stack([clip, clip * 0.5, clip * 0.25]), 16000, batch_size=4)
    assert max(rows) <= 4 and sum(rows) >= 30  # never all 30 chunks at once
    for got, want in zip(small, whole, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # Longer clips reuse the compiled encoder: its shapes are chunk batches of 1, 2 or 4
    # rows, not one per clip length.
    traced = model.trace_counts["audio_states"]
    for seconds in (15.5, 17.0, 19.0, 21.0, 25.0, 30.0):
        model.audio_states(noise(seconds, 4)[None], 16000, batch_size=4)
    assert model.trace_counts["audio_states"] <= traced + 2


def test_mae_bundle(inference_bundles, official_dir):
    model = inference.load(inference_bundles[1])
    assert model.kind == "mae" and model.tokenizer is None and model.embedding_size == 64
    clip = noise(1.2, 1)
    config, params = official.load_official_mae(official_dir / "AudioMAE_tiny.ckpt")
    audio = io.to_int16(clip)[None]

    @jax.jit
    def encode(audio):
        feats = patches.patchify(*frontend.log_mel(audio, np.asarray([audio.shape[1]])))
        return AudioEncoder(config.encoder).apply({"params": params["encoder"]}, *feats), feats

    states, feats = encode(audio)
    want = unit(np.asarray(states[0])[np.asarray(feats[3][0])].mean(0))
    np.testing.assert_allclose(model.embed_audio([clip], sample_rate=16000)[0], want, atol=2e-5)
    assert model.audio_states(clip[None], 16000)[0].shape == (1, 56, 64)
    with pytest.raises(inference.InferenceError, match="stage-2"):
        model.embed_text(["a dog"])
    with pytest.raises(inference.InferenceError, match="stage-2"):
        model.caption([clip], sample_rate=16000)


def test_bfloat16_bundle_runs_close_to_float32(model, official_dir, tmp_path):
    bf16 = inference.load(export.export_from_official(
        official_dir / "Cacophony_tiny.ckpt", tmp_path / "bf16",
        tokenizer_path=model.tokenizer.save(tmp_path / "tokenizer.json"), text_length=16,
        window_seconds=WINDOW, dtype="bfloat16"))
    clips = [noise(1.2, 1), tone(1.4, 500)]
    audio, audio32 = (m.embed_audio(clips, sample_rate=16000) for m in (bf16, model))
    text, text32 = (m.embed_text(["a dog barks"]) for m in (bf16, model))
    assert audio.dtype == text.dtype == np.float32
    assert np.all(np.sum(audio * audio32, axis=1) > 0.99)
    assert np.sum(text * text32) > 0.99

"""The official tiny checkpoints, converted, reproduce every reference output to 1e-4."""

import functools

import jax
import numpy as np
import pytest
from flax import serialization

from cacophony_jax.convert.official import (
    OfficialCheckpointError,
    load_official_cacophony,
    load_official_mae,
)
from cacophony_jax.models.cacophony import Cacophony
from cacophony_jax.models.mae import MAE
from cacophony_jax.models.variants import cacophony_config, mae_config

TOL = 1e-4


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def ref(official_dir):
    return dict(np.load(official_dir / "reference_io.npz"))


@pytest.mark.parametrize("scan", [False, True])
def test_cacophony_outputs_match_reference(official_dir, ref, scan):
    config, params = load_official_cacophony(official_dir / "Cacophony_tiny.ckpt", scan=scan)
    assert config == cacophony_config("tiny")
    model = Cacophony(config, scan=scan)
    apply = jax.jit(functools.partial(model.apply, {"params": params}))
    audio = (ref["audio_patches"], ref["audio_time_inds"], ref["audio_freq_inds"],
             ref["audio_mask"])
    text = (ref["text_input_ids"], ref["text_mask"])
    out = apply(*audio, *text)
    audio_states, audio_embedding = jax.jit(
        functools.partial(model.apply, {"params": params}, method="encode_audio"))(*audio)
    text_states, text_embedding = jax.jit(
        functools.partial(model.apply, {"params": params}, method="encode_text"))(*text)
    # The decoder alone, on the reference's own inputs.
    logits = jax.jit(functools.partial(model.apply, {"params": params}, method="caption_logits"))(
        ref["text_hidden_state"], ref["text_mask"], ref["audio_hidden_state"], ref["audio_mask"])
    checks = {
        "audio_hidden_state": audio_states,
        "audio_embedding": audio_embedding,
        "text_hidden_state": text_states,
        "text_embedding": text_embedding,
        "decoder_logits": logits,
    }
    for name, value in checks.items():
        assert value.shape == ref[name].shape, name
        assert rel_err(value, ref[name]) <= TOL, (name, rel_err(value, ref[name]))
    # The full forward pass chains the towers into the decoder.
    assert rel_err(out["caption_logits"], ref["decoder_logits"]) <= TOL
    assert rel_err(out["audio_embedding"], ref["audio_embedding"]) <= TOL
    assert rel_err(out["text_embedding"], ref["text_embedding"]) <= TOL
    assert float(out["logit_scale"]) == float(ref["logit_scale"])


@pytest.mark.parametrize("scan", [False, True])
def test_mae_reconstruction_matches_reference(official_dir, ref, scan):
    config, params = load_official_mae(official_dir / "AudioMAE_tiny.ckpt", scan=scan)
    assert config == mae_config("tiny")
    names = ("visible_patches", "visible_time_inds", "visible_freq_inds", "visible_mask",
             "restore_time_inds", "restore_freq_inds", "restore_mask")
    out = jax.jit(MAE(config, scan=scan).apply)({"params": params},
                                                 *[ref[f"mae_{n}"] for n in names])
    assert out.shape == ref["mae_reconstruction"].shape
    assert rel_err(out, ref["mae_reconstruction"]) <= TOL


def _restore(path):
    return serialization.msgpack_restore(path.read_bytes())


def _write(path, tree):
    path.write_bytes(serialization.msgpack_serialize(tree))
    return path


def test_wrong_loader_and_bad_files_have_clear_errors(official_dir, tmp_path):
    with pytest.raises(OfficialCheckpointError, match="stage-1 AudioMAE.*load_official_mae"):
        load_official_cacophony(official_dir / "AudioMAE_tiny.ckpt")
    with pytest.raises(OfficialCheckpointError, match="stage-2 Cacophony.*load_official_cacophony"):
        load_official_mae(official_dir / "Cacophony_tiny.ckpt")
    with pytest.raises(OfficialCheckpointError, match="does not exist"):
        load_official_mae(tmp_path / "nope.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\xc1 this is not msgpack")
    with pytest.raises(OfficialCheckpointError, match="not a Flax msgpack checkpoint"):
        load_official_cacophony(garbage)


def test_missing_unknown_and_misshaped_keys_are_listed_together(official_dir, tmp_path):
    tree = _restore(official_dir / "Cacophony_tiny.ckpt")
    params = tree["0"]["params"]
    del params["text_proj"]["bias"]
    params["audio_attention_pool"]["extra"] = np.zeros(3, np.float32)
    params["audio_attention_pool"]["query"] = np.zeros(65, np.float32)
    path = _write(tmp_path / "broken.ckpt", tree)
    with pytest.raises(OfficialCheckpointError) as info:
        load_official_cacophony(path)
    message = str(info.value)
    assert "missing: ['text_proj/bias']" in message
    assert "unknown: ['audio_attention_pool/extra']" in message
    assert "audio_attention_pool/query (65,) (expected (64,))" in message


def test_sizes_are_read_from_shapes(official_dir, tmp_path):
    # Drop the second audio layer: the loader must infer a 1-layer encoder, not fail.
    tree = _restore(official_dir / "AudioMAE_tiny.ckpt")
    del tree["0"]["params"]["AudioEncoder_0"]["AudioEncoderLayer_1"]
    config, params = load_official_mae(_write(tmp_path / "one_layer.ckpt", tree), scan=True)
    assert config.encoder.layers == 1
    assert params["encoder"]["blocks"]["attn"]["query"]["kernel"].shape == (1, 64, 8, 8)
    # Text heads cannot be read from shapes: unknown sizes need text_heads=.
    tree = _restore(official_dir / "Cacophony_tiny.ckpt")
    emb = tree["0"]["params"]["text_module"]["embeddings"]["word_embeddings"]
    emb["embedding"] = np.zeros((300, 64), np.float32)
    tree["0"]["params"]["decoder_module"]["decoder_proj"] = {
        "kernel": np.zeros((64, 300), np.float32), "bias": np.zeros(300, np.float32)}
    path = _write(tmp_path / "vocab300.ckpt", tree)
    with pytest.raises(OfficialCheckpointError, match=r"text tower head count cannot be read "
                       r"from '.*vocab300.ckpt'.*--text-heads N on the export command "
                       r"\(text_heads=N in Python\), N dividing the width 64"):
        load_official_cacophony(path)
    config, _ = load_official_cacophony(path, text_heads=2)
    assert (config.text.vocab_size, config.text.heads) == (300, 2)
    for heads in (3, 0):
        with pytest.raises(OfficialCheckpointError,
                           match=f"--text-heads {heads} .text_heads=. must be a whole number "
                                 "dividing the text tower width 64 of '.*vocab300.ckpt'"):
            load_official_cacophony(path, text_heads=heads)
    with pytest.raises(OfficialCheckpointError, match="--pool-heads 5 .pool_heads=. must be"):
        load_official_cacophony(path, text_heads=2, pool_heads=5)


def test_non_finite_weights_are_refused_as_a_damaged_file(official_dir, tmp_path):
    # A few flipped bytes inside a weight array read as NaN.
    raw = bytearray((official_dir / "Cacophony_tiny.ckpt").read_bytes())
    raw[1000:1010] = b"\xff" * 10
    damaged = tmp_path / "Cacophony.ckpt"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(OfficialCheckpointError, match=r"'.*Cacophony.ckpt' is damaged: NaN or "
                       r"infinite values in 1 of its arrays \(audio_attention_pool/Dense_0/"
                       r"kernel\); download it again"):
        load_official_cacophony(damaged)
    tree = _restore(official_dir / "Cacophony_tiny.ckpt")
    tree["0"]["params"]["logit_scale"] = np.float32(np.nan)
    bias = tree["0"]["params"]["text_proj"]["bias"].copy()
    bias[3] = np.inf
    tree["0"]["params"]["text_proj"]["bias"] = bias
    with pytest.raises(OfficialCheckpointError,
                       match=r"2 of its arrays \(logit_scale, text_proj/bias\)"):
        load_official_cacophony(_write(tmp_path / "nan.ckpt", tree))
    tree = _restore(official_dir / "AudioMAE_tiny.ckpt")
    tree["0"]["params"]["AudioDecoder_0"]["restore_patch"] = np.full(64, -np.inf, np.float32)
    with pytest.raises(OfficialCheckpointError, match="AudioDecoder_0/restore_patch"):
        load_official_mae(_write(tmp_path / "inf.ckpt", tree))

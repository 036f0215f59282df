"""The inference API's clear errors for wrong inputs and its warnings about unusual audio."""

import logging

import jax
import numpy as np
import pytest

from cacophony_jax import inference
from cacophony_jax.audio import io
from cacophony_jax.convert.bundle import BundleError
from tests.test_inference import noise


@pytest.fixture(scope="module")
def model(inference_bundles):
    return inference.load(inference_bundles[0])


def test_a_window_far_beyond_training_clips_warns_once(model, caplog):
    long = 2 * model.window_seconds + 0.37  # a length no other test uses (warned once)
    clip = noise(long, 3)
    with caplog.at_level(logging.WARNING):
        model.embed_audio([clip], sample_rate=16000, window_seconds=2 * model.window_seconds)
        assert "trained on" not in caplog.text  # twice the training length: no warning
        model.embed_audio([noise(1.5, 3)], sample_rate=16000, window_seconds=long)
        assert "trained on" not in caplog.text  # no clip that long: nothing to say
        for _ in range(2):
            model.embed_audio([clip], sample_rate=16000, window_seconds=long)
            model.caption([clip], sample_rate=16000, max_len=4, window_seconds=long)
    warned = [r for r in caplog.records if "trained on" in r.getMessage()]
    assert len(warned) == 1 and "--window-seconds 0" in warned[0].getMessage()


def test_clear_errors(model, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        inference.load(tmp_path / "missing")
    stereo = np.stack([noise(1.0), noise(1.0, 1)], axis=1)
    with pytest.raises(io.AudioError, match="average the channels"):
        model.embed_audio(stereo, sample_rate=16000)
    with pytest.raises(io.AudioError, match="average the channels"):
        model.embed_audio([stereo], sample_rate=16000)
    with pytest.raises(io.AudioError, match="sample_rate="):
        model.embed_audio([noise(1.0)])
    with pytest.raises(io.AudioError, match="at least 2401"):
        model.embed_audio([noise(0.1)], sample_rate=16000)
    with pytest.raises(io.AudioError, match="does not exist"):
        model.embed_audio([tmp_path / "nope.wav"])
    with pytest.raises(inference.InferenceError, match="takes texts .str., got int"):
        model.embed_text(["a dog", 3])
    with pytest.raises(inference.InferenceError, match="similarity"):
        model.similarity(np.zeros((2, 64)), np.zeros((2, 32)))
    assert jax.tree.leaves(model.params)[0].dtype == np.float32


def test_clear_errors_for_wrong_argument_types(model, inference_bundles, tmp_path):
    clip = noise(1.0)
    cases = [
        (lambda: model.embed_audio(None), io.AudioError, "audio must be a path.*got NoneType"),
        (lambda: model.embed_audio(list(clip[:3]), sample_rate=16000), io.AudioError,
         "a list of 3 numbers is read as a list of clips"),
        (lambda: model.embed_audio(clip, sample_rate="16000"), io.AudioError,
         r"sample_rate must be a positive whole number of Hz, got '16000' \(str\)"),
        (lambda: model.embed_audio([np.stack([clip, clip])], sample_rate=16000), io.AudioError,
         r"\[channels, samples\].*audio.mean\(axis=0\)"),
        (lambda: model.embed_audio([clip], sample_rate=16000, batch_size="4"),
         inference.InferenceError, "batch_size must be a whole number, got '4'"),
        (lambda: model.caption([clip], sample_rate=16000, max_len=0),
         inference.InferenceError, r"max_len=0 must be in \[2"),
        (lambda: model.caption([clip], sample_rate=16000, method="sample", seed="1"),
         inference.InferenceError, "seed must be a whole number, got '1'"),
        (lambda: model.audio_states([clip, clip[:12000]], 16000), inference.InferenceError,
         "audio_states takes clips of one length"),
        (lambda: inference.load(inference_bundles[0], device="banana"), BundleError,
         "no 'banana' device in this process"),
        (lambda: inference.load(inference_bundles[0], device=3), BundleError,
         "device must be a jax.Device"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    # What is accepted: a bytes path, a JAX array, a whole float rate, a platform name.
    path = tmp_path / "clip.wav"
    io.write_audio(path, io.to_int16(clip))
    np.testing.assert_array_equal(model.embed_audio([bytes(path)]), model.embed_audio([path]))
    np.testing.assert_array_equal(model.embed_audio(p for p in [path]),  # any iterable
                                  model.embed_audio([path]))
    np.testing.assert_allclose(model.embed_audio(jax.numpy.asarray(clip), sample_rate=16000.0),
                               model.embed_audio(clip, sample_rate=16000), atol=1e-6)
    on_cpu = inference.load(inference_bundles[0], device="cpu")
    assert on_cpu.embedding_size == model.embedding_size
    # A training workdir, its checkpoints folder or a step in it: the export command.
    (tmp_path / "run" / "checkpoints" / "100").mkdir(parents=True)
    for where in ("run", "run/checkpoints", "run/checkpoints/100"):
        with pytest.raises(BundleError, match=r"holds a training run; write its bundle with "
                                              r"`python -m cacophony_jax.cli export "
                                              r"--checkpoint \S*run --out BUNDLE`"):
            inference.load(tmp_path / where)


def test_loud_float_audio_warns_once(model, monkeypatch, caplog):
    from cacophony_jax.audio import clips

    monkeypatch.setattr(clips, "_warned_loud", False)
    loud = noise(1.0, 7) * 32767  # int16 samples cast to float without scaling
    with caplog.at_level(logging.WARNING):
        model.embed_audio(noise(1.0, 7), sample_rate=16000)
        assert "dividing by 32768" not in caplog.text  # in [-1, 1]: nothing said
        model.embed_audio([loud, loud], sample_rate=16000)
    assert caplog.text.count("dividing by 32768") == 1 and "peak 9" in caplog.text


def test_a_folder_of_several_training_runs_names_those_with_checkpoints(tmp_path):
    # The README's layout: runs/mae (stage 1) and runs/caco (stage 2) in one folder.
    (tmp_path / "runs" / "mae" / "checkpoints" / "5").mkdir(parents=True)
    (tmp_path / "runs" / "caco" / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "runs" / "new" / "checkpoints").mkdir(parents=True)  # nothing saved yet
    with pytest.raises(BundleError) as raised:
        inference.load(tmp_path / "runs")
    message = str(raised.value)
    assert (f"holds several training runs ({tmp_path}/runs/caco, {tmp_path}/runs/mae); write "
            "the bundle of one of them with `python -m cacophony_jax.cli export "
            "--checkpoint RUN --out BUNDLE`") in message and "new" not in message
    # One run with checkpoints: that one, never one without.
    (tmp_path / "runs" / "caco" / "checkpoints" / "10").rmdir()
    with pytest.raises(BundleError, match=r"holds a training run; write its bundle with "
                                          r"`python -m cacophony_jax.cli export "
                                          r"--checkpoint \S*runs/mae --out BUNDLE`"):
        inference.load(tmp_path / "runs")
    (tmp_path / "runs" / "mae" / "checkpoints" / "5").rmdir()
    with pytest.raises(BundleError, match="missing\\); create one with the export command"):
        inference.load(tmp_path / "runs")


def test_a_bundles_metadata_file_or_damaged_params_name_the_fix(inference_bundles, tmp_path):
    import pathlib
    import shutil

    folder = pathlib.Path(inference_bundles[0])
    with pytest.raises(BundleError, match="pass the bundle folder that holds it: "):
        inference.load(folder / "bundle.json")
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    chunk = max((damaged / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[:10])  # the weights, not the tree's metadata
    with pytest.raises(BundleError, match="params of .* are corrupt") as info:
        inference.load(damaged)
    assert "TensorStore details" not in str(info.value)  # Orbax's pointer, printed badly
    assert str(info.value).endswith("; re-export the bundle")

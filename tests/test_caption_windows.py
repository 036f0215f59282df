"""Captions of every window of a long clip, with their time spans: `caption_windows` and
`caption --every-window`."""

import numpy as np
import pytest
import soundfile

from cacophony_jax import cli, inference
from cacophony_jax.audio import io
from tests.test_inference import WINDOW, noise, tone

RATE = 16000


@pytest.fixture(scope="module")
def model(inference_bundles):
    return inference.load(inference_bundles[0])


def _clip(seconds, seed):
    """int16 audio whose windows differ (a tone that rises, over noise), so a caption
    given to the wrong window is likely to show."""
    wave = tone(seconds, 300 + 500 * seed) + noise(seconds, seed, 0.1)
    t = np.arange(wave.shape[0]) / RATE
    return io.to_int16(wave * (0.3 + 0.6 * (t % WINDOW) / WINDOW))


@pytest.mark.parametrize("options", [{}, {"method": "sample", "seed": 1}])
def test_every_window_is_captioned_with_its_span(model, monkeypatch, options):
    w = round(WINDOW * RATE)
    kept, dropped, short = _clip(4.1, 1), _clip(3.9, 2), _clip(1.2, 3)  # 1.1 s, 0.9 s left
    calls = []
    real = model._over_windows

    def spy(windows, fn, batch_size, window=None):
        calls.append(len(windows))
        return real(windows, fn, batch_size, window)

    monkeypatch.setattr(model, "_over_windows", spy)
    spans = model.caption_windows([kept, dropped, short], sample_rate=RATE, max_len=8,
                                  **options)
    assert calls == [3 + 2 + 1]  # every window of every clip in one batched call
    monkeypatch.setattr(model, "_over_windows", real)
    assert [[(start, end) for start, end, _ in clip] for clip in spans] == [
        [(0.0, 1.5), (1.5, 3.0), (3.0, kept.shape[0] / RATE)],  # the 1.1-s rest is kept
        [(0.0, 1.5), (1.5, 3.0)],  # the 0.9-s rest is dropped, as embed_audio drops it
        [(0.0, short.shape[0] / RATE)]]  # one window, ending at the clip's true length
    # Each window's caption is the caption of that piece cut out by hand.
    for clip, clip_spans in zip((kept, dropped, short), spans, strict=True):
        pieces = [clip[round(start * RATE):round(end * RATE)] for start, end, _ in clip_spans]
        assert [p.shape[0] for p in pieces[:-1]] == [w] * (len(pieces) - 1)
        assert [text for _, _, text in clip_spans] == model.caption(
            pieces, sample_rate=RATE, max_len=8, **options)
    # Its first window's caption is what `caption` says of the whole clip.
    assert [clip[0][2] for clip in spans] == model.caption([kept, dropped, short],
                                                           sample_rate=RATE, max_len=8,
                                                           **options)
    if options:  # the tiny model's greedy captions hardly differ; sampled ones do, so a
        # caption given to the wrong window would show
        assert len({text for clip in spans for _, _, text in clip}) > 3


def test_options_are_those_of_caption(model, inference_bundles):
    clip = _clip(3.3, 4)
    spans = model.caption_windows(clip, sample_rate=RATE, window_seconds=2.0, max_len=6,
                                  method="sample", seed=5)
    assert [(start, end) for start, end, _ in spans[0]] == [(0.0, 2.0), (2.0, 3.3)]
    # A window's sampled caption depends on the seed and its audio, as `caption`'s does.
    assert [text for _, _, text in spans[0]] == model.caption(
        [clip[:32000], clip[32000:]], sample_rate=RATE, window_seconds=2.0, max_len=6,
        method="sample", seed=5)
    assert model.caption_windows([], sample_rate=RATE) == []
    with pytest.raises(inference.InferenceError, match="seed must be in"):
        model.caption_windows(clip, sample_rate=RATE, seed=-1)
    with pytest.raises(inference.InferenceError, match="caption_windows needs a stage-2"):
        inference.load(inference_bundles[1]).caption_windows(clip, sample_rate=RATE)


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_every_window_and_the_unchanged_default(model, inference_bundles, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda path: model)
    bundle = inference_bundles[0]
    long, short = tmp_path / "long.wav", tmp_path / "short.wav"
    soundfile.write(long, _clip(4.1, 1), RATE)
    soundfile.write(short, _clip(1.2, 3), RATE)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    spans = model.caption_windows([str(long), str(short)], max_len=8)
    code, out, err = _run(capsys, "caption", tmp_path, "--bundle", bundle, "--max-len", "8",
                          "--every-window")
    assert code == 0 and "skipped 1 of 3" in err and "broken.wav" in err
    assert out.splitlines() == [
        f"{long}\t0.000-1.500\t{spans[0][0][2]}", f"{long}\t1.500-3.000\t{spans[0][1][2]}",
        f"{long}\t3.000-4.100\t{spans[0][2][2]}", f"{short}\t0.000-1.200\t{spans[1][0][2]}"]
    # Without the flag: one "path<TAB>caption" line per file, as before.
    code, out, _ = _run(capsys, "caption", long, short, "--bundle", bundle,
                        "--max-len", "8")
    firsts = model.caption([str(long), str(short)], max_len=8)
    assert code == 0 and out.splitlines() == [f"{long}\t{firsts[0]}", f"{short}\t{firsts[1]}"]
    code, out, _ = _run(capsys, "caption", long, "--bundle", bundle, "--max-len", "8",
                        "--every-window", "--window-seconds", "2.005")
    assert code == 0 and [line.split("\t")[1] for line in out.splitlines()] == [
        "0.000-2.005", "2.005-4.010"]  # the last 0.09 s is dropped

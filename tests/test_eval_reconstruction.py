"""Reconstruction metrics, unpatchify and the PNG writer."""

import struct
import zlib

import numpy as np
import pytest

from cacophony_jax.evals.reconstruction import (
    ReconstructionInputError,
    reconstruction_metrics,
    save_spectrogram_png,
    spectrogram_to_pixels,
    unpatchify,
)


def _patchify_by_loops(spec):
    """The release's patch order, written out: patch k = (k // 8, k % 8), element t * 16 + f."""
    num_time = spec.shape[0] // 16
    patches = np.zeros((num_time * 8, 256), spec.dtype)
    for k in range(num_time * 8):
        ti, fi = k // 8, k % 8
        for t in range(16):
            for f in range(16):
                patches[k, t * 16 + f] = spec[ti * 16 + t, fi * 16 + f]
    return patches


def test_metrics_by_hand():
    pred = np.zeros((2, 3, 256))
    target = np.zeros((2, 3, 256))
    # Scored patches (target, pred): (0, 1), (2, 2), (4, 1) -> squared errors 1, 0, 9.
    target[0, 0], pred[0, 0] = 0.0, 1.0
    target[0, 1], pred[0, 1] = 2.0, 2.0
    target[1, 0], pred[1, 0] = 4.0, 1.0
    # Unscored patches carry large errors that must not count.
    target[0, 2], pred[0, 2] = 50.0, -7.0
    target[1, 1:], pred[1, 1:] = 9.0, -9.0
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    metrics = reconstruction_metrics(pred, target, mask)
    assert metrics["mse"] == pytest.approx(10 / 3)
    # Target mean over scored elements is 2, variance (4 + 0 + 4) / 3.
    assert metrics["normalized_mse"] == pytest.approx((10 / 3) / (8 / 3))
    assert metrics["num_patches"] == 3


def test_metrics_within_a_patch():
    # One scored patch whose elements alternate 0 / 2 (variance 1); pred is 1 everywhere.
    target = np.tile([0.0, 2.0], 128)[None, None, :]
    pred = np.ones_like(target)
    metrics = reconstruction_metrics(pred, target, np.ones((1, 1)))
    assert metrics["mse"] == pytest.approx(1.0)
    assert metrics["normalized_mse"] == pytest.approx(1.0)  # predicting the mean


def test_metric_errors():
    x = np.zeros((1, 2, 256))
    with pytest.raises(ReconstructionInputError, match="one entry per patch"):
        reconstruction_metrics(x, x, np.ones((1, 3)))
    with pytest.raises(ReconstructionInputError, match="no patch"):
        reconstruction_metrics(x, x, np.zeros((1, 2)))
    with pytest.raises(ReconstructionInputError, match="pred"):
        reconstruction_metrics(x, x[:, :1], np.ones((1, 2)))


def test_unpatchify_inverts_patchify():
    rng = np.random.default_rng(0)
    spec = rng.normal(size=(40, 128)).astype(np.float32)  # 2 whole time patches + 8 frames
    patches = _patchify_by_loops(spec)
    k = np.arange(patches.shape[0])
    # A hand-picked pixel: frame 19, bin 87 is patch (1, 5) = 13, element 3 * 16 + 7.
    assert patches[13, 55] == spec[19, 87]
    image = unpatchify(patches, k // 8, k % 8, num_frames=40, fill_value=-1.0)
    np.testing.assert_array_equal(image[:32], spec[:32])
    np.testing.assert_array_equal(image[32:], -1.0)  # trailing frames fill no patch
    assert unpatchify(patches, k // 8, k % 8).shape == (32, 128)


def test_unpatchify_subset_in_any_order():
    rng = np.random.default_rng(1)
    spec = rng.normal(size=(48, 128)).astype(np.float32)
    patches = _patchify_by_loops(spec)
    k = np.arange(patches.shape[0])
    keep = rng.permutation(k)[:10]  # shuffled survivors, as after patch dropout
    valid = np.ones(12, bool)
    valid[10:] = False  # two padding rows with junk indices
    padded = np.concatenate([patches[keep], np.full((2, 256), 99.0)])
    ti = np.concatenate([keep // 8, [7, 7]])
    fi = np.concatenate([keep % 8, [0, 0]])
    image = unpatchify(padded, ti, fi, num_frames=48, valid=valid, fill_value=np.nan)
    for j in range(patches.shape[0]):
        block = image[(j // 8) * 16 : (j // 8 + 1) * 16, (j % 8) * 16 : (j % 8 + 1) * 16]
        expected = spec[(j // 8) * 16 : (j // 8 + 1) * 16, (j % 8) * 16 : (j % 8 + 1) * 16]
        if j in keep:
            np.testing.assert_array_equal(block, expected)
        else:
            assert np.isnan(block).all()


def test_unpatchify_errors():
    patches = np.zeros((2, 256))
    with pytest.raises(ReconstructionInputError, match="frequency indices"):
        unpatchify(patches, [0, 0], [0, 8])
    with pytest.raises(ReconstructionInputError, match="num_frames"):
        unpatchify(patches, [0, 2], [0, 1], num_frames=32)
    with pytest.raises(ReconstructionInputError, match="one example"):
        unpatchify(np.zeros((1, 2, 256)), [0, 0], [0, 1])


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color, interlace) == (8, 0, 0)
    assert b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all()  # filter type "none"
    return rows[:, 1:]


def test_png_round_trip(tmp_path):
    # 2 frames x 3 bins, range 0..5 -> grey = 51 * value; time runs right, frequency up.
    spec = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    expected = np.array([[102, 255], [51, 204], [0, 153]], np.uint8)
    np.testing.assert_array_equal(spectrogram_to_pixels(spec), expected)
    save_spectrogram_png(tmp_path / "spec.png", spec)
    np.testing.assert_array_equal(_read_png(tmp_path / "spec.png"), expected)
    # Fixed limits clip: values past vmax are white.
    np.testing.assert_array_equal(spectrogram_to_pixels(spec, 0.0, 2.5)[0], [204, 255])


def test_png_bad_folder(tmp_path):
    with pytest.raises(ReconstructionInputError, match="folder exists"):
        save_spectrogram_png(tmp_path / "missing" / "spec.png", np.zeros((2, 2)))

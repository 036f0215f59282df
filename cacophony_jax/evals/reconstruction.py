"""MAE reconstruction quality, and turning patches back into a viewable spectrogram.

Patch layout (SPEC section 3): a patch covers 16 frames x 16 mel bins and is flattened
time-major (element t * 16 + f); a patch with time index i and frequency index j covers
frames 16 i .. 16 i + 15 and mel bins 16 j .. 16 j + 15 of the [frames, 128] log-mel.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

PATCH_FRAMES = 16
PATCH_BINS = 16
NUM_MELS = 128
FREQ_PATCHES = NUM_MELS // PATCH_BINS
PATCH_DIM = PATCH_FRAMES * PATCH_BINS


class ReconstructionInputError(ValueError):
    """Arrays whose shapes or indices do not describe patches of one spectrogram."""


def reconstruction_metrics(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray
) -> dict[str, float]:
    """Mean squared error on the selected patches, raw and relative to the target variance.

    "mse" averages (pred - target)^2 over all elements of the patches with mask 1 (a
    float mask weights patches). "normalized_mse" divides it by the variance of the
    target over those same elements (weighted, around their mean), i.e. 1 - R^2: 0 is a
    perfect reconstruction, 1 is no better than predicting the mean value.

    Args:
      pred: [B, N, 256] predicted patches.
      target: [B, N, 256] true patches, aligned with `pred`.
      mask: [B, N] 1 for patches to score (the masked ones in MAE), 0 elsewhere.

    Returns:
      {"mse", "normalized_mse", "num_patches"} (num_patches = sum of the mask). A
      constant target has no variance; normalized_mse is then NaN.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ReconstructionInputError(
            f"pred {pred.shape} and target {target.shape} must both be [B, N, patch_dim]"
        )
    if mask.shape != pred.shape[:2]:
        raise ReconstructionInputError(
            f"mask has shape {mask.shape}; expected {pred.shape[:2]} (one entry per patch)"
        )
    if np.any(mask < 0):
        raise ReconstructionInputError("mask has negative entries; use 1 to score, 0 to skip")
    weight = mask.sum()
    if weight == 0:
        raise ReconstructionInputError("mask selects no patch; nothing to score")
    dim = pred.shape[2]
    w = mask[..., None]
    mse = float((w * (pred - target) ** 2).sum() / (weight * dim))
    mean = (w * target).sum() / (weight * dim)
    variance = float((w * (target - mean) ** 2).sum() / (weight * dim))
    normalized = mse / variance if variance > 0 else float("nan")
    return {"mse": mse, "normalized_mse": normalized, "num_patches": float(weight)}


def unpatchify(
    patches: np.ndarray,
    time_idx: np.ndarray,
    freq_idx: np.ndarray,
    num_frames: int | None = None,
    valid: np.ndarray | None = None,
    fill_value: float = 0.0,
) -> np.ndarray:
    """Rebuilds a [frames, 128] log-mel image from (possibly a subset of) its patches.

    Args:
      patches: [N, 256] patch vectors, element t * 16 + f.
      time_idx: [N] int time index of each patch.
      freq_idx: [N] int frequency index of each patch (0..7).
      num_frames: frames of the output; default 16 x (largest time index + 1). Frames
        past the last whole patch (dropped by patching) get `fill_value`.
      valid: optional [N] mask; patches with 0 (padding) are ignored.
      fill_value: value of pixels no patch covers (dropped or masked patches).

    Returns:
      [num_frames, 128] float32 array, frame-major like the front end's output.
    """
    patches = np.asarray(patches)
    time_idx = np.asarray(time_idx, dtype=np.int64)
    freq_idx = np.asarray(freq_idx, dtype=np.int64)
    if patches.ndim != 2 or patches.shape[1] != PATCH_DIM:
        raise ReconstructionInputError(
            f"patches must be [N, {PATCH_DIM}]; got {patches.shape} (take one example)"
        )
    n = patches.shape[0]
    if time_idx.shape != (n,) or freq_idx.shape != (n,):
        raise ReconstructionInputError(
            f"time_idx {time_idx.shape} and freq_idx {freq_idx.shape} must be [{n}]"
        )
    keep = np.ones(n, bool) if valid is None else np.asarray(valid).astype(bool)
    if keep.shape != (n,):
        raise ReconstructionInputError(f"valid has shape {keep.shape}; expected ({n},)")
    patches, time_idx, freq_idx = patches[keep], time_idx[keep], freq_idx[keep]
    if num_frames is None:
        num_frames = PATCH_FRAMES * (int(time_idx.max()) + 1 if time_idx.size else 0)
    if time_idx.size and (time_idx.min() < 0 or PATCH_FRAMES * (time_idx.max() + 1) > num_frames):
        raise ReconstructionInputError(
            f"time indices span 0..{time_idx.max()}, which needs "
            f"{PATCH_FRAMES * (time_idx.max() + 1)} frames; num_frames is {num_frames}"
        )
    if freq_idx.size and (freq_idx.min() < 0 or freq_idx.max() >= FREQ_PATCHES):
        raise ReconstructionInputError(
            f"frequency indices must be in 0..{FREQ_PATCHES - 1}; got "
            f"{freq_idx.min()}..{freq_idx.max()}"
        )
    image = np.full((num_frames, NUM_MELS), fill_value, dtype=np.float32)
    blocks = patches.reshape(-1, PATCH_FRAMES, PATCH_BINS)
    for block, t, f in zip(blocks, time_idx, freq_idx, strict=True):
        image[t * PATCH_FRAMES : (t + 1) * PATCH_FRAMES, f * PATCH_BINS : (f + 1) * PATCH_BINS] = (
            block
        )
    return image


def spectrogram_to_pixels(
    spec: np.ndarray, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Maps a [frames, bins] spectrogram to 8-bit grey levels for viewing.

    Time runs left to right and frequency bottom to top (row 0 = highest mel bin).

    Args:
      spec: [frames, bins] values; NaN pixels become black.
      vmin: value shown black; default the finite minimum.
      vmax: value shown white; default the finite maximum.

    Returns:
      [bins, frames] uint8 image.
    """
    spec = np.asarray(spec, dtype=np.float64)
    if spec.ndim != 2 or spec.size == 0:
        raise ReconstructionInputError(f"spec must be a non-empty [frames, bins]; got {spec.shape}")
    finite = spec[np.isfinite(spec)]
    low = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    high = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    span = high - low if high > low else 1.0
    scaled = np.clip((np.nan_to_num(spec, nan=low) - low) / span, 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8).T[::-1]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def save_spectrogram_png(
    path: str | os.PathLike,
    spec: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
) -> None:
    """Writes a spectrogram as an 8-bit greyscale PNG (see `spectrogram_to_pixels`).

    Args:
      path: output file; its folder must exist.
      spec: [frames, bins] values, e.g. `unpatchify` output.
      vmin: value shown black; default the minimum.
      vmax: value shown white; default the maximum.
    """
    pixels = spectrogram_to_pixels(spec, vmin, vmax)
    height, width = pixels.shape
    # Filter type 0 (none) in front of every row; zlib does the compression.
    raw = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as err:
        raise ReconstructionInputError(
            f"cannot write PNG to {os.fspath(path)!r} ({err.strerror}); "
            "check that the folder exists and is writable"
        ) from None

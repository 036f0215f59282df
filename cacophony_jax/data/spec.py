"""The batch contract between the host input pipeline and the device step.

Every batch is a flat dict of numpy arrays whose leading dimension is the batch
(per host on the host side, global once `to_global` has assembled it). Audio
stays int16 at 16 kHz until the device: the log-mel front end, patching, patch
dropout and MAE masking run inside the jitted step with static shapes.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000

# Special token ids of the RoBERTa vocabulary (and of the BPE vocabularies we train).
BOS_ID = 0
PAD_ID = 1
EOS_ID = 2

# Keys and dtypes of a training batch. Stage 1 ignores the text keys.
TRAIN_KEYS: dict[str, np.dtype] = {
    "audio": np.dtype(np.int16),  # [B, S] zero-padded waveform
    "audio_len": np.dtype(np.int32),  # [B] true sample count (<= S)
    "text_ids": np.dtype(np.int32),  # [B, T] bos ... eos pad pad
    "text_mask": np.dtype(np.int32),  # [B, T] 1 on real tokens (bos/eos included)
    "valid": np.dtype(np.float32),  # [B] 0 on padding rows of a last eval batch
}

# Evaluation batches add these.
EVAL_KEYS: dict[str, np.dtype] = {
    "example_id": np.dtype(np.int32),  # [B] index of the clip in its eval set
    "label": np.dtype(np.int32),  # [B] class index, -1 when unlabelled
}


def check_batch(batch: dict[str, np.ndarray], keys: dict[str, np.dtype]) -> None:
    """Raises ValueError naming the first key that breaks the contract."""
    size = None
    for key, dtype in keys.items():
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}; it has {sorted(batch)}")
        value = batch[key]
        if value.dtype != dtype:
            raise ValueError(f"batch[{key!r}] has dtype {value.dtype}, expected {dtype}")
        if size is None:
            size = value.shape[0]
        elif value.shape[0] != size:
            raise ValueError(
                f"batch[{key!r}] has leading dimension {value.shape[0]}, expected {size}"
            )

"""How a loaded bundle runs: its jitted towers on one device and the host-side batching.

`ModelRuntime` holds the model's jit-compiled functions (the audio tower on windows or
on ready-made patches, the front end alone, the encoder on window-sized chunks, the
text tower; `_describer` adds the caption decoder) and runs them over rows padded to
bucketed batch sizes, and long clips over window-sized chunks, so calls with new
lengths mostly reuse compiled code.
`cacophony_jax.inference.CacophonyModel` is its public API and documents the rules.
"""

from __future__ import annotations

import collections
import numbers
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cacophony_jax.audio import clips as clips_lib
from cacophony_jax.audio import frontend, patches
from cacophony_jax.audio.clips import SAMPLE_RATE, STEP_SAMPLES
from cacophony_jax.convert import bundle
from cacophony_jax.data.tokenizer import Tokenizer
from cacophony_jax.models import decoding
from cacophony_jax.models.audio_encoder import AudioEncoder
from cacophony_jax.models.cacophony import Cacophony

# Bounds of a window given to `embed_audio`: a second (at least a few patch steps) to
# ten minutes (attention over one window's patches grows with its square).
MIN_WINDOW_SECONDS, MAX_WINDOW_SECONDS = 1.0, 600.0


class InferenceError(ValueError):
    """A request the loaded model cannot serve; the message says what to do instead."""


class ModelRuntime:
    """A bundle's model on one device: jitted towers, bucketed batches, chunked clips.

    Its attributes are those `cacophony_jax.inference.CacophonyModel` lists.
    """

    def __init__(self, meta: dict[str, Any], params: Any, tokenizer: Tokenizer | None = None):
        """Wraps parameters read by ``bundle.read_bundle`` (prefer ``inference.load``).

        Args:
          meta: the bundle metadata.
          params: the unrolled parameter tree, placed on the device to run on.
          tokenizer: the bundle's tokenizer (None for "mae").
        """
        self.meta = meta
        self.kind: str = meta["kind"]
        self.config = bundle.model_config(meta)
        self.sample_rate: int = SAMPLE_RATE
        self.window_seconds: float = float(meta["window_seconds"])
        self.text_length: int = int(meta["text_length"])
        self.tokenizer = tokenizer
        self.params = params
        self.trace_counts: collections.Counter[str] = collections.Counter()
        dtype = bundle.DTYPES[meta["dtype"]]
        if self.kind == "cacophony":
            self.module: Cacophony | None = Cacophony(self.config, dtype=dtype)
            audio_cfg, self._encoder_key = self.config.audio, "audio_encoder"
            self.embedding_size: int = self.config.projection
        else:
            self.module = None
            audio_cfg, self._encoder_key = self.config.encoder, "encoder"
            self.embedding_size = audio_cfg.hidden
        self.state_size: int = audio_cfg.hidden
        self._encoder = AudioEncoder(audio_cfg, dtype=dtype)
        self._window = round(self.window_seconds * SAMPLE_RATE)
        self._window_steps = clips_lib.patch_steps(self._window)
        self._warned_windows: set[int] = set()
        self._encode_audio = jax.jit(self._encode_audio_impl)
        self._encode_patches = jax.jit(self._encode_patches_impl)
        self._patches = jax.jit(self._patches_impl)
        self._chunk_states = jax.jit(self._chunk_states_impl)
        self._encode_text = jax.jit(self._encode_text_impl)

    # ---- traced functions ------------------------------------------------------------

    def _audio_tower(self, params, patch, time_idx, freq_idx, mask):
        """(states [B, N, D] float32, unnormalised embedding [B, P] float32)."""
        if self.module is not None:
            states, emb = self.module.apply({"params": params}, patch, time_idx, freq_idx,
                                            mask, method=Cacophony.encode_audio)
            return states.astype(jnp.float32), emb
        states = self._encoder.apply({"params": params[self._encoder_key]}, patch, time_idx,
                                     freq_idx, mask).astype(jnp.float32)
        weight = mask.astype(jnp.float32)[..., None]
        return states, jnp.sum(states * weight, 1) / jnp.maximum(jnp.sum(weight, 1), 1.0)

    def _encode_patches_impl(self, params, patch, time_idx, freq_idx, mask):
        self.trace_counts["encode_patches"] += 1
        return self._audio_tower(params, patch, time_idx, freq_idx, mask)

    def _encode_audio_impl(self, params, audio, audio_len):
        """Windows -> (states, patch mask, unnormalised embedding)."""
        self.trace_counts["encode_audio"] += 1
        feats = patches.patchify(*frontend.log_mel(audio, audio_len))
        states, emb = self._audio_tower(params, *feats)
        return states, feats[3], emb

    def _patches_impl(self, params, audio, audio_len):
        """Clips -> (patches, time index, frequency index, mask) of the whole clip."""
        del params
        self.trace_counts["audio_patches"] += 1
        return patches.patchify(*frontend.log_mel(audio, audio_len))

    def _chunk_states_impl(self, params, patch, time_idx, freq_idx, mask):
        """Encoder states of window-sized chunks, each encoded as a clip of its own."""
        self.trace_counts["audio_states"] += 1
        return self._encoder.apply({"params": params[self._encoder_key]}, patch, time_idx,
                                   freq_idx, mask).astype(jnp.float32)

    def _encode_text_impl(self, params, ids, mask):
        self.trace_counts["encode_text"] += 1
        states, emb = self.module.apply({"params": params}, ids, mask,
                                        method=Cacophony.encode_text)
        return states.astype(jnp.float32), emb

    # ---- host-side helpers -----------------------------------------------------------

    def _batched(self, fn: Callable, arrays: Sequence[np.ndarray], batch_size: int) -> Any:
        """Runs ``fn(params, *rows)`` over row chunks padded to a bucketed batch size."""
        if batch_size < 1:
            raise InferenceError(f"batch_size must be at least 1, got {batch_size}")
        outs = []
        for start in range(0, arrays[0].shape[0], batch_size):
            chunk = [a[start:start + batch_size] for a in arrays]
            rows = chunk[0].shape[0]
            out = jax.device_get(fn(self.params, *clips_lib.pad_rows(chunk, batch_size)))
            outs.append(jax.tree.map(lambda x, r=rows: np.asarray(x)[:r], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    def _window_for(self, seconds: float) -> int:
        """Samples of a `seconds`-long embedding window (checked)."""
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
            raise InferenceError(f"window_seconds must be a number of seconds or None, got "
                                 f"{seconds!r} ({type(seconds).__name__})")
        if not MIN_WINDOW_SECONDS <= seconds <= MAX_WINDOW_SECONDS:
            raise InferenceError(
                f"window_seconds={seconds} is outside [{MIN_WINDOW_SECONDS}, "
                f"{MAX_WINDOW_SECONDS}]; the bundle's own window is {self.window_seconds} s")
        return round(float(seconds) * SAMPLE_RATE)

    def _warn_if_long(self, window: int, clips: Sequence[np.ndarray]) -> None:
        """One warning per window length when clips much longer than the training clips
        go through the model in one pass (a window over twice the training length, and
        a clip over that too)."""
        longest = max((clip.shape[0] for clip in clips), default=0)
        if min(window, longest) <= 2 * self._window or window in self._warned_windows:
            return
        self._warned_windows.add(window)
        logging.warning(
            "window_seconds=%g: clips of up to %g s go through the model in one pass, but "
            "this bundle was trained on %g-s clips and may do worse on much longer ones; "
            "window_seconds=None (--window-seconds 0 on the command line) cuts them into "
            "windows of its own length", window / SAMPLE_RATE, window / SAMPLE_RATE,
            self.window_seconds)

    def _over_windows(self, windows: list[np.ndarray], fn: Callable,
                      batch_size: int, window: int | None = None) -> list[Any]:
        """``fn`` on every window, grouped by length bucket; results in input order.
        `window`: the longest window in samples (default: the bundle's)."""
        results: list[Any] = [None] * len(windows)
        for index, audio, lengths in clips_lib.length_groups(windows, window or self._window):
            out = self._batched(fn, (audio, lengths), batch_size)
            for row, i in enumerate(index):
                results[i] = out[row]
        return results

    def _describer(self, seed: int, method: str, max_len: int, beam_size: int,
                   temperature: float, length_penalty: float) -> Callable:
        """The function `_over_windows` runs to caption windows: (params, audio, lengths)
        -> generated ids [B, max_len] (options checked by the caller)."""
        rng = jax.random.key(seed)

        def describe(params, audio, lengths):
            states, mask, _ = self._encode_audio(params, audio, lengths)
            keys = rng
            if method == "sample":  # keyed by content, not by place in the batch
                digests = [zlib.crc32(np.ascontiguousarray(row[:n]).tobytes())
                           for row, n in zip(np.asarray(audio), np.asarray(lengths),
                                             strict=True)]
                keys = jax.vmap(jax.random.fold_in, (None, 0))(
                    rng, jnp.asarray(digests, jnp.uint32))
            return decoding.generate(self.module, params, states, mask, method=method,
                                     max_len=max_len, rng=keys, temperature=temperature,
                                     beam_size=beam_size, length_penalty=length_penalty,
                                     vocab_size=self.tokenizer.vocab_size,
                                     banned=self.tokenizer.never_generated)

        return describe

    def _need_text(self, what: str) -> None:
        if self.kind != "cacophony":
            raise InferenceError(f"{what} needs a stage-2 (cacophony) bundle; this is a "
                                 f"{self.kind!r} bundle, which only embeds audio")

    def _chunked_states(self, clips: list[np.ndarray], batch_size: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`CacophonyModel.audio_states` of equal-length int16 clips: a clip longer
        than the window is encoded in window-sized chunks, at most `batch_size` at once."""
        samples = clips[0].shape[0]
        steps = clips_lib.patch_steps(samples)
        if samples <= self._window:
            padded = clips_lib.bucket_samples(samples, self._window)
            chunks, chunk_steps = 1, clips_lib.patch_steps(padded)
            bucketed = 1
        else:
            chunk_steps = self._window_steps
            chunks = -(-steps // chunk_steps)
            # Front-end lengths in powers of two of chunks (one spare step), so clips of
            # many lengths share a few compiled shapes.
            bucketed = 1 << (chunks - 1).bit_length()
            padded = (bucketed * chunk_steps + 1) * STEP_SAMPLES
        length = chunk_steps * patches.FREQ_PATCHES
        used = chunks * length
        # The encoder runs on at most `batch_size` chunks at once, however long the clips:
        # clips go through the front end a few at a time, their chunks in batches.
        per_call = max(1, batch_size // bucketed)  # by the bucket: one shape per bucket
        offset = (np.arange(chunks, dtype=np.int32) * chunk_steps)[None, :, None]
        states, masks = [], []
        for start in range(0, len(clips), per_call):
            group = clips[start:start + per_call]
            audio = np.zeros((len(group), padded), np.int16)
            for row, clip in enumerate(group):
                audio[row, :samples] = clip
            lengths = np.full(len(group), samples, np.int32)
            patch, time_idx, freq_idx, mask = self._batched(self._patches, (audio, lengths),
                                                            per_call)
            rows = len(group) * chunks

            def split(x, rows=rows):
                return x[:, :used].reshape(rows, length, *x.shape[2:])

            # Each chunk is encoded as if it were a clip of its own, starting at time 0.
            local_time = (time_idx[:, :used].reshape(len(group), chunks, length)
                          - offset).reshape(rows, length)
            out = self._batched(self._chunk_states, (split(patch), local_time,
                                                     split(freq_idx), split(mask)), batch_size)
            states.append(out.reshape(len(group), used, -1))
            masks.append(mask[:, :used])
        n = steps * patches.FREQ_PATCHES
        time_idx = np.broadcast_to(np.arange(n, dtype=np.int32) // patches.FREQ_PATCHES,
                                   (len(clips), n)).copy()
        return (np.concatenate(states)[:, :n], time_idx,
                np.concatenate(masks)[:, :n].astype(bool))

"""Inference with an exported bundle: embed audio and text, compare them, caption audio.

Example::

    from cacophony_jax import inference

    model = inference.load("bundles/cacophony")
    audio = model.embed_audio(["dog.wav", "rain.flac"])         # [2, P], unit length
    text = model.embed_text(["a dog barks", "rain on a roof"])  # [2, P], unit length
    scores = model.similarity(audio, text)                      # [2, 2] cosine
    captions = model.caption(["dog.wav"], method="beam")        # ["a dog is barking"]
    spans = model.caption_windows(["walk.wav"])  # [[(0.0, 10.0, "birds sing"), ...]]

Audio input: a sequence of clips, each a file path (decoded, averaged to mono and
resampled to 16 kHz) or a 1-D numpy array (float in [-1, 1] or int16) at
``sample_rate`` Hz; ``sample_rate`` is required for arrays, which are resampled when
it is not 16000. A 2-D array is a batch of equal-length clips [n, samples]; a single
path or 1-D array is one clip. Float audio is clipped to [-1, 1] and quantised to
int16, exactly like the training data. A [samples, channels] array (8 channels or
fewer) is refused: average the channels first. A channel-first [channels, samples]
array (torchaudio's layout) cannot be told from a batch and is taken as one: pass
``audio.mean(axis=0)``. A clip must hold one 16-frame patch: at least 2,401 samples
(0.15 s) at 16 kHz.

Long audio: a clip longer than ``window_seconds`` (the clip length the model was
trained on) is cut into consecutive non-overlapping windows of that length; the
last window is kept (zero-padded) when it is at least 1 s long and dropped
otherwise. Every window is embedded, the unnormalised window embeddings averaged
and the mean L2-normalised. A clip no longer than one window is zero-padded and its
true length masks the padding. ``embed_audio(..., window_seconds=30)`` embeds clips of
up to 30 s in one pass instead, as the released evaluation code did for Clotho.
``caption`` describes the first window of each clip (``window_seconds`` there too);
``caption_windows`` describes every window, each with its start and end in seconds.
``audio_states`` instead computes the log-mel of the whole clip and encodes its
patches in chunks of one window's patch steps (time indices restart at 0 in each
chunk, as in training; the returned ``time_idx`` counts steps from the clip start).

"mae" bundles (stage 1) have no text side: their audio embedding is the mean of the
valid encoder states (per window; windows are then averaged as above),
L2-normalised, and ``embed_text``/``caption`` raise ``InferenceError``.

Speed: all model work runs in jit-compiled functions on one device. Clip lengths are
padded up to a few buckets (powers of two of 16-frame patches, topped by the window
itself) and batches up to a power of two (at most ``batch_size``) by repeating a row
whose result is discarded, so calls with new lengths mostly reuse compiled code;
``trace_counts`` counts the compilations. That machinery, the jitted functions and
their batching, is `cacophony_jax.inference_runtime`.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from cacophony_jax.audio import clips as clips_lib
from cacophony_jax.audio import io
from cacophony_jax.audio.clips import AudioInput
from cacophony_jax.convert import bundle
from cacophony_jax.data.tokenizer import printable
from cacophony_jax.inference_runtime import InferenceError, ModelRuntime
from cacophony_jax.models import decoding

_SURROGATES = re.compile("[\ud800-\udfff]")
# The sampling seeds `caption` takes: `jax.random.key` keeps 32 bits (without x64),
# so seeds 2**32 apart, or -1 and 2**32 - 1, would be the same key.
SEED_MIN, SEED_MAX = 0, 2**32 - 1


def _check_number(name: str, value: Any, *, whole: bool, minimum: int | None = None) -> None:
    """Raises InferenceError unless `value` is a number (a whole one if `whole`) of at
    least `minimum`."""
    kind = numbers.Integral if whole else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InferenceError(f"{name} must be a {'whole ' if whole else ''}number, got "
                             f"{value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise InferenceError(f"{name} must be at least {minimum}, got {value}")


def load(bundle_path: str | os.PathLike, *,
         device: jax.Device | str | None = None) -> CacophonyModel:
    """Loads an inference bundle (see convert/bundle.py).

    Args:
      bundle_path: the bundle folder.
      device: where to run: a jax.Device, or a platform name ("cpu", "gpu") for its
        first device (default: the first local device).

    Returns:
      The model.
    """
    meta, params, tokenizer = bundle.read_bundle(bundle_path, device=device)
    model = CacophonyModel(meta, params, tokenizer)
    model.bundle_path = os.fspath(bundle_path)  # what tools that record their model name
    return model


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CacophonyModel(ModelRuntime):
    """A loaded bundle: audio/text embeddings, similarity, captions, encoder states.

    Attributes:
      sample_rate: 16000, the rate the model runs at.
      embedding_size: width of ``embed_audio``/``embed_text`` rows.
      state_size: width of the audio encoder states (``audio_states``).
      window_seconds: the clip length long audio is cut into.
      text_length: tokens per text including bos/eos (0 for "mae").
      kind: "cacophony" (stage 2) or "mae" (stage 1).
      tokenizer: the Tokenizer, or None for "mae".
      meta: the bundle's metadata.
      trace_counts: how often each jitted function was traced (compiled).
    """

    def embed_audio(self, audio: AudioInput, sample_rate: int | None = None,
                    batch_size: int = 32, window_seconds: float | None = None) -> np.ndarray:
        """L2-normalised audio embeddings (long clips: windows averaged, see the module doc).

        Args:
          audio: clips (paths or arrays), see the module docstring.
          sample_rate: rate of array inputs in Hz (required for arrays).
          batch_size: the most windows run at once.
          window_seconds: the longest piece embedded in one pass; None: the bundle's
            ``window_seconds``. The released evaluation embedded clips of up to 30 s
            (Clotho's) in one pass: ``window_seconds=30`` does the same (the time
            positions are sinusoidal, so any length has them).

        Returns:
          float32 [n, embedding_size].
        """
        _check_number("batch_size", batch_size, whole=True, minimum=1)
        window = self._window if window_seconds is None else self._window_for(window_seconds)
        clips = clips_lib.to_clips(audio, sample_rate)
        self._warn_if_long(window, clips)
        windows, owner = [], []
        for i, clip in enumerate(clips):
            for window_clip in clips_lib.split_windows(clip, window):
                windows.append(window_clip)
                owner.append(i)
        out = np.zeros((len(clips), self.embedding_size), np.float32)
        if not clips:
            return out
        pooled = self._over_windows(windows, lambda p, a, n: self._encode_audio(p, a, n)[2],
                                    batch_size, window)
        np.add.at(out, np.asarray(owner), np.stack(pooled).astype(np.float32))
        counts = np.bincount(owner, minlength=len(clips)).astype(np.float32)
        return _normalize(out / counts[:, None])

    def embed_text(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings.

        Args:
          texts: the texts, or one text (as one path is one clip for embed_audio); each
            is cut to ``text_length`` tokens (bos/eos included).
          batch_size: the most texts run at once.

        Returns:
          float32 [n, embedding_size].
        """
        self._need_text("embed_text")
        _check_number("batch_size", batch_size, whole=True, minimum=1)
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, Iterable) and not isinstance(texts, bytes):
            texts = list(texts)
        else:
            raise InferenceError(f"embed_text takes a text or a list of texts, got "
                                 f"{type(texts).__name__}")
        if not all(isinstance(t, str) for t in texts):
            kinds = sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
            raise InferenceError(f"embed_text takes texts (str), got {', '.join(kinds)}")
        # Lone surrogates (bytes of a command line that are not UTF-8) -> U+FFFD.
        texts = [_SURROGATES.sub("\ufffd", t) for t in texts]
        ids, mask, counts = self.tokenizer.encode_with_counts(texts, self.text_length)
        if ids.shape[0] == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        cut = np.flatnonzero(counts > self.text_length - 2)
        if cut.size:
            logging.warning(
                "%d of %d texts are longer than the model's %d tokens (bos and eos "
                "included) and were cut, e.g. text %d (%d tokens): %r", cut.size, len(texts),
                self.text_length, cut[0], counts[cut[0]] + 2, printable(texts[cut[0]])[:120])
        emb = self._batched(lambda p, i, m: self._encode_text(p, i, m)[1], (ids, mask),
                            batch_size)
        return _normalize(emb)

    def similarity(self, audio_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """Cosine similarities of every audio row with every text row.

        Args:
          audio_emb: [n_a, P] embeddings (normalised or not).
          text_emb: [n_t, P].

        Returns:
          float32 [n_a, n_t].
        """
        a, t = np.asarray(audio_emb, np.float32), np.asarray(text_emb, np.float32)
        if a.ndim != 2 or t.ndim != 2 or a.shape[1] != t.shape[1]:
            raise InferenceError(f"similarity needs [n_a, P] and [n_t, P] embeddings, got "
                                 f"{a.shape} and {t.shape}")
        return _normalize(a) @ _normalize(t).T

    def check_caption_options(self, method: str, max_len: int, beam_size: int,
                              temperature: float, names: dict[str, str] | None = None,
                              length_penalty: float = 0.0) -> None:
        """Raises InferenceError for `caption` options this model cannot use.

        ``names`` says how the message names each option (e.g. {"max_len": "--max-len"}).
        """
        try:
            decoding.check_options(self.config.text.max_positions, method,
                                   self.text_length if max_len is None else max_len,
                                   temperature, beam_size, names, length_penalty)
        except ValueError as e:
            raise InferenceError(str(e)) from e

    def caption(self, audio: AudioInput, sample_rate: int | None = None, method: str = "greedy",
                max_len: int | None = None, beam_size: int = 4, temperature: float = 1.0,
                seed: int = 0, batch_size: int = 32,
                window_seconds: float | None = None, length_penalty: float = 0.0) -> list[str]:
        """Captions of the first window of each clip.

        Args:
          audio: clips (paths or arrays), see the module docstring.
          sample_rate: rate of array inputs in Hz (required for arrays).
          method: "greedy", "beam" or "sample".
          max_len: the most tokens per caption, bos and eos included (None: the text
            length the model was trained with, `text_length`); a caption cut there
            ends at its last whole word.
          beam_size: beams for "beam".
          temperature: sampling temperature for "sample".
          seed: sampling seed: the same seed gives a clip the same caption, whatever
            other clips are captioned with it (each clip's draws are keyed by the seed
            and its samples).
          batch_size: the most clips decoded at once.
          window_seconds: the window (the longest piece described); None: the bundle's
            ``window_seconds``. The released code captioned clips of up to 30 s whole:
            ``window_seconds=30`` does the same.
          length_penalty: for "beam": beams are ranked by summed log-probability divided
            by length ** length_penalty (0: not divided; 1: the mean per token, which
            favours longer captions).

        Returns:
          One caption per clip.
        """
        self._need_text("caption")
        spans = self._caption_spans(audio, sample_rate, True, method, max_len, beam_size,
                                    temperature, seed, batch_size, window_seconds,
                                    length_penalty)
        return [clip_spans[0][2] for clip_spans in spans]

    def caption_windows(self, audio: AudioInput, sample_rate: int | None = None,
                        method: str = "greedy", max_len: int | None = None, beam_size: int = 4,
                        temperature: float = 1.0, seed: int = 0, batch_size: int = 32,
                        window_seconds: float | None = None, length_penalty: float = 0.0
                        ) -> list[list[tuple[float, float, str]]]:
        """Captions of every window of each clip, with the time span each describes.

        Clips are cut into windows as for ``embed_audio`` (see the module docstring): a
        window's caption is the one ``caption`` gives that piece of audio alone. The
        windows of all clips are decoded together, at most ``batch_size`` at once.

        Args:
          audio, sample_rate, method, max_len, beam_size, temperature, seed, batch_size,
          window_seconds, length_penalty: as for ``caption`` (``batch_size`` counts
            windows; ``window_seconds`` is the length of each window).

        Returns:
          Per clip, one (start_seconds, end_seconds, caption) per window in time order,
          from the clip's start; the last window ends at the clip's end (or, when a last
          piece under 1 s was dropped, where that piece starts).
        """
        self._need_text("caption_windows")
        return self._caption_spans(audio, sample_rate, False, method, max_len, beam_size,
                                   temperature, seed, batch_size, window_seconds,
                                   length_penalty)

    def _caption_spans(self, audio: AudioInput, sample_rate: int | None, first_only: bool,
                       method: str, max_len: int | None, beam_size: int, temperature: float,
                       seed: int, batch_size: int, window_seconds: float | None,
                       length_penalty: float) -> list[list[tuple[float, float, str]]]:
        """`caption_windows`, of each clip's first window only if `first_only`."""
        for name, value in (("max_len", max_len), ("beam_size", beam_size), ("seed", seed),
                            ("temperature", temperature), ("length_penalty", length_penalty)):
            if value is not None or name != "max_len":  # None: the bundle's text length
                _check_number(name, value, whole=name not in ("temperature", "length_penalty"))
        _check_number("batch_size", batch_size, whole=True, minimum=1)
        if not SEED_MIN <= seed <= SEED_MAX:
            raise InferenceError(f"seed must be in [0, 2**32 - 1] (JAX's keys hold 32 bits), "
                                 f"got {seed}")
        max_len = self.text_length if max_len is None else max_len
        self.check_caption_options(method, max_len, beam_size, temperature,
                                   length_penalty=length_penalty)
        window = self._window if window_seconds is None else self._window_for(window_seconds)
        clips = clips_lib.to_clips(audio, sample_rate)
        self._warn_if_long(window, clips)
        windows, owner = [], []
        for i, clip in enumerate(clips):
            pieces = clips_lib.split_windows(clip, window)
            windows += pieces[:1] if first_only else pieces
            owner += [i] * (1 if first_only else len(pieces))
        describe = self._describer(seed, method, max_len, beam_size, temperature,
                                   length_penalty)
        ids = self._over_windows(windows, describe, batch_size, window)
        texts = self.tokenizer.captions(np.stack(ids)) if ids else []
        spans: list[list[tuple[float, float, str]]] = [[] for _ in clips]
        for i, piece, text in zip(owner, windows, texts, strict=True):
            start = len(spans[i]) * window  # windows are consecutive from the clip's start
            spans[i].append((start / self.sample_rate,
                             (start + piece.shape[0]) / self.sample_rate, text))
        return spans

    def audio_states(self, audio_batch: np.ndarray, sample_rate: int,
                     batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-patch encoder states of equal-length clips (no pooling).

        Args:
          audio_batch: float32 (or int16) [n, samples] mono clips of equal length.
          sample_rate: their rate in Hz.
          batch_size: the most clips, or window-sized chunks of long clips, encoded at once.

        Returns:
          states float32 [n, N, state_size], time_idx int32 [n, N] (patch step from the
          clip start, 16 frames = 160 ms each), mask bool [n, N]; N = 8 x the clip's
          whole 16-frame steps (a trailing partial step is dropped).
        """
        _check_number("batch_size", batch_size, whole=True, minimum=1)
        if isinstance(audio_batch, (list, tuple)) and len({np.shape(a) for a in audio_batch}) > 1:
            raise InferenceError(f"audio_states takes clips of one length, got lengths "
                                 f"{sorted({np.shape(a)[0] for a in audio_batch})[:5]}; call it "
                                 "once per length (or pad the clips)")
        clips = clips_lib.to_clips(np.asarray(audio_batch), sample_rate)
        if not clips:
            raise io.AudioError("audio_states got an empty batch; pass [n, samples] with n >= 1")
        return self._chunked_states(clips, batch_size)

    def encode_patches(self, patch: np.ndarray, time_idx: np.ndarray, freq_idx: np.ndarray,
                       mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The audio tower on ready-made patches (bypasses the front end).

        Args:
          patch: float [B, N, 256]; time_idx, freq_idx: int [B, N]; mask: [B, N].

        Returns:
          (states float32 [B, N, state_size], unnormalised embedding float32 [B, P]).
        """
        states, emb = self._encode_patches(self.params, patch, time_idx, freq_idx, mask)
        return np.asarray(states), np.asarray(emb, np.float32)

    def encode_token_ids(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray,
                                                                           np.ndarray]:
        """The text tower on ready-made token ids (bypasses the tokenizer).

        Args:
          ids: int [B, T]; mask: [B, T], nonzero on real tokens.

        Returns:
          (states float32 [B, T, H], unnormalised embedding float32 [B, P]).
        """
        self._need_text("encode_token_ids")
        states, emb = self._encode_text(self.params, ids, mask)
        return np.asarray(states), np.asarray(emb, np.float32)

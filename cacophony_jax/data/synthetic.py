"""The embedded default corpus: procedural sound scenes with attribute captions.

Each clip holds one to three events (EVENT_CLASSES) over coloured background noise.
Every event has a pitch (low/high), a speed (slow/fast), a loudness (quiet/loud),
a duration (short/long) and a place in time (its order, or for a lone event the
start, middle or end of the clip); the captions spell all of these out, so telling
two clips apart in retrieval needs the attributes, not only the class.

A clip is a pure function of (seed, split, index): any worker process regenerates
it, nothing is stored, and `write_corpus` can put a copy on disk as audio files and
a JSONL manifest. Three separate random streams draw the scene, its sound and its
wording, so rewording the captions never changes the audio. The sounds are made by
`cacophony_jax.data.synthetic_events`, the captions by
`cacophony_jax.data.synthetic_wording`.

Train and eval are disjoint in their full descriptions: a description (classes and
attributes in order, plus the position of a lone event) is hashed into one of five
buckets, eval clips take bucket 0 only and train clips the rest. Evaluation then
scores unseen combinations of seen classes and attributes at any corpus size. Two
eval clips may still share a description (a lone event has 14 x 16 x 3 of them);
retrieval metrics count such a tie as a miss for one of the two.
"""

from __future__ import annotations

import json
import operator
import os
import pathlib
import zlib
from typing import Any

import numpy as np
import soundfile

from cacophony_jax.data.synthetic_events import (
    EVENT_CLASSES,
    NOISE_COLOURS,
    PITCHES,
    SPEEDS,
    background_noise,
    synthesize_event,
)
from cacophony_jax.data.synthetic_wording import captions, pick, synthetic_captions

__all__ = ["EVENT_CLASSES", "SPLITS", "SyntheticCorpus", "description_key", "write_corpus"]

SPLITS: tuple[str, ...] = ("train", "eval")
_EVAL_BUCKETS = 5  # eval owns one description bucket in this many
_EVENT_COUNT_PROBS = (0.25, 0.45, 0.30)  # chance of 1, 2, 3 events in a clip
# Event length as a share of the clip: three long events still fit one after another.
_DURATION_SHARE = {"short": (0.10, 0.15), "long": (0.25, 0.30)}
# Loudest 20 ms frame of an event, dBFS: 18 dB between quiet and loud.
_LOUDNESS_DB = {"quiet": (-38.0, -34.0), "loud": (-20.0, -16.0)}
_BACKGROUND_DB = {"faint": (-66.0, -58.0), "noticeable": (-54.0, -48.0)}
# Where the centre of a lone event lies, as a share of the clip.
_POSITION_CENTRE = {"start": (0.0, 0.3), "middle": (0.4, 0.6), "end": (0.7, 1.0)}
_EVENT_PEAK = 0.9  # impulsive events are turned down to this peak instead of clipping
_MIN_CLIP_SECONDS = 1.0
_AUDIO_FORMATS = ("wav", "flac")


def description_key(events: list[dict[str, Any]]) -> tuple:
    """The full attribute description of a clip, as a hashable tuple.

    Args:
      events: the clip's `events` (in order).

    Returns:
      ((class, pitch, speed, loudness, duration) per event ..., position of a lone
      event or nothing).
    """
    key = tuple((e["class"], e["pitch"], e["speed"], e["loudness"], e["duration"])
                for e in events)
    return key + ((events[0]["position"],) if len(events) == 1 else ())


def _belongs_to(split: str, key: tuple) -> bool:
    # crc32 of the repr is stable across processes, unlike the salted built-in hash.
    is_eval = zlib.crc32(repr(key).encode()) % _EVAL_BUCKETS == 0
    return is_eval == (split == "eval")


def _draw_attributes(rng: np.random.Generator, split: str) -> list[dict[str, Any]]:
    """Draws classes and discrete attributes until the description fits the split."""
    while True:
        count = int(rng.choice(len(_EVENT_COUNT_PROBS), p=_EVENT_COUNT_PROBS)) + 1
        classes = rng.choice(len(EVENT_CLASSES), size=count, replace=False)
        events = [{
            "class": EVENT_CLASSES[c], "class_index": int(c),
            "pitch": pick(rng, PITCHES), "speed": pick(rng, SPEEDS),
            "loudness": pick(rng, tuple(_LOUDNESS_DB)),
            "duration": pick(rng, tuple(_DURATION_SHARE)),
            "position": pick(rng, tuple(_POSITION_CENTRE)),
        } for c in classes]
        if _belongs_to(split, description_key(events)):
            return events


def _place(rng: np.random.Generator, events: list[dict[str, Any]], clip_seconds: float) -> None:
    """Sets onset_s, length_s, level_db (and position, for several events) in place."""
    lengths = np.array([rng.uniform(*_DURATION_SHARE[e["duration"]]) for e in events])
    if len(events) == 1:
        low, high = _POSITION_CENTRE[events[0]["position"]]
        half = lengths[0] / 2
        onsets = [rng.uniform(max(low, half), min(high, 1.0 - half)) - half]
    else:
        # Events follow each other; the spare time is split at random into gaps.
        gaps = rng.dirichlet(np.ones(len(events) + 1)) * (1.0 - lengths.sum())
        onsets = gaps[0] + np.concatenate([[0.0], np.cumsum(lengths[:-1] + gaps[1:-1])])
    for event, onset, length in zip(events, onsets, lengths, strict=True):
        event["onset_s"] = round(float(onset) * clip_seconds, 4)
        event["length_s"] = round(float(length) * clip_seconds, 4)
        event["level_db"] = round(float(rng.uniform(*_LOUDNESS_DB[event["loudness"]])), 2)
        if len(events) > 1:
            centre = onset + length / 2
            event["position"] = "start" if centre < 1 / 3 else "end" if centre > 2 / 3 else "middle"


class SyntheticCorpus:
    """Random-access source of synthetic sound scenes (the Grain source protocol).

    Attributes:
      name: "synthetic_<split>".
      class_names: EVENT_CLASSES; `labels` index into it.
    """

    def __init__(self, split: str, size: int, clip_seconds: float, seed: int = 0,
                 sample_rate: int = 16_000):
        """Describes the corpus; clips are made on demand (and kept, see CACHE_BYTES).

        Args:
          split: "train" or "eval" (disjoint random streams and descriptions).
          size: number of clips.
          clip_seconds: clip length in seconds (at least 1; 4 to 10 suits training).
          seed: corpus seed (a non-negative integer).
          sample_rate: samples per second of the audio (16 kHz or more).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown synthetic corpus split {split!r}; use one of {SPLITS}")
        if not isinstance(size, int | np.integer) or size < 0:
            raise ValueError(f"synthetic corpus size must be a non-negative int, got {size!r}")
        if not np.isfinite(clip_seconds) or clip_seconds < _MIN_CLIP_SECONDS:
            raise ValueError(f"the synthetic corpus's clip_seconds (config.audio.clip_seconds, "
                             f"eval_clip_seconds) must be at least {_MIN_CLIP_SECONDS}, "
                             f"got {clip_seconds!r}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"synthetic corpus seed must be a non-negative int, got {seed!r}")
        if sample_rate < 16_000:
            raise ValueError(f"sample_rate must be at least 16000 (events reach 7.6 kHz), "
                             f"got {sample_rate}")
        self.split = split
        self.size = int(size)
        self.clip_seconds = float(clip_seconds)
        self.seed = int(seed)
        self.sample_rate = int(sample_rate)
        self.name = f"synthetic_{split}"
        self.class_names: tuple[str, ...] = EVENT_CLASSES
        self._cache: dict[int, dict[str, Any]] = {}
        self._cached_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get the description, not this process's rendered clips.
        return {**self.__dict__, "_cache": {}, "_cached_bytes": 0}

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"SyntheticCorpus(split={self.split!r}, size={self.size}, "
                f"clip_seconds={self.clip_seconds}, seed={self.seed}, "
                f"sample_rate={self.sample_rate})")

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index, stream])

    def _check_index(self, index: int) -> int:
        index = operator.index(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"clip {index} is outside {self.name} of size {self.size}")
        return index

    def metadata(self, index: int) -> dict[str, Any]:
        """Clip `index` without its audio (cheap: nothing is synthesised).

        Args:
          index: clip number in [-len, len).

        Returns:
          The record of `__getitem__` without "audio"; its events lack the numbers
          drawn during synthesis (frequency_hz, rate_hz).
        """
        index = self._check_index(index)
        scene = self._rng(index, 0)
        events = _draw_attributes(scene, self.split)
        _place(scene, events, self.clip_seconds)
        level = pick(scene, tuple(_BACKGROUND_DB))
        background = {"colour": pick(scene, tuple(NOISE_COLOURS)), "level": level,
                      "level_db": round(float(scene.uniform(*_BACKGROUND_DB[level])), 2)}
        wording = self._rng(index, 2)
        return {
            "id": f"synthetic_{self.split}_s{self.seed}_{index:06d}",
            "captions": captions(wording, events, background),
            "synthetic_captions": synthetic_captions(wording, events),
            "labels": [e["class_index"] for e in events],
            "events": events,
            "background": background,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Synthesises clip `index` (once: later calls return the kept clip).

        Args:
          index: clip number in [-len, len).

        Returns:
          {"id": str, "audio": int16 [clip_seconds * sample_rate], "captions": 3 str,
          "synthetic_captions": 2 str, "labels": class indices in time order,
          "events": attribute dicts, "background": {"colour", "level", "level_db"}}.
        """
        index = self._check_index(index)
        record = self._cache.get(index)
        if record is None:
            record = self._render(index)
            if self._cached_bytes + record["audio"].nbytes <= CACHE_BYTES:
                self._cache[index] = record
                self._cached_bytes += record["audio"].nbytes
        return {**record, "events": [dict(e) for e in record["events"]],
                "captions": list(record["captions"]),
                "synthetic_captions": list(record["synthetic_captions"]),
                "labels": list(record["labels"]), "background": dict(record["background"])}

    def _render(self, index: int) -> dict[str, Any]:
        record = self.metadata(index)
        sound = self._rng(index, 1)
        n = int(round(self.clip_seconds * self.sample_rate))
        bg = record["background"]
        mix = background_noise(sound, n, bg["colour"], bg["level_db"], self.sample_rate)
        for event in record["events"]:
            start = int(round(event["onset_s"] * self.sample_rate))
            length = max(1, min(n - start, int(round(event["length_s"] * self.sample_rate))))
            samples, params = synthesize_event(event["class"], sound, length, event["pitch"],
                                               event["speed"], self.sample_rate)
            samples *= np.float32(10.0 ** (event["level_db"] / 20.0))
            peak = float(np.max(np.abs(samples)))
            if peak > _EVENT_PEAK:
                samples *= np.float32(_EVENT_PEAK / peak)
            mix[start:start + length] += samples
            event.update({k: round(v, 2) for k, v in params.items()})
        audio = np.clip(np.rint(mix * 32767.0), -32768, 32767).astype(np.int16)
        audio.setflags(write=False)  # shared by every draw of the clip
        record["audio"] = audio
        return record


# Rendered clips each corpus object keeps (per process), so that training draws a clip
# many times but synthesises it once: the quickstart's 4,000 2 s clips take 256 MB.
CACHE_BYTES = 512 << 20


def _replace_atomically(path: pathlib.Path, write: Any) -> None:
    """Calls write(temporary_path), then renames it to `path` (never half a file)."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_corpus(out_dir: str | os.PathLike, split: str, size: int, clip_seconds: float,
                 seed: int = 0, audio_format: str = "wav") -> pathlib.Path:
    """Writes a synthetic corpus to disk as 16 kHz 16-bit audio and a JSONL manifest.

    Layout: out_dir/audio/<id>.<format>, out_dir/classes.txt (one class name per
    line, in index order) and out_dir/manifest.jsonl with one object per clip:
    {"id", "audio" (path relative to out_dir), "captions", "synthetic_captions",
    "label" (class names)}. The manifest is written last and renamed into place, so
    an interrupted run never leaves a partial manifest.

    Args:
      out_dir: folder to write into (created if missing).
      split: "train" or "eval".
      size: number of clips.
      clip_seconds: clip length in seconds.
      seed: corpus seed.
      audio_format: "wav" or "flac".

    Returns:
      The path of manifest.jsonl.
    """
    if audio_format not in _AUDIO_FORMATS:
        raise ValueError(f"unknown audio_format {audio_format!r}; use one of {_AUDIO_FORMATS}")
    corpus = SyntheticCorpus(split, size, clip_seconds, seed=seed)
    out_dir = pathlib.Path(out_dir)
    try:
        (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the corpus folder {str(out_dir)!r} ({e.strerror}); "
                         "pass a writable directory as out_dir") from e
    lines = []
    for index in range(len(corpus)):
        record = corpus[index]
        relative = f"audio/{record['id']}.{audio_format}"
        _replace_atomically(out_dir / relative, lambda p, r=record: soundfile.write(
            p, r["audio"], corpus.sample_rate, subtype="PCM_16", format=audio_format.upper()))
        lines.append(json.dumps({
            "id": record["id"], "audio": relative, "captions": record["captions"],
            "synthetic_captions": record["synthetic_captions"],
            "label": [EVENT_CLASSES[i] for i in record["labels"]],
        }))
    _replace_atomically(out_dir / "classes.txt", lambda p: p.write_text(
        "\n".join(EVENT_CLASSES) + "\n", encoding="utf-8"))
    manifest = out_dir / "manifest.jsonl"
    _replace_atomically(manifest, lambda p: p.write_text(
        "".join(line + "\n" for line in lines), encoding="utf-8"))
    return manifest

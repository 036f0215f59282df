"""Training records as the pipeline draws them: decoded, cropped, or replaced.

`DecodedSource.draw` turns a record index into a usable record with int16 audio (a
random crop, decoding only that window of a long file); a record that cannot be used
is replaced by another from elsewhere in the source and counted. `check_captions`
refuses a source stage 2 cannot train on before anything compiles.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from cacophony_jax.audio import io
from cacophony_jax.audio.clips import MIN_SAMPLES
from cacophony_jax.data.sources import SourceError, metadata_rows

# A record that fails to decode is replaced by another; give up (and stop with a clear
# error) when this many tries for one draw fail: the data is broken. The tries hop
# through the source by a stride near n / golden ratio, so a run of bad rows (a folder
# not downloaded) neither stops training nor makes one clip stand in for all of them.
MAX_CONSECUTIVE_FAILURES = 64


class DecodedSource:
    """A random-access source whose records carry decoded int16 audio.

    Records with an `audio_path` are decoded here (in Grain worker processes). A
    record that cannot be decoded, is shorter than one patch, or (when
    `needs_captions`) has no caption is replaced by another usable record (see
    `MAX_CONSECUTIVE_FAILURES`), and `num_failed` is 1 on the replacement (one skipped
    draw), so training goes on and the loss of data is counted. The first
    `WARN_FIRST` failures of a process are logged one by one, then every
    `WARN_EVERY`-th with the running count.

    A record that fails whatever crop is drawn (it cannot be opened or decoded whole,
    is too short, lacks a caption, is a corrupt array_record entry) is remembered by
    this process (each Grain worker has its own memory) and skipped on its later
    draws without being read again, and without another warning (also when two reader
    threads fail it at the same time). Such a draw is still counted in `num_failed`,
    so the count is that of draws replaced, the same as if the record were tried again
    each time. A failure of one window of a long file (another
    crop may decode) and an `OSError` (perhaps a passing fault) are tried again on
    the next draw.
    """

    WARN_FIRST, WARN_EVERY = 20, 1000

    def __init__(self, source: Any, needs_captions: bool = False):
        self._source = source
        self._needs_captions = needs_captions
        self.name = getattr(source, "name", type(source).__name__)
        self._failures = 0
        # Record index -> why it is unusable, for records that fail whatever the crop.
        self._unusable: dict[int, str] = {}
        # Grain's reader threads draw at once: two may fail the same record together.
        self._lock = threading.Lock()
        n = max(1, len(source))
        stride = max(1, round(n * 0.6180339887)) | 1
        while math.gcd(stride, n) != 1:
            stride += 2
        self._stride = stride % n or 1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]  # a Grain worker process gets a lock of its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._source)

    def load(self, index: int, length: int | None = None,
             choose_start: Callable[[int], int] | None = None,
             min_samples: int = 1) -> dict[str, Any]:
        """Record `index` with int16 `audio`; raises io.AudioError.

        Args:
          index: the record.
          length: if set, only `length` samples from `choose_start(total)` are kept
            (and, for a long file, only those decoded: see `io.load_audio_clip`).
          choose_start: picks the start from the audio's length; None: 0.
          min_samples: shorter audio is refused (before `choose_start` is called).
        """
        record = dict(self._source[index])
        name = record.get("id", index)
        if self._needs_captions and not (record.get("captions")
                                         or record.get("synthetic_captions")):
            raise io.AudioError(f"record {name!r} has no caption")

        def start_of(total: int) -> int:
            if total < min_samples:
                raise io.AudioError(
                    f"record {name!r} has empty audio" if not total else
                    f"record {name!r} holds {total} samples, less than one 16-frame "
                    f"patch ({MIN_SAMPLES})")
            return 0 if choose_start is None else choose_start(total)

        if "audio" in record:
            audio = np.asarray(record["audio"])
            start = start_of(audio.size)
            record["audio"] = audio if length is None else audio[start:start + length]
        elif length is None:
            record["audio"] = io.load_audio(record.pop("audio_path"))
            start_of(record["audio"].size)
        else:
            record["audio"], _ = io.load_audio_clip(record.pop("audio_path"), length,
                                                    start_of)
        return record

    def draw(self, index: int, length: int | None = None,
             rng: np.random.Generator | None = None) -> dict[str, Any]:
        """A usable record for draw `index`: record `index`, or its replacement.

        With `length`, `audio` is a random `length`-sample crop (from `rng`) of the
        record's audio, or all of it when shorter; without, the whole audio."""
        n = len(self._source)
        error: Exception | str | None = None
        cropped = False

        def random_start(total: int) -> int:
            nonlocal cropped
            cropped = True
            excess = total - length
            return int(rng.integers(excess + 1)) if excess > 0 else 0

        for failed in range(MAX_CONSECUTIVE_FAILURES):
            current = (index + failed * self._stride) % n
            known = self._unusable.get(current)
            if known is not None:  # failed before, whatever the crop: not read again
                error = known
                continue
            cropped = False
            try:
                record = self.load(current, length, random_start if length else None,
                                   min_samples=MIN_SAMPLES)
            except (io.AudioError, OSError, SourceError) as e:
                error = e
                # Failed before a crop was drawn (no random numbers used): the same on
                # every draw, so skipping it unread changes neither records nor crops.
                remember = not cropped and isinstance(e, (io.AudioError, SourceError))
                with self._lock:
                    if remember and current in self._unusable:
                        continue  # another thread failed it meanwhile, and warned
                    if remember:
                        self._unusable[current] = str(e)
                    self._warn(current, e, remember)
                continue
            record["num_failed"] = int(failed > 0)
            return record
        raise io.AudioError(
            f"{MAX_CONSECUTIVE_FAILURES} records of {self.name} tried for one draw all failed "
            f"(spread over the source, so most of it is unusable), the last with: {error}. "
            "Check the data paths")

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.draw(index)

    def _warn(self, index: int, error: Exception, remembered: bool) -> None:
        self._failures += 1
        if self._failures <= self.WARN_FIRST or self._failures % self.WARN_EVERY == 0:
            logging.warning("skipping record %d of %s%s (failure %d of this process%s): "
                            "%s", index, self.name,
                            " from now on, without reading it again" if remembered else "",
                            self._failures,
                            f", now warning every {self.WARN_EVERY}th"
                            if self._failures == self.WARN_FIRST else "", error)


def crop_or_pad(audio: np.ndarray, length: int, start: int) -> tuple[np.ndarray, int]:
    """Returns (audio[start:start+length] zero-padded to `length`, true length)."""
    piece = audio[start:start + length]
    out = np.zeros(length, np.int16)
    out[:piece.size] = piece
    return out, piece.size


def choose_caption(record: dict[str, Any], synthetic_prob: float,
                   rng: np.random.Generator) -> str:
    """Picks a real caption, or a synthetic one with probability `synthetic_prob`."""
    real = list(record.get("captions") or ())
    synthetic = list(record.get("synthetic_captions") or ())
    pool = real
    if synthetic and (not real or rng.random() < synthetic_prob):
        pool = synthetic
    if not pool:
        return ""
    return pool[int(rng.integers(len(pool)))]


# Records looked at (spread over the source) to tell how many have captions.
CAPTION_SAMPLE = 2000


def check_captions(source: Any) -> None:
    """Refuses a source with no captions; warns when some records have none.

    Stage 2 skips (and counts) a record without captions on every draw, so a set of
    labelled clips without captions would fail only after compiling, as if its files
    were missing. A spread of `CAPTION_SAMPLE` records is looked at; when none has a
    caption, all are.
    """
    n = len(source)
    metadata = getattr(source, "metadata", None)

    def captioned(record: dict[str, Any]) -> bool:
        return bool(record.get("captions") or record.get("synthetic_captions"))

    step = max(1, n // CAPTION_SAMPLE)
    sample = [captioned(metadata(i) if metadata is not None else source[i])
              for i in range(0, n, step)]
    name = getattr(source, "name", type(source).__name__)
    if not any(sample) and not any(captioned(r) for r in metadata_rows(source)):
        raise ValueError(
            f"training source {name!r} has no captions (its {n} records carry labels or "
            "nothing), and stage 2 trains on captions: add them (`curate clean` for web "
            "metadata, `curate caption` for synthetic ones) or train on a captioned set")
    missing = 1.0 - sum(sample) / len(sample)
    if missing > 0:
        logging.warning("about %.0f%% of the records of %s have no caption; stage 2 skips "
                        "them on every draw (counted in data/failed_records)",
                        100 * missing, name)

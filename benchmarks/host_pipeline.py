"""The host rows of `input_pipeline.py`: the benchmark corpus and Grain's train pipeline over it.

`make_corpus` writes (or reuses) the WAV/FLAC corpus and its array_record copy,
`VirtualSize` makes a few clips look like a large source, `time_host` times
`pipeline.train_dataset` over one, and `profile_host` splits the per-clip host work
into its pieces.
"""

from __future__ import annotations

import argparse
import cProfile
import pathlib
import pstats
import time
from typing import Any

from benchmarks.cpu_time import cpu_seconds, rate_row


class VirtualSize:
    """A source seen as `size` records: record i is record i % len(source).

    Why: Grain's global shuffle (`index_shuffle`) costs about 16 ms / N per record for
    an N-record dataset (250 us at N = 64, 2-3 us from N = 100k), so a small benchmark
    corpus would measure the shuffle of a toy dataset instead of a real corpus. The
    files on disk stay few, which keeps the corpus quick to write.
    """

    def __init__(self, source: Any, size: int):
        self._source = source
        self._size = max(size, len(source))
        self.name = getattr(source, "name", type(source).__name__)
        self.class_names = getattr(source, "class_names", ())

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(index) % len(self._source)]


def make_corpus(data_dir: pathlib.Path, num_clips: int, clip_seconds: float,
                benches: list[str], audio_format: str = "wav") -> dict[str, Any]:
    """Writes (or reuses) the WAV corpus and its array_record copy.

    Args:
      data_dir: folder for `wav/` and `array_record/` (`wav_<N>s/` and
        `array_record_<N>s/` for files of N seconds other than 10).
      num_clips: clips to write.
      clip_seconds: length of each file.
      benches: which sources are needed.
      audio_format: "wav" or "flac" files (FLAC in `flac.../`, decoded per draw).

    Returns:
      {"wav": ManifestSource, "array_record": ArrayRecordSource} as requested.
    """
    from cacophony_jax.data import manifest as manifest_lib
    from cacophony_jax.data import synthetic

    suffix = "" if clip_seconds == 10.0 else f"_{clip_seconds:g}s"
    manifest = data_dir / f"{audio_format}{suffix}" / "manifest.jsonl"
    if not manifest.exists():
        synthetic.write_corpus(manifest.parent, "train", num_clips, clip_seconds,
                               audio_format=audio_format)
    wav = manifest_lib.ManifestSource(manifest)
    out = {"wav": wav}
    if "array_record" in benches:
        from cacophony_jax.data import array_record, array_record_write

        folder = data_dir / f"array_record{suffix}"
        if not (folder / "dataset_info.json").exists():
            records = (wav[i] for i in range(len(wav)))
            array_record_write.write_array_record(records, folder, "train", num_shards=4,
                                                  class_names=wav.class_names)
        out["array_record"] = array_record.ArrayRecordSource(folder, "train")
    return out


def tokenizer_for(source: Any) -> Any:
    """A small BPE tokenizer trained on the source's captions."""
    from cacophony_jax.data import tokenizer

    texts = [c for i in range(len(source)) for c in source[i]["captions"]]
    return tokenizer.Tokenizer.train_bpe(texts, vocab_size=1000)


def time_host(source: Any, fmt: Any, args: argparse.Namespace, cores: int,
              bench: str) -> dict:
    """Throughput of `pipeline.train_dataset` over `source` (one table row).

    Args:
      source: a random-access source.
      fmt: the pipeline.ExampleFormat.
      args: batch, seconds, read_threads, workers.
      cores: cores in the affinity set.
      bench: the row's name.

    Returns:
      The row dict.
    """
    from cacophony_jax.data import pipeline

    dataset = pipeline.train_dataset(source, fmt, global_batch_size=args.batch, seed=0,
                                     num_workers=args.workers, read_threads=args.read_threads)
    it = iter(dataset)
    try:
        for _ in range(2):  # start threads/workers and fill the page cache
            next(it)
        clips, start, cpu0 = 0, time.perf_counter(), cpu_seconds()
        while (wall := time.perf_counter() - start) < args.seconds or clips == 0:
            clips += next(it)["audio"].shape[0]
        cpu = cpu_seconds() - cpu0
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    used = min(cores, args.read_threads * max(1, args.workers))
    config = (f"text {fmt.text_length}, batch {args.batch}, threads {args.read_threads}, "
              f"workers {args.workers}")
    return rate_row(bench, config, clips, wall, cpu, used)


def profile_host(source: Any, fmt: Any, batch: int, clips: int = 256) -> None:
    """Times each piece of the per-clip host work in this thread, then cProfiles it.

    The pieces are the pipeline's own: DecodedSource.draw (read, decode, crop),
    PrepareTrain.example (pad, caption choice, tokenise) and the batch stack. A plain loop, not
    Grain's threads: allocator and cache effects (fresh pages for each 320 KB clip)
    can make the sum differ from the pipeline's cost per clip either way.

    Args:
      source: the source (not VirtualSize: the first `clips` indices, repeated).
      fmt: the pipeline.ExampleFormat.
      batch: rows per stacked batch.
      clips: clips per timed pass.
    """
    import numpy as np

    from cacophony_jax.data import pipeline

    decoded = pipeline.DecodedSource(source, needs_captions=fmt.text_length > 0)
    prepare = pipeline.PrepareTrain(fmt, decoded)
    rng = np.random.default_rng(0)
    parts = {"decode": 0.0, "prepare": 0.0, "stack": 0.0}

    def work() -> None:
        rows = []
        for i in range(clips):
            t0 = time.perf_counter()
            record = decoded.draw(i % len(decoded), fmt.clip_samples, rng)
            t1 = time.perf_counter()
            rows.append(prepare.example(record, rng))
            t2 = time.perf_counter()
            parts["decode"] += t1 - t0
            parts["prepare"] += t2 - t1
            if len(rows) == batch:
                t3 = time.perf_counter()
                {k: np.stack([r[k] for r in rows]) for k in rows[0]}
                parts["stack"] += time.perf_counter() - t3
                rows = []

    work()  # warm the page cache
    for key in parts:
        parts[key] = 0.0
    work()
    total = sum(parts.values())
    print(f"  per-clip host work, text {fmt.text_length} ({clips} clips, one thread): "
          + ", ".join(f"{k} {1e6 * v / clips:.0f} us" for k, v in parts.items())
          + f"; total {1e6 * total / clips:.0f} us = {clips / total:.0f} clips/s")
    profiler = cProfile.Profile()
    profiler.runcall(work)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)

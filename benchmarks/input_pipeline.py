"""Input-pipeline throughput in clips/s per host core.

Three measurements, each a table row:

- ``wav``: 16 kHz 16-bit WAV files (FLAC with ``--audio-format flac``; written with
  `data.synthetic.write_corpus`, ``--file-seconds`` long, cropped per draw) read
  through a `ManifestSource` and the real Grain train pipeline
  (`data.pipeline.train_dataset`: decode, shuffle, crop/pad, tokenise, batch).
- ``array_record``: the same clips written with `data.array_record_write.write_array_record`
  and read back through `ArrayRecordSource` and the same pipeline.
- ``frontend``: the jitted device front end (`audio.frontend.log_mel` then
  `audio.patches.patchify`) on 10 s int16 clips.

Usage (pin to one core so clips/s is clips/s per core):

    python benchmarks/input_pipeline.py --cores 1
    python benchmarks/input_pipeline.py --bench wav --cores 1 --text-length 0,64 --profile
    python benchmarks/input_pipeline.py --bench frontend --cores 1 --sub-batches 1,8,32

Per-core figures: "clips/s/core" divides the wall-clock rate by the cores the run
may use (the CPU affinity set, narrowed by --cores, and no more than the reader
threads x worker processes configured, or the XLA intra-op threads for the front
end). "clips/CPU-s" divides by the CPU time the process and its workers actually
consumed, so it stays meaningful on a machine shared with other jobs. Files are read
from the page cache after a warm-up batch: these are CPU costs, not disk speeds.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Callable

# Run from a checkout: make the package importable without installing it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import report  # noqa: E402
from benchmarks.cpu_time import cpu_seconds, pin_cores, rate_row  # noqa: E402
from benchmarks.host_pipeline import (  # noqa: E402
    VirtualSize,
    make_corpus,
    profile_host,
    time_host,
    tokenizer_for,
)

BENCHES = ("wav", "array_record", "frontend")
# Targets from the issue, clips/s per core.
TARGETS = {"wav": 1500.0, "frontend": 700.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", default=",".join(BENCHES), help="comma list of " + str(BENCHES))
    p.add_argument("--cores", type=int, default=0, help="pin to this many cores (0: as is)")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="clip length")
    p.add_argument("--file-seconds", type=float, default=0.0,
                   help="length of the corpus files, cropped to --clip-seconds by the "
                        "pipeline (0: the clip length)")
    p.add_argument("--audio-format", default="wav", choices=("wav", "flac"),
                   help="the corpus files' format (the 'wav' rows read these files)")
    p.add_argument("--num-clips", type=int, default=64, help="clips in the corpus")
    p.add_argument("--batch", type=int, default=32, help="clips per batch")
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per host row")
    p.add_argument("--text-length", default="64",
                   help="comma list of caption lengths (0 = stage-1 format, no text)")
    p.add_argument("--read-threads", type=int, default=1, help="Grain reader threads")
    p.add_argument("--workers", type=int, default=0, help="Grain worker processes")
    p.add_argument("--virtual-size", type=int, default=1_000_000,
                   help="records the pipeline sees (the corpus repeated); see VirtualSize")
    p.add_argument("--data-dir", default="", help="reuse/keep the corpus here (default: temp)")
    p.add_argument("--profile", action="store_true",
                   help="also time the per-clip host work step by step, with cProfile")
    p.add_argument("--method", default="auto", help="front end: comma list of log_mel methods")
    p.add_argument("--sub-batches", default="1,32", help="front end: comma list of sub_batches")
    p.add_argument("--iters", type=int, default=10, help="front end: timed calls per row")
    p.add_argument("--json", default="", help="append the rows to this JSON-lines file")
    return p.parse_args(argv)


# ---- host pipeline -----------------------------------------------------------------


def run_host(benches: list[str], args: argparse.Namespace, cores: int) -> list[dict]:
    """The `wav` and `array_record` rows for every requested caption length."""
    from cacophony_jax.audio import frontend
    from cacophony_jax.data import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = pathlib.Path(args.data_dir or tmp)
        made = make_corpus(data_dir, args.num_clips, args.file_seconds or args.clip_seconds,
                           benches, args.audio_format)
        clip = round(args.clip_seconds * frontend.SAMPLE_RATE)
        tok = None
        rows = []
        for length in _ints(args.text_length):
            if length and tok is None:
                tok = tokenizer_for(made["wav"])
            fmt = pipeline.ExampleFormat(clip_samples=clip, text_length=length,
                                         tokenizer=tok if length else None)
            for bench in benches:
                source = VirtualSize(made[bench], args.virtual_size)
                rows.append(time_host(source, fmt, args, cores, bench))
                report.emit(rows[-1], format_row(rows[-1]), args.json)
                if args.profile:
                    profile_host(made[bench], fmt, args.batch)
    return rows


# ---- device front end --------------------------------------------------------------


def _xla_threads(cores: int) -> int:
    match = re.search(r"intra_op_parallelism_threads=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return min(cores, int(match.group(1))) if match else cores


def frontend_fn(method: str, sub_batches: int) -> Callable:
    """jit of log_mel -> patchify, the audio part of every train step."""
    import jax

    from cacophony_jax.audio import frontend, patches

    def features(audio, audio_len):
        logmel, valid = frontend.log_mel(audio, audio_len, method=method,
                                         sub_batches=sub_batches)
        return patches.patchify(logmel, valid)

    return jax.jit(features)


def run_frontend(args: argparse.Namespace, cores: int) -> list[dict]:
    """One row per (method, sub_batches): clips/s of the jitted front end."""
    import jax
    import numpy as np

    from cacophony_jax.audio import frontend

    samples = round(args.clip_seconds * frontend.SAMPLE_RATE)
    rng = np.random.default_rng(0)
    audio = np.rint(rng.normal(0.0, 0.1, (args.batch, samples)).clip(-1, 1) * 32767)
    audio = jax.device_put(audio.astype(np.int16))
    audio_len = jax.device_put(np.full((args.batch,), samples, np.int32))
    device = jax.devices()[0]
    # Per core on CPU; per device elsewhere (one accelerator runs the whole batch).
    used = _xla_threads(cores) if device.platform == "cpu" else 1
    rows = []
    for method in args.method.split(","):
        for sub in _ints(args.sub_batches):
            if args.batch % sub:
                continue
            fn = frontend_fn(method, sub)
            jax.block_until_ready(fn(audio, audio_len))
            start, cpu0 = time.perf_counter(), cpu_seconds()
            for _ in range(args.iters):
                out = fn(audio, audio_len)
            jax.block_until_ready(out)
            wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
            config = (f"{device.device_kind}, {method}, batch {args.batch}, sub_batches {sub}, "
                      f"{args.clip_seconds:g} s")
            rows.append(rate_row("frontend", config, args.batch * args.iters, wall, cpu, used))
            if device.platform != "cpu":
                rows[-1]["clips_per_cpu_s"] = float("nan")  # host CPU time says nothing here
            report.emit(rows[-1], format_row(rows[-1]), args.json)
    return rows


# ---- entry -------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def format_row(row: dict) -> str:
    """One fixed-width table line."""
    target = TARGETS.get("wav" if row["bench"] == "array_record" else row["bench"])
    verdict = ""
    if target is not None:
        met = "met" if row["clips_per_s_per_core"] >= target else "missed"
        verdict = f"  (target {target:.0f}: {met})"
    return (f"{row['bench']:12s} {row['config']:58s} {row['clips_per_s']:9.1f} clips/s "
            f"{row['cores']:2d} core(s) {row['clips_per_s_per_core']:9.1f} /core "
            f"{row['clips_per_cpu_s']:9.1f} /CPU-s{verdict}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the requested benchmarks and prints a table.

    Args:
      argv: command-line arguments (without the program name); None = sys.argv.

    Returns:
      One dict per row: bench, config, clips_per_s, cores, clips_per_s_per_core,
      clips_per_cpu_s.
    """
    args = parse_args(argv)
    benches = [b for b in args.bench.split(",") if b]
    unknown = sorted(set(benches) - set(BENCHES))
    if unknown:
        raise ValueError(f"--bench {unknown} unknown; choose from {BENCHES}")
    if args.batch < 1 or args.num_clips < 1 or args.seconds <= 0:
        raise ValueError("--batch, --num-clips and --seconds must be positive")
    if args.file_seconds < 0 or args.clip_seconds <= 0:
        raise ValueError("--clip-seconds must be positive and --file-seconds at least 0")
    cores = pin_cores(args.cores)

    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads absl flags
        flags.FLAGS(sys.argv[:1], known_only=True)
    files = f" cut from {args.file_seconds:g} s files" if args.file_seconds else ""
    print(f"{cores} core(s) in the affinity set; {args.clip_seconds:g} s clips{files}",
          flush=True)
    rows = []
    host = [b for b in benches if b != "frontend"]
    if host:
        rows += run_host(host, args, cores)
    if "frontend" in benches:
        rows += run_frontend(args, cores)
    return rows


if __name__ == "__main__":
    report.run(main)

"""Throughput of the jitted log-mel front end.

Usage (one CPU core, 10 s int16 clips, every method):

    python benchmarks/frontend_speed.py --cores 1 --batch 8 --seconds 10 --iters 20
    python benchmarks/frontend_speed.py --cores 1 --batch 32 --sub-batches 8

Prints clips/s and clips/s per core for each method. The core count is the size of
this process's CPU affinity set (narrowed by --cores before JAX starts) or the XLA
intra-op thread count when XLA_FLAGS sets one, whichever is smaller.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import sys
import time

# Run from a checkout: make the package importable without installing it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

METHODS = ("folded", "dft", "fft")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="clips per call")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length in seconds")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per method")
    parser.add_argument(
        "--method", choices=(*METHODS, "all"), default="all", help="front-end method to time"
    )
    parser.add_argument(
        "--dtype", choices=("int16", "float32"), default="int16", help="audio dtype fed in"
    )
    parser.add_argument(
        "--sub-batches", type=int, default=1, help="log_mel sub_batches (CPU cache blocking)"
    )
    parser.add_argument(
        "--cores", type=int, default=0, help="pin to this many CPU cores (0: leave as is)"
    )
    return parser.parse_args()


def _pin_cores(count: int) -> int:
    """Narrows the CPU affinity to `count` cores (before JAX starts) and returns it."""
    cores = sorted(os.sched_getaffinity(0))
    if count > 0:
        if count > len(cores):
            sys.exit(f"--cores {count} asks for more than the {len(cores)} cores available")
        os.sched_setaffinity(0, cores[:count])
    used = len(os.sched_getaffinity(0))
    match = re.search(r"intra_op_parallelism_threads=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if match:
        used = min(used, int(match.group(1)))
    return used


def main() -> None:
    args = _parse_args()
    cores = _pin_cores(args.cores)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cacophony_jax.audio import frontend

    samples = int(round(args.seconds * frontend.SAMPLE_RATE))
    rng = np.random.default_rng(0)
    audio = rng.normal(0.0, 0.1, (args.batch, samples)).clip(-1.0, 1.0)
    if args.dtype == "int16":
        audio = np.round(audio * 32767).astype(np.int16)
    else:
        audio = audio.astype(np.float32)
    audio = jnp.asarray(audio)
    audio_len = jnp.full((args.batch,), samples, jnp.int32)

    print(
        f"device {jax.devices()[0].device_kind}, {cores} core(s), batch {args.batch}, "
        f"{args.seconds:g} s clips ({samples} samples, {args.dtype}), "
        f"sub_batches {args.sub_batches}"
    )
    methods = METHODS if args.method == "all" else (args.method,)
    subs = args.sub_batches
    for method in methods:
        fn = jax.jit(lambda a, n, m=method: frontend.log_mel(a, n, method=m, sub_batches=subs))
        jax.block_until_ready(fn(audio, audio_len))
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            jax.block_until_ready(fn(audio, audio_len))
            times.append(time.perf_counter() - start)
        rate = args.batch / statistics.median(times)
        best = args.batch / min(times)
        print(
            f"{method:7s} {rate:9.1f} clips/s  {rate / cores:9.1f} clips/s/core  "
            f"(best call {best:.1f} clips/s)"
        )


if __name__ == "__main__":
    main()

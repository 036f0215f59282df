"""One jitted call timed alone: what `attention_kernels.py` and `mlp_kernels.py` share."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def add_arguments(p: argparse.ArgumentParser, kernels: Sequence[str]) -> None:
    """--kernels (default: all of `kernels`), --dtype, --repeats, --warmup, --json."""
    p.add_argument("--kernels", default=",".join(kernels), help="comma list of " + str(kernels))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default="", help="append the rows to this JSON-lines file")


def chosen_kernels(args: argparse.Namespace, kernels: Sequence[str]) -> list[str]:
    """The --kernels asked for; an unknown one ends the script naming the choices."""
    chosen = [k for k in args.kernels.split(",") if k]
    bad = sorted(set(chosen) - set(kernels))
    if bad:
        raise SystemExit(f"--kernels: unknown {bad}; choose from {tuple(kernels)}")
    return chosen


def time_call(fn: Callable[..., Any], args: Sequence[Any], repeats: int, warmup: int,
              row: dict[str, Any], flops: float) -> dict[str, Any]:
    """Compiles and times ``fn(*args)``; adds compile_s, ms (median), tflops, spread_ms.

    A call the backend cannot compile or run (cuDNN on a CPU, say) adds "skipped" with
    the error's first line instead: a row, not a crash.
    """
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        row["compile_s"] = round(time.perf_counter() - t0, 2)
    except Exception as err:  # noqa: BLE001
        row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    row.update(ms=round(ms, 4), tflops=float(f"{flops / (ms * 1e-3) / 1e12:.4g}"),
               spread_ms=round((max(times) - min(times)) * 1e3, 4))
    return row

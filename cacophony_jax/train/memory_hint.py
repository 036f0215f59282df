"""What to do when a training step runs out of device memory.

XLA reports it as a JaxRuntimeError whose message starts "RESOURCE_EXHAUSTED: Out of
memory while trying to allocate ..." (at compile time or, asynchronously, at the
first read of a later step's result), followed by the allocator's whole state. The
run ends with the first line of that message and the settings that lower memory and,
where the device reports its pool (`device_memory`: XLA's BFC pool on a GPU), whether
the pool had the memory free but not in one piece: fragmentation, which a different
allocator avoids and a smaller batch only makes less likely.
"""

from __future__ import annotations

import os
import re
from typing import Any

import ml_collections

# XLA:GPU "Out of memory while trying to allocate", XLA:TPU "Ran out of memory in memory
# space hbm", PJRT "Failed to allocate request for". RESOURCE_EXHAUSTED alone is not
# enough: TensorStore reports a full disk with it too.
_OUT_OF_MEMORY = re.compile(r"out of memory|failed to allocate", re.IGNORECASE)
# The size asked for: "... trying to allocate 48.81GiB with allocator GPU_0_bfc", "...
# allocate 7406166528 bytes", "Failed to allocate request for 1.2G".
_REQUEST = re.compile(r"allocat\w*(?: request for)? ([0-9]+(?:\.[0-9]+)?)\s*"
                      r"(bytes|[KMGT]i?B|[KMGT]|B)\b", re.IGNORECASE)
_UNIT = {"b": 1, "bytes": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
         "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
# "allocator GPU_3_bfc" / "on device 3": the device that ran out.
_DEVICE = re.compile(r"GPU_(\d+)_bfc|on device (\d+)")
GIB = 2**30


def failed_device(error: BaseException, devices: list[Any]) -> Any:
    """The local device the error names (XLA:GPU's allocator name), else the first."""
    match = _DEVICE.search(str(error))
    index = int(match.group(1) or match.group(2)) if match else 0
    return devices[index] if index < len(devices) else devices[0]


def device_memory(device: Any) -> dict[str, int] | None:
    """The device's allocator statistics (`Device.memory_stats()`), or None where the
    backend keeps none (CPU) or cannot report them."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a statistic is never worth a second failure
        return None
    return dict(stats) if stats else None


def _largest_free(stats: dict[str, int]) -> int | None:
    """The largest free block, where the allocator reports one (CUDA's own reports 0)."""
    largest = stats.get("largest_free_block_bytes")
    return largest if largest and largest > 0 else None


def pool_summary(stats: dict[str, int] | None) -> str:
    """"pool 71.7 GiB, 3.4 GiB in use" (and the largest free block where reported), or ""
    for a device without a pool."""
    if not stats or not stats.get("bytes_limit"):
        return ""
    text = (f"pool {stats['bytes_limit'] / GIB:.1f} GiB, "
            f"{stats.get('bytes_in_use', 0) / GIB:.1f} GiB in use")
    if _largest_free(stats):
        text += f", largest free block {_largest_free(stats) / GIB:.1f} GiB"
    return text


def peak_summary(stats: dict[str, int] | None) -> str:
    """"peak 52.1 GiB of the 71.7 GiB pool (73 %)", or "" for a device without a pool."""
    if not stats or not stats.get("bytes_limit") or not stats.get("peak_bytes_in_use"):
        return ""
    peak, limit = stats["peak_bytes_in_use"], stats["bytes_limit"]
    return (f"peak {peak / GIB:.1f} GiB of the {limit / GIB:.1f} GiB pool "
            f"({100 * peak / limit:.0f} %)")


def _fragmented(said: str, stats: dict[str, int] | None, allocator: str) -> str:
    """A sentence when XLA's pool had the bytes asked for free but not in one block.

    Free is what the pool holds (`pool_bytes`: without preallocation it grows towards
    `bytes_limit`, which other processes may have taken) less what is in use."""
    match = _REQUEST.search(said)
    if (not match or not stats or not _largest_free(stats) or not stats.get("bytes_limit")
            or allocator not in ("", "default", "bfc")):
        return ""
    asked = float(match.group(1)) * _UNIT[match.group(2).lower()]
    held = min(stats["bytes_limit"], stats.get("pool_bytes") or stats["bytes_limit"])
    free = held - stats.get("bytes_in_use", 0)
    largest = _largest_free(stats)
    if asked > free or largest >= asked:
        return ""
    return (f"when the error was caught the pool had {free / GIB:.1f} GiB free but no block "
            f"of {asked / GIB:.2f} GiB (the largest was {largest / GIB:.1f} GiB): it is "
            "fragmented, so first set XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async (CUDA's own "
            "allocator, which does not need one free block of that size)")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an out-of-memory error of a device (a RuntimeError saying so)."""
    return isinstance(error, RuntimeError) and bool(_OUT_OF_MEMORY.search(str(error)))


def message(error: BaseException, stage: ml_collections.ConfigDict, devices: int,
            platform: str, stage_name: str | None = None,
            stats: dict[str, int] | None = None) -> str:
    """One paragraph: what XLA said (its first line) and what lowers memory.

    `stage` is the config that ran out (a multi-stage recipe's stage, named
    `stage_name`: its settings are then given as --config.stages.<name>.*). Settings
    already in effect (cuDNN attention, remat) are not suggested again. `stats`, the
    device's allocator statistics when the error was caught (`device_memory`), adds
    the pool's state, and names fragmentation when the pool had the bytes free but no
    block large enough.
    """
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    key = f"stages.{stage_name}." if stage_name else ""
    batch = stage.data.global_batch_size
    attention = stage.model.get("attention", "")
    remat = stage.model.get("remat", "none") or "none"
    fixes = [f"lower {key}data.global_batch_size ({batch}: {batch / max(1, devices):g} "
             "per device)"]
    if remat not in ("dots", "full"):
        fixes.append(f"set {key}model.remat=dots (recomputes some activations: +3 % FLOPs)")
    elif remat == "dots":
        fixes.append(f"set {key}model.remat=full (recomputes each block: +24 % FLOPs)")
    allocator = os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower()
    if platform == "gpu":
        if attention != "cudnn":
            fixes.append(f"use {key}model.attention=cudnn")
        fixes.append("raise XLA_PYTHON_CLIENT_MEM_FRACTION (JAX takes 0.75 of the GPU by "
                     "default)")
        if allocator != "cuda_async":
            fixes.append("or, where the allocator's summary shows enough free memory in "
                         "pieces, set XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async")
    fragmented = _fragmented(said, stats, allocator) if platform == "gpu" else ""
    if fragmented:
        fixes = [fragmented, *(f for f in fixes if "ALLOCATOR" not in f)]
    elif pool_summary(stats):
        said += f"; {pool_summary(stats)}"
    where = f"stage {stage_name!r}: " if stage_name else ""
    return (f"{where}the training step ran out of device memory ({said}). To fit: "
            + "; ".join(fixes) + ". Per-device memory by batch: docs/scaling.md, "
            "\"Per-device batch and memory\"; benchmarks/train_step.py --sweep-batch "
            "measures it on your device.")

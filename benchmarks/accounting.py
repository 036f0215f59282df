"""What a compiled step uses and what a device can do.

XLA's own FLOP count and the memory of a compiled program, and the per-device peak
FLOP/s that MFU is measured against (a datasheet figure for accelerators, a measured
matmul on CPU). Shared by train_step.py and aot_compile.py.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cacophony_jax.train import flops


def step_flops(compiled: Any) -> float:
    """FLOPs of one device's share of a compiled step (XLA cost analysis)."""
    analysis = compiled.cost_analysis()
    if not analysis:  # XLA:GPU compiled without a device has none
        return float("nan")
    if isinstance(analysis, list | tuple):  # older JAX: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def memory_bytes(compiled: Any) -> dict[str, int]:
    """Per-device sizes from `compiled.memory_analysis()` (empty where unsupported)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {k.removesuffix("_size_in_bytes"): int(getattr(stats, k, 0)) for k in keys}
    # Donated (aliased) outputs reuse their argument buffers.
    out["total"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                    + out["generated_code"])
    return out


def peak_flops_per_device(devices: list, dtype: str, override_tflops: float = 0.0
                          ) -> tuple[float, str]:
    """The per-device peak FLOP/s MFU is measured against, and where it came from.

    Args:
      devices: the mesh's devices.
      dtype: compute dtype name, for the CPU measurement.
      override_tflops: use this (TFLOP/s) when positive.

    Returns:
      (FLOP/s, source description); FLOP/s is NaN for an unknown accelerator.
    """
    if override_tflops > 0:
        return override_tflops * 1e12, "--peak-tflops"
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return measured_matmul_peak(devices, dtype), f"measured {dtype} matmul"
    known = flops.datasheet_peak(kind)
    if known is not None:
        return known[0], f"{known[1]} dense bf16 datasheet"
    return float("nan"), f"unknown device {kind!r}: pass --peak-tflops"


def measured_matmul_peak(devices: list, dtype: str, size: int = 1024, reps: int = 5) -> float:
    """Per-device FLOP/s of square matmuls run on all `devices` at once (best of reps).

    All devices run together because simulated CPU devices share the host's cores:
    the machine's total, divided by the device count, is each device's fair share.
    """
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    shape = (len(devices), size, size)
    x = jax.device_put(jnp.ones(shape, dtype), sharding)
    matmul = jax.jit(lambda a: jnp.einsum("dij,djk->dik", a, a), out_shardings=sharding)
    jax.block_until_ready(matmul(x))
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(matmul(x))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best

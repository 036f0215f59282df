"""Device descriptions for compiling GPU programs on a machine without the GPU.

XLA:GPU can compile for a GPU it cannot see when it is given the device's properties
as a `GpuTargetConfigProto` (text format) through
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`.
It still needs the CUDA compiler tool chain (ptxas, nvlink, cuDNN headers), which
`pip install "jax[cuda12]"` brings; no driver and no GPU are needed.

The numbers are the public datasheet and `cudaDeviceProp` values of each part:
SM count, shared memory per SM and per block, L2 size, HBM size and bandwidth,
boost clock and compute capability. Only the fields XLA reads for code generation,
tiling and the memory budget are given.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuPart:
    """The properties of one GPU model that XLA's compiler uses."""

    name: str  # as the CUDA driver reports it (`device.device_kind`)
    sm_count: int
    memory_bytes: int  # total device memory the driver reports
    memory_bandwidth: int  # bytes/s
    l2_bytes: int
    clock_ghz: float
    compute_capability: tuple[int, int]
    shared_memory_per_sm: int = 233_472  # 228 KiB (Hopper)
    shared_memory_per_block_optin: int = 232_448  # 227 KiB (Hopper)


PARTS: dict[str, GpuPart] = {
    # H100 SXM5 80 GB: 132 SMs, 50 MB L2, HBM3 3.35 TB/s, 1.98 GHz boost; the driver
    # reports 81,559 MiB.
    "h100": GpuPart(name="NVIDIA H100 80GB HBM3", sm_count=132,
                    memory_bytes=81_559 * 2**20, memory_bandwidth=3_352_320_000_000,
                    l2_bytes=50 * 2**20, clock_ghz=1.98, compute_capability=(9, 0)),
    # H200 SXM 141 GB: the H100 SXM die with HBM3e at 4.8 TB/s; the driver reports
    # 143,771 MiB.
    "h200": GpuPart(name="NVIDIA H200", sm_count=132,
                    memory_bytes=143_771 * 2**20, memory_bandwidth=4_800_000_000_000,
                    l2_bytes=50 * 2**20, clock_ghz=1.98, compute_capability=(9, 0)),
}

# Tool-chain versions the compile assumes (cuDNN 9.8+, CUDA 12.9, as jax[cuda12] pins).
_DNN_VERSION = (9, 8)
_RUNTIME_VERSION = (12, 9)


def target_config(part: GpuPart) -> str:
    """The `GpuTargetConfigProto` text for `part`."""
    major, minor = part.compute_capability
    fields = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": part.shared_memory_per_sm,
        "threads_per_core_limit": 2048,
        "core_count": part.sm_count,
        "fpus_per_core": 128,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65_535,
        "block_dim_limit_z": 65_535,
        "memory_bandwidth": part.memory_bandwidth,
        "l2_cache_size": part.l2_bytes,
        "clock_rate_ghz": part.clock_ghz,
        "device_memory_size": part.memory_bytes,
        "shared_memory_per_block_optin": part.shared_memory_per_block_optin,
        "registers_per_core_limit": 65_536,
        "registers_per_block_limit": 65_536,
    }
    info = "\n".join(f"  {k}: {v}" for k, v in fields.items())
    return (
        f"gpu_device_info {{\n{info}\n"
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
        f'platform_name: "CUDA"\n'
        f"dnn_version_info {{ major: {_DNN_VERSION[0]} minor: {_DNN_VERSION[1]} }}\n"
        f"runtime_version {{ major: {_RUNTIME_VERSION[0]} minor: {_RUNTIME_VERSION[1]} }}\n"
        f'device_description_str: "{part.name}"\n'
    )


def parse(spec: str) -> tuple[GpuPart, int, int]:
    """Reads 'PART[:N]' or 'PART:HOSTSxN' (N GPUs per host), e.g. 'h100:8', 'h100:2x8'.

    Returns:
      (part, hosts, gpus per host).

    Raises:
      ValueError: unknown part or malformed count.
    """
    name, _, count = spec.partition(":")
    part = PARTS.get(name.lower())
    if part is None:
        raise ValueError(f"unknown GPU {name!r}: use one of {sorted(PARTS)}")
    count = count or "1"
    try:
        hosts, per_host = (int(v) for v in count.split("x")) if "x" in count else (1, int(count))
    except ValueError:
        raise ValueError(f"GPU count {count!r}: write N or HOSTSxN, e.g. 8 or 2x8") from None
    if hosts < 1 or per_host < 1:
        raise ValueError(f"GPU count {count!r} must be positive")
    return part, hosts, per_host

"""The devices an ahead-of-time compile targets (`aot_compile.py --target`): simulated
CPU devices, a TPU topology (or a CPU stand-in without libtpu) or GPUs of a named part,
and the per-device memory budget a compile is checked against.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os

import jax

from benchmarks import gpu_targets


class TargetError(ValueError):
    """The requested compile target is unavailable or malformed."""


def target_devices(target: str, count: int) -> tuple[list, str, float | None]:
    """Devices to compile for, a description of them, and their memory budget.

    Args:
      target: "cpu", "tpu:<topology name>" or "gpu:<part>[:N | :HOSTSxN]".
      count: simulated CPU devices wanted for the cpu target.

    Returns:
      (devices, description, default per-device budget in bytes or None: by device
      kind, see `default_budget`). A TPU target without libtpu falls back to one
      simulated CPU device per chip of the topology, checked against the chip's HBM.
    """
    if target.startswith("tpu:"):
        from jax.experimental import topologies

        name = target.removeprefix("tpu:")
        try:
            devices = list(topologies.get_topology_desc(name, platform="tpu").devices)
            return (devices, f"TPU topology {name} ({devices[0].device_kind}, compile-only)",
                    None)
        except Exception as error:  # libtpu missing or an unknown topology name
            if _installed("libtpu"):
                raise TargetError(f"cannot compile for TPU topology {name} with libtpu "
                                  f"({error}); check the topology name, e.g. v5e:4x4") from None
            generation, chips, budget = tpu_stand_in(name)
            count = chips or count
            print(f"cannot compile for TPU topology {name} without libtpu ({error}); install "
                  f'it with pip install "jax[tpu]=={jax.__version__}" (no TPU needed). '
                  f"Going on with a CPU stand-in: {count} simulated CPU devices, one per "
                  f"chip, against "
                  f"{'the ' + generation + ' HBM' if budget else 'an 80 GB budget'}; its "
                  f"temporaries are not what XLA:TPU would allocate, and its verdict says "
                  f"so.", flush=True)
            devices, _ = cpu_devices(count)
            return (devices, f"{count} simulated CPU devices, a stand-in for TPU topology "
                             f"{name} (not the TPU compiler)", budget)
    if target.startswith("gpu:"):
        return (*gpu_devices(target.removeprefix("gpu:")), None)
    if target != "cpu":
        raise TargetError(f"--target {target!r}: use 'cpu', 'tpu:<topology>' or "
                          f"'gpu:<part>[:N]'")
    return (*cpu_devices(count), None)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cpu_devices(count: int) -> tuple[list, str]:
    """`count` simulated CPU devices, the stand-in for any target, and their description."""
    # Raises once the CPU backend has started (e.g. under pytest): then use what exists.
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", count)
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise TargetError(f"only {len(devices)} CPU devices exist but {count} were asked for; "
                          f"run in a fresh process (JAX started before the flag was set)")
    return devices[:count], f"{count} simulated CPU devices (stand-in)"


def tpu_stand_in(name: str) -> tuple[str, int, float | None]:
    """('TPU v5e', 16, 16e9) for 'v5e:4x4': the generation, its chips and HBM per chip
    (0 chips / None HBM where the name does not say)."""
    generation, _, dims = name.partition(":")
    try:
        chips = math.prod(int(d) for d in dims.lower().split("x")) if dims else 0
    except ValueError:
        chips = 0
    kind = "TPU " + generation.lower().replace("litepod", "e")
    budget = next((size for key, size in TPU_HBM_BYTES if key.lower() == kind.lower()), None)
    return kind, max(chips, 0), budget


def gpu_devices(spec: str) -> tuple[list, str]:
    """Compile-only devices of the GPU system `spec` ('h100:8', 'h200:2x8', ...)."""
    from jax.experimental import topologies

    try:
        part, hosts, per_host = gpu_targets.parse(spec)
    except ValueError as error:
        raise TargetError(f"--target gpu:{spec}: {error}") from None
    try:
        topology = topologies.get_topology_desc(
            part.name, platform="cuda", topology=f"1x{hosts}x{per_host}",
            target_config=gpu_targets.target_config(part))
    except Exception as error:  # no CUDA plugin, or its tool chain is incomplete
        raise TargetError(
            f"cannot compile for {part.name} without the CUDA plugin ({error}); install it "
            f'with pip install "jax[cuda12]=={jax.__version__}" (no GPU needed). GPU targets '
            f"have no CPU stand-in (--target cpu compiles one, whose temporaries are an "
            f"estimate)") from None
    devices = list(topology.devices)
    return devices, f"{len(devices)} x {part.name} ({hosts} host(s), compile-only)"


# HBM per chip in bytes by `device_kind` (first match): Google Cloud TPU pages.
TPU_HBM_BYTES = (("TPU v5 lite", 16e9), ("TPU v5e", 16e9), ("TPU v5p", 95e9),
                 ("TPU v5", 95e9), ("TPU v6 lite", 32e9), ("TPU v6e", 32e9), ("TPU v4", 32e9))


def default_budget(device) -> float:
    """Per-device bytes a program may use on `device`'s kind, when no budget is given.

    GPUs: the card's memory times the share JAX preallocates
    (`XLA_PYTHON_CLIENT_MEM_FRACTION`, 0.75 unless set). TPUs: the chip's HBM. The
    CPU stand-in: 80 GB, an 80 GB accelerator.
    """
    kind = device.device_kind
    for part in gpu_targets.PARTS.values():
        if part.name == kind:
            fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
            return part.memory_bytes * fraction
    for key, size in TPU_HBM_BYTES:
        if key.lower() in kind.lower():
            return size
    return 80e9

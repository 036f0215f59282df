"""The device mesh: ('data', 'fsdp') over every device of every process."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every device: data parallel across 'data',
# and FSDP ranks also take distinct examples (parameters are gathered per layer).
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
    """The configured mesh does not fit the devices."""


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
    """Resolves `cfg.data` / `cfg.fsdp` (one of them may be -1) to a shape.

    Args:
      cfg: the `config.mesh` block with integer fields `data` and `fsdp`.
      num_devices: devices to cover.

    Returns:
      (data, fsdp) with data * fsdp == num_devices.
    """
    data, fsdp = int(cfg.data), int(cfg.fsdp)
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size < 1 and size != -1:
            raise MeshError(f"config.mesh.{name}={size} must be a device count >= 1, or -1")
    if data == -1 and fsdp == -1:
        raise MeshError("config.mesh: only one of data and fsdp may be -1")
    if data == -1:
        data, rest = divmod(num_devices, fsdp)
        if rest or data == 0:
            raise MeshError(
                f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices; "
                "pick a divisor"
            )
    elif fsdp == -1:
        fsdp, rest = divmod(num_devices, data)
        if rest or fsdp == 0:
            raise MeshError(
                f"config.mesh.data={data} does not divide the {num_devices} devices; "
                "pick a divisor"
            )
    if data * fsdp != num_devices:
        raise MeshError(
            f"config.mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but "
            f"{num_devices} are present; set one of them to -1"
        )
    return data, fsdp


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """Builds the ('data', 'fsdp') mesh with Auto axis types.

    Args:
      cfg: the `config.mesh` block.
      devices: devices to use; all global devices by default.

    Returns:
      A `jax.sharding.Mesh`.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if set(devices) == set(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    # A subset, or devices of another backend (compile-only topologies): as given.
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a global batch array: leading dim over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (devices along the batch)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)

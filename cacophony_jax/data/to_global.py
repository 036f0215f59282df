"""The one place host batches become global device arrays."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from cacophony_jax.parallel import mesh as mesh_lib


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this host's rows into global arrays sharded over the batch axes.

    Each process passes the rows it loaded (its `pipeline.HostRows` share); the global
    array's leading dimension is the sum over processes.

    Args:
      batch: host-local numpy arrays with a leading batch dimension.
      mesh: the ('data', 'fsdp') mesh.

    Returns:
      The same keys as global `jax.Array`s.
    """
    return {
        key: jax.make_array_from_process_local_data(
            mesh_lib.batch_sharding(mesh, value.ndim), value)
        for key, value in batch.items()
    }


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) global array, on every host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

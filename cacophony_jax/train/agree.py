"""Agreement between the processes of one run, before their first training collective.

A mistake on one host (a path its disk lacks, a different config, another device
count) otherwise shows on the others as a collective that times out minutes later
with no word of why. These helpers make every process stop together, each naming the
process that failed and its reason. With one process they cost nothing.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any

import jax
import numpy as np

_MESSAGE_BYTES = 1024  # of each process's error message, shared with the others
# Settings a host may choose for itself (its CPUs): left out of the comparison.
HOST_LOCAL = ("data.num_workers", "data.read_threads", "data.prefetch_batches")


class OtherProcessError(ValueError):
    """Another process of this run failed; this one stops with it."""


def check_devices() -> None:
    """Refuses processes with unequal local device counts, from the global device
    list (no collective: the collectives of `agree` need equal counts to work).

    Raises:
      ValueError (on every process): the device counts, by process.
    """
    if jax.process_count() == 1:
        return
    counts = collections.Counter(d.process_index for d in jax.devices())
    devices = [counts.get(p, 0) for p in range(jax.process_count())]
    if len(set(devices)) > 1:
        raise ValueError(f"the processes of this run have different numbers of local devices "
                         f"({devices}, by process): give every host the same devices "
                         "(CUDA_VISIBLE_DEVICES, --cpu_devices)")


def _allgather(array: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array))


def agree(stage: str, error: BaseException | None) -> None:
    """Raises on every process when any process failed `stage`.

    Args:
      stage: what the processes were doing, for the message ("the config checks").
      error: this process's failure, or None.

    Raises:
      `error` itself on a process that failed; OtherProcessError naming the first
      failed process and its message on the others.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    text = b"" if error is None else str(error).encode("utf-8", "replace")[:_MESSAGE_BYTES]
    row = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    row[0] = error is not None
    row[1:1 + len(text)] = np.frombuffer(text, np.uint8)
    rows = _allgather(row)
    if error is not None:
        raise error
    failed = [p for p in range(rows.shape[0]) if rows[p, 0]]
    if failed:
        message = bytes(rows[failed[0], 1:]).rstrip(b"\0").decode("utf-8", "replace")
        raise OtherProcessError(
            f"process {failed[0]} of {rows.shape[0]} failed {stage}: {message} (this is "
            f"process {jax.process_index()}, which stops with it)")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_same_run(config_json: dict[str, Any]) -> None:
    """Refuses a run whose processes have different configs or local device counts.

    Args:
      config_json: this process's config as JSON-ready data.

    Raises:
      ValueError (on every process): naming the differing fields, or the device counts.
      The `HOST_LOCAL` fields (worker and thread counts) may differ.
    """
    if jax.process_count() == 1:
        return
    config_json = {k: v for k, v in _flat(config_json).items()
                   if not any(k == h or k.endswith(f".{h}") for h in HOST_LOCAL)}
    text = json.dumps(config_json, sort_keys=True).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest()[:8], np.uint8).astype(np.int32)
    mine = np.concatenate([digest, [jax.local_device_count(), len(text)]]).astype(np.int32)
    rows = _allgather(mine)
    devices = rows[:, 8].astype(int).tolist()
    if len(set(devices)) > 1:
        raise ValueError(f"the processes of this run have different numbers of local devices "
                         f"({devices}, by process): give every host the same devices "
                         "(CUDA_VISIBLE_DEVICES, --cpu_devices)")
    if all((row[:8] == rows[0, :8]).all() for row in rows):
        return
    # Some config differs: share process 0's, so each process can name the fields.
    from jax.experimental import multihost_utils

    size = int(rows[:, 9].max())
    buffer = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buffer[:len(text)] = np.frombuffer(text, np.uint8)
    first = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    reference = json.loads(bytes(first).rstrip(b"\0").decode())
    own = config_json
    differ = sorted(k for k in set(reference) | set(own) if reference.get(k) != own.get(k))
    error = None
    if differ:
        me = jax.process_index()
        shown = ", ".join(f"{'--' if k == 'workdir' else 'config.'}{k} ({reference.get(k)!r} "
                          f"on process 0, {own.get(k)!r} on process {me})" for k in differ[:5])
        error = ValueError(f"process {me}'s config differs from process 0's: {shown}; start "
                           "every process with the same command")
    agree("the config comparison", error)

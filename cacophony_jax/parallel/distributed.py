"""Starting JAX's multi-process runtime on TPU pods, SLURM clusters or by hand."""

from __future__ import annotations

import logging
import os
import socket
import time

import jax


def detected_environment() -> str | None:
    """Names the multi-process environment we run in, or None for one process.

    Explicit coordinator variables win over SLURM's, so that a SLURM job can pass
    its own (`launch/gpu/slurm.sbatch` with LAUNCH_MODE=explicit).
    """
    if os.environ.get("COORDINATOR_ADDRESS"):
        return "explicit"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return "tpu"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    return None


def initialize(mode: str = "auto", coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, cpu_collectives: str = "", *, init_timeout: int = 300,
               heartbeat_timeout: int = 100) -> bool:
    """Calls `jax.distributed.initialize` when the run spans several processes.

    Args:
      mode: 'auto' (detect SLURM / COORDINATOR_ADDRESS / TPU_WORKER_HOSTNAMES), 'on'
        (always; without an address jax detects the cluster, e.g. a Cloud TPU pod),
        or 'off'.
      coordinator_address: host:port of process 0 (else COORDINATOR_ADDRESS env).
      num_processes: process count (else NUM_PROCESSES env).
      process_id: this process (else PROCESS_ID env).
      cpu_collectives: 'gloo' or 'mpi' for multi-process CPU runs (tests, debugging).
      init_timeout: seconds to wait for every process to connect.
      heartbeat_timeout: seconds without a heartbeat after which a process is taken
        for dead (and every process stops).

    Returns:
      True if the distributed runtime was started.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed={mode!r}; use auto, on or off")
    env = detected_environment() if mode == "auto" else ("cluster" if mode == "on" else None)
    if coordinator_address or num_processes:
        env = "explicit"
    if env is None:
        return False
    for name, value in (("init_timeout", init_timeout), ("heartbeat_timeout", heartbeat_timeout)):
        if value < 1:
            raise ValueError(f"--{name}={value}: give a number of seconds, at least 1")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {}
    if env == "explicit":
        address = coordinator_address or os.environ.get("COORDINATOR_ADDRESS", "")
        count = num_processes or int(os.environ.get("NUM_PROCESSES", "0"))
        pid = process_id if process_id >= 0 else int(os.environ.get("PROCESS_ID", "-1"))
        if not address or count <= 0 or pid < 0:
            raise ValueError(
                "multi-process run needs a coordinator address, process count and "
                "process id: pass --coordinator_address/--num_processes/--process_id or "
                "set COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator address {address!r} must be HOST:PORT, e.g. "
                             "node001:12345 (process 0's host and a free port)")
        if pid >= count:
            raise ValueError(f"process id {pid} is not below the process count {count}: "
                             f"number the processes 0 to {count - 1}")
        kwargs = dict(coordinator_address=address, num_processes=count, process_id=pid)
        if pid > 0:  # process 0 serves the address; JAX would abort without a word
            started = time.monotonic()
            wait_for_coordinator(host.strip("[]"), int(port), init_timeout)
            init_timeout = max(1, round(init_timeout - (time.monotonic() - started)))
    # On Cloud TPU pods (where the worker list lives in the VM metadata, so 'auto'
    # cannot see it: pass --distributed=on) and SLURM, jax finds the coordinator.
    count = kwargs.get("num_processes")
    logging.info("starting the distributed runtime (%s): waiting for %s to connect; JAX "
                 "gives up after %d s if one never starts (--init_timeout)", env,
                 f"all {count} processes" if count else "every process", init_timeout)
    jax.distributed.initialize(**kwargs, initialization_timeout=init_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)
    logging.info("distributed runtime (%s): process %d of %d, %d local / %d global devices",
                 env, jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def wait_for_coordinator(host: str, port: int, timeout: float) -> None:
    """Waits until process 0's coordinator accepts connections at host:port.

    Raises:
      ValueError: the host name did not resolve, or nothing answered, in `timeout` s
        (JAX itself would abort the process with a C++ stack dump).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except socket.gaierror as e:  # a name may resolve only once process 0 is up
            if time.monotonic() >= deadline:
                raise ValueError(f"the coordinator host {host!r} of --coordinator_address "
                                 f"{host}:{port} cannot be resolved ({e.strerror}): give "
                                 "process 0's host name or address") from None
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"nothing answered at the coordinator address {host}:{port} within "
                    f"{timeout:g} s ({e.strerror or e}): start process 0 with the same "
                    "--coordinator_address, check that the port is open between the hosts, "
                    "or raise --init_timeout where hosts start minutes apart") from None
        time.sleep(1.0)

"""Starting JAX's multi-process runtime on TPU pods, SLURM clusters or by hand."""

from __future__ import annotations

import logging
import os
import socket
import time

import jax

# What srun sets in each task; JAX's SLURM detection reads them.
SLURM_TASK_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None


def detected_environment() -> str | None:
    """Names the multi-process environment we run in, or None for one process.

    Explicit coordinator variables win over SLURM's, so that a SLURM job can pass
    its own (`launch/gpu/slurm.sbatch` with LAUNCH_MODE=explicit).

    Raises:
      ValueError: half of an environment: NUM_PROCESSES or PROCESS_ID (or, outside
        SLURM, JAX_COORDINATOR_ADDRESS) without COORDINATOR_ADDRESS, or a SLURM
        allocation of several tasks entered without srun (JAX would wait for tasks
        that never start, or stop with an unclear message).
    """
    if os.environ.get("COORDINATOR_ADDRESS"):
        return "explicit"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return "tpu"
    in_slurm = "SLURM_JOB_ID" in os.environ
    tasks = _env_int("SLURM_NTASKS", 1) if in_slurm else 1
    if tasks > 1:
        missing = [name for name in SLURM_TASK_VARIABLES if name not in os.environ]
        if missing:
            raise ValueError(
                f"this process runs in a SLURM allocation of {tasks} tasks, but not as one "
                f"of its srun tasks ({', '.join(missing)} not set): start every process "
                "with srun (launch/gpu/slurm.sbatch), or run one process with all of this "
                "node's GPUs (launch/gpu/single_node.sh, or --distributed=off)")
        return "slurm"
    stray = [name for name in ("NUM_PROCESSES", "PROCESS_ID") if os.environ.get(name)]
    if not in_slurm and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        stray.append("JAX_COORDINATOR_ADDRESS")
    if stray:
        raise ValueError(
            f"{' and '.join(stray)} set but COORDINATOR_ADDRESS is not: a multi-process run "
            "needs COORDINATOR_ADDRESS (process 0's HOST:PORT), NUM_PROCESSES and "
            "PROCESS_ID on every process (or the --coordinator_address, --num_processes "
            "and --process_id flags); unset them to run one process")
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
    if coordinator_address or num_processes or process_id >= 0:
        env = "explicit"
    elif mode == "auto":
        env = detected_environment()
    else:
        env = "cluster" if mode == "on" else None
    if env is None:
        return False
    for name, value in (("init_timeout", init_timeout), ("heartbeat_timeout", heartbeat_timeout)):
        if value < 1:
            raise ValueError(f"--{name}={value}: give a number of seconds, at least 1")
    if cpu_collectives:
        try:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        except ValueError:  # JAX's message names its option, not the flag
            raise ValueError(f"--cpu_collectives={cpu_collectives!r}: use gloo (or mpi)") \
                from None
    kwargs = {}
    if env == "explicit":
        address = coordinator_address or os.environ.get("COORDINATOR_ADDRESS", "")
        count = num_processes or _env_int("NUM_PROCESSES", 0)
        pid = process_id if process_id >= 0 else _env_int("PROCESS_ID", -1)
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
            init_timeout = _wait(host, int(port), init_timeout, "--coordinator_address")
    elif env == "slurm" and _env_int("SLURM_PROCID", 0) > 0:
        # JAX finds the rest itself; where the launcher named the coordinator
        # (launch/gpu/slurm.sbatch does), wait for it as above.
        host, _, port = os.environ.get("JAX_COORDINATOR_ADDRESS", "").rpartition(":")
        if host and port.isdigit():
            init_timeout = _wait(host, int(port), init_timeout, "JAX_COORDINATOR_ADDRESS")
    # On Cloud TPU pods (where the worker list lives in the VM metadata, so 'auto'
    # cannot see it: pass --distributed=on) and SLURM, jax finds the coordinator.
    count = kwargs.get("num_processes")
    logging.info("starting the distributed runtime (%s): waiting for %s to connect; JAX "
                 "gives up after %d s if one never starts (--init_timeout)", env,
                 f"all {count} processes" if count else "every process", init_timeout)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=init_timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except ValueError as error:
        if "coordinator_address should be defined" not in str(error):
            raise
        raise ValueError(
            "--distributed=on, but JAX found no cluster here (a Cloud TPU pod, an srun task "
            "of a SLURM job) to take the coordinator from: pass --coordinator_address, "
            "--num_processes and --process_id (or set COORDINATOR_ADDRESS, NUM_PROCESSES "
            "and PROCESS_ID), or leave --distributed at auto") from None
    logging.info("distributed runtime (%s): process %d of %d, %d local / %d global devices",
                 env, jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def _wait(host: str, port: int, timeout: int, named_by: str) -> int:
    """Waits for the coordinator; returns what is left of `timeout` (at least 1 s)."""
    started = time.monotonic()
    wait_for_coordinator(host.strip("[]"), port, timeout, named_by)
    return max(1, round(timeout - (time.monotonic() - started)))


def wait_for_coordinator(host: str, port: int, timeout: float,
                         named_by: str = "--coordinator_address") -> None:
    """Waits until process 0's coordinator accepts connections at host:port.

    `named_by` (the flag or variable that gave the address) goes into the errors.

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
                raise ValueError(f"the coordinator host {host!r} of {named_by} "
                                 f"{host}:{port} cannot be resolved ({e.strerror}): give "
                                 "process 0's host name or address") from None
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"nothing answered at the coordinator address {host}:{port} within "
                    f"{timeout:g} s ({e.strerror or e}): start process 0 with the same "
                    f"{named_by}, check that the port is open between the hosts, "
                    "or raise --init_timeout where hosts start minutes apart") from None
        time.sleep(1.0)

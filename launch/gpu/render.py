#!/usr/bin/env python3
"""Renders (and inside an allocation runs) the srun command of a multi-node GPU job.

One training process per GPU. Two ways for the processes to find each other:

- ``--mode=slurm`` (default): JAX reads SLURM's own variables (SLURM_NTASKS,
  SLURM_PROCID, SLURM_LOCALID); each process takes GPU ``SLURM_LOCALID``. The
  coordinator, the node list's first host on port ``JAX_COORDINATOR_PORT``, is passed
  as ``JAX_COORDINATOR_ADDRESS``: JAX's own reading of SLURM_STEP_NODELIST takes only
  the first bracket of names such as ``rack[1-2]-node[01-02]``.
- ``--mode=explicit``: the same facts passed as COORDINATOR_ADDRESS, NUM_PROCESSES,
  PROCESS_ID (and JAX_LOCAL_DEVICE_IDS), for clusters where the automatic detection
  does not fit.

Examples::

    python launch/gpu/render.py --dry-run --nodes=4 --gpus-per-node=8 \\
        --nodelist='gpu-[01-04]' --config=configs/cacophony.py:base --workdir=/ckpt/run1
    python launch/gpu/render.py --first-host 'gpu-[01-04]'     # -> gpu-01

Without --dry-run it replaces itself with srun (inside an allocation only). Node and GPU
counts, the node list, CPUs per task, config and workdir default to SLURM_JOB_NUM_NODES,
GPUS_PER_NODE (or SLURM_GPUS_ON_NODE), SLURM_JOB_NODELIST, SLURM_CPUS_PER_TASK, CONFIG
and WORKDIR.
Everything after ``--`` is passed to ``python -m cacophony_jax.main``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def default_port() -> int:
    """The coordinator port JAX's own SLURM detection uses: 61440 + job id % 4096, so
    two jobs whose first node is the same do not collide (job id 0 outside a job)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    return 61440 + (int(job) if job.isdigit() else 0) % 4096


class NodeListError(ValueError):
    """A SLURM node list (e.g. "gpu-[01-04,07]") that cannot be expanded."""


def _split_top(text: str) -> list[str]:
    """Splits on the commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise NodeListError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise NodeListError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _range_values(body: str, nodelist: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7'], keeping each range's zero padding."""
    values = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise NodeListError(f"bad range {item!r} in node list {nodelist!r}")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise NodeListError(f"descending range {item!r} in node list {nodelist!r}")
        values += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands SLURM's compact host list notation, like `scontrol show hostnames`.

    Args:
      nodelist: e.g. "gpu-[01-04]", "a[1-2,5],b", "rack[1-2]-node[01-02]".

    Returns:
      The host names in order, e.g. ["gpu-01", "gpu-02", "gpu-03", "gpu-04"].

    Raises:
      NodeListError: unbalanced brackets, a bad or descending range, an empty list.
    """
    hosts: list[str] = []
    for part in _split_top(nodelist.strip()):
        if not part:
            raise NodeListError(f"empty host name in node list {nodelist!r}")
        hosts += _expand_one(part, nodelist)
    return hosts


def _expand_one(part: str, nodelist: str) -> list[str]:
    start = part.find("[")
    if start < 0:
        return [part]
    end = part.index("]", start)
    prefix, body, rest = part[:start], part[start + 1:end], part[end + 1:]
    tails = _expand_one(rest, nodelist)
    return [prefix + value + tail for value in _range_values(body, nodelist) for tail in tails]


def render(nodes: int, gpus_per_node: int, nodelist: str, config: str, workdir: str,
           overrides: list[str], port: int = 61440, mode: str = "slurm",
           cpus_per_task: int | None = None) -> tuple[dict[str, str], list[str]]:
    """The environment and srun command of a job with one process per GPU.

    Args:
      nodes: number of nodes in the allocation.
      gpus_per_node: GPUs (= processes) per node.
      nodelist: SLURM node list; its first host is the coordinator.
      config: `--config` of the training entry point, e.g. "configs/mae.py:base".
      workdir: `--workdir` of the training entry point.
      overrides: extra `--config.x.y=value` arguments.
      port: the coordinator's port.
      mode: "slurm" (JAX reads SLURM's variables) or "explicit" (we pass them).
      cpus_per_task: CPUs per process, passed on to srun (since Slurm 22.05 srun no
        longer inherits sbatch's --cpus-per-task, and each task would get one CPU).

    Returns:
      (environment to export before srun, srun argv).
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"need at least one node and one GPU, got {nodes} x {gpus_per_node}")
    if not 0 < port < 65536:
        raise ValueError(f"coordinator port {port} is not in 1-65535")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise ValueError(f"need at least one CPU per task, got {cpus_per_task}")
    hosts = expand_nodelist(nodelist)
    if len(hosts) != nodes:
        raise ValueError(f"node list {nodelist!r} names {len(hosts)} hosts but --nodes={nodes}")
    num_processes = nodes * gpus_per_node
    coordinator = f"{hosts[0]}:{port}"
    env = {"JAX_COORDINATOR_PORT": str(port)}
    train = ["python", "-m", "cacophony_jax.main", f"--config={config}",
             f"--workdir={workdir}", *overrides]
    # No --gpus-per-task: every task sees all GPUs of its node and JAX picks the one
    # at index SLURM_LOCALID; a one-GPU mask would leave only index 0 visible.
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={num_processes}",
            f"--ntasks-per-node={gpus_per_node}", "--kill-on-bad-exit=1", "--label"]
    if cpus_per_task:
        srun.append(f"--cpus-per-task={cpus_per_task}")
    if mode not in ("slurm", "explicit"):
        raise ValueError(f"mode must be 'slurm' or 'explicit', got {mode!r}")
    env["JAX_COORDINATOR_ADDRESS"] = coordinator
    if mode == "slurm":
        return env, srun + train
    env.update(COORDINATOR_ADDRESS=coordinator, NUM_PROCESSES=str(num_processes))
    # PROCESS_ID and the device index are only known inside each task.
    per_task = ('export PROCESS_ID="$SLURM_PROCID" JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"; '
                "exec " + shlex.join(train))
    return env, srun + ["bash", "-c", per_task]


def _env_int(name: str, *fallbacks: str) -> int | None:
    """The first of these variables that is set, as a whole number (None if none is)."""
    for key in (name, *fallbacks):
        raw = os.environ.get(key, "")
        value = raw.split("(")[0]  # SLURM may write "8(x2)"
        if value.isdigit():
            return int(value)
        if raw:
            raise ValueError(f"{key}={raw!r} is not a whole number")
    return None


_ENV_NUMBERS = (("nodes", ("SLURM_JOB_NUM_NODES", "SLURM_NNODES")),
                ("gpus_per_node", ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE")),
                ("port", ("COORDINATOR_PORT",)), ("cpus_per_task", ("SLURM_CPUS_PER_TASK",)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="render.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"))
    p.add_argument("--config", default=os.environ.get("CONFIG"))
    p.add_argument("--workdir", default=os.environ.get("WORKDIR"))
    p.add_argument("--port", type=int)
    p.add_argument("--cpus-per-task", type=int,
                   help="CPUs per process (default: the job's SLURM_CPUS_PER_TASK)")
    p.add_argument("--mode", choices=("slurm", "explicit"),
                   default=os.environ.get("LAUNCH_MODE", "slurm"))
    p.add_argument("--dry-run", action="store_true", help="print instead of running srun")
    p.add_argument("--first-host", metavar="NODELIST", help="print its first host and exit")
    p.add_argument("--expand", metavar="NODELIST", help="print its hosts, one a line, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: print (--dry-run) or run the srun command; see the module docstring.

    Args:
      argv: arguments without the program name.

    Returns:
      The exit status (only when it does not exec srun).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    try:
        args = _parser().parse_args(argv)
        if args.first_host or args.expand:
            hosts = expand_nodelist(args.first_host or args.expand)
            print("\n".join(hosts[:1] if args.first_host else hosts))
            return 0
        # Numbers not given as flags come from the environment (checked only then).
        for dest, names in _ENV_NUMBERS:
            if getattr(args, dest) is None:
                setattr(args, dest, _env_int(*names))
        if args.port is None:
            args.port = default_port()
        missing = [f"--{k.replace('_', '-')} ({env})" for k, env in (
            ("nodes", "SLURM_JOB_NUM_NODES"), ("gpus_per_node", "GPUS_PER_NODE"),
            ("nodelist", "SLURM_JOB_NODELIST"), ("config", "CONFIG"), ("workdir", "WORKDIR"))
            if getattr(args, k) is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}: pass the flag or set the variable")
        env, srun = render(args.nodes, args.gpus_per_node, args.nodelist, args.config,
                           args.workdir, overrides, args.port, args.mode,
                           args.cpus_per_task)
    except ValueError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        hosts = expand_nodelist(args.nodelist)
        print(f"# {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = "
              f"{args.nodes * args.gpus_per_node} processes; coordinator {hosts[0]}:{args.port}")
        for key, value in env.items():
            print(f"export {key}={shlex.quote(value)}")
        print(shlex.join(srun))
        return 0
    if "SLURM_JOB_ID" not in os.environ:
        print("render.py: not inside a SLURM allocation; submit launch/gpu/slurm.sbatch or "
              "use --dry-run", file=sys.stderr)
        return 2
    os.execvpe(srun[0], srun, {**os.environ, **env})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

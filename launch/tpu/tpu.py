#!/usr/bin/env python3
"""Cloud TPU launcher for cacophony_jax: create a TPU VM or pod slice, set it up, train.

Every setting comes from an environment variable (see launch/tpu/example.env) and the
flag of the same name overrides it. `--dry-run` prints the exact gcloud commands and
runs nothing. Standard library only, so it runs from any machine with the gcloud CLI.

    python launch/tpu/tpu.py create              # TPU VM / pod slice (or queued resource)
    python launch/tpu/tpu.py setup               # code + venv + jax[tpu] on every worker
    python launch/tpu/tpu.py run -- --config.optim.sam.enabled=true
    python launch/tpu/tpu.py logs [--worker=3]
    python launch/tpu/tpu.py resume [--recreate] # after a preemption or a crash
    python launch/tpu/tpu.py stop | status | delete

Everything after `--` on `run`/`resume` is passed to `python -m cacophony_jax.main`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

# gcloud.py sits beside this file; its folder is on the path when run as a script, not
# when this file is loaded by path (as the tests do).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gcloud import (  # noqa: E402
    ARCHIVE_NAME,
    Gcloud,
    LaunchError,
    log_file,
    run_script,
    setup_script,
    stop_script,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Not shipped to the workers: environments, caches, run outputs.
PACK_EXCLUDE = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "runs"}

# (dest, environment variable, help, default). The flag is --dest with '-' for '_'.
SETTINGS = (
    ("name", "TPU_NAME", "TPU VM (node) name", None),
    ("zone", "TPU_ZONE", "zone, e.g. us-central2-b", None),
    ("project", "TPU_PROJECT", "Google Cloud project id", None),
    ("type", "TPU_TYPE", "accelerator type, e.g. v4-32, v5litepod-16, v6e-8", None),
    ("runtime_version", "TPU_RUNTIME_VERSION", "software version (default: by generation)", None),
    ("workdir", "TPU_WORKDIR", "training workdir; gs://... (mounted on every worker) so it "
     "survives the VM", None),
    ("config", "TPU_CONFIG", "config, e.g. configs/cacophony.py:base", None),
    ("repo_url", "REPO_URL", "git URL cloned on the workers (unset: copy this checkout)", None),
    ("repo_ref", "REPO_REF", "branch, tag or commit of REPO_URL", "main"),
    ("remote_dir", "TPU_REMOTE_DIR", "code folder on each worker", "~/cacophony_jax"),
    ("python", "TPU_PYTHON", "Python used for the workers' venv (>= 3.11)", "python3.11"),
    ("log_dir", "TPU_LOG_DIR", "log folder on each worker", "~/cacophony_logs"),
    ("run_name", "TPU_RUN_NAME", "names the log and pid files of a run", "train"),
    ("queued_id", "TPU_QUEUED_ID", "queued-resource id (default: <name>-qr)", None),
    ("valid_until", "TPU_VALID_UNTIL", "queued: drop the request unfilled after, e.g. 6h", None),
    ("ssh_flags", "TPU_SSH_FLAGS", "extra ssh/scp flags, e.g. --tunnel-through-iap", ""),
    ("create_flags", "TPU_CREATE_FLAGS", "extra create flags, e.g. --network=N --reserved", ""),
    ("train_env", "TPU_ENV", "extra KEY=VALUE words exported for training", ""),
    ("stop_wait", "TPU_STOP_WAIT", "seconds `stop` waits for training to save and exit", "600"),
)
BOOL_SETTINGS = (
    ("queued", "TPU_QUEUED", "create through queued resources"),
    ("spot", "TPU_SPOT", "Spot capacity (cheaper, can be preempted)"),
    ("preemptible", "TPU_PREEMPTIBLE", "preemptible TPU VM (not with --queued; use --spot)"),
    ("dry_run", "TPU_DRY_RUN", "print the gcloud commands instead of running them"),
)
NODE = ("name", "zone", "project")
# subcommand: (help, settings it needs)
COMMANDS = {
    "create": ("create the TPU VM / pod slice (or a queued resource)", NODE + ("type",)),
    "setup": ("copy or clone the code, make a venv, install requirements + jax[tpu]", NODE),
    "run": ("start training on all workers, stream worker 0's log", NODE + ("config", "workdir")),
    "logs": ("show (and follow) a worker's training log", NODE),
    "resume": ("stop leftovers, rerun with the same workdir (newest checkpoint wins)",
               NODE + ("config", "workdir")),
    "stop": ("stop the training process on all workers", NODE),
    "status": ("describe the TPU (and the queued resource)", NODE),
    "delete": ("delete the TPU (and the queued resource)", NODE),
}
# Software versions for JAX per TPU generation (Cloud TPU "TPU software versions").
RUNTIMES = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5e": "v2-alpha-tpuv5-lite"}
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"  # v4 and older


# (setting, the shape gcloud accepts, an example): checked before any command runs.
_FORMATS = (
    ("type", r"v\d+[a-z]*-[1-9]\d*", "an accelerator type such as v4-32 or v5litepod-16"),
    ("zone", r"[a-z]+-[a-z]+\d+-[a-z]", "a zone such as us-central2-b"),
    ("name", r"[a-z]([-a-z0-9]*[a-z0-9])?", "a TPU name (lower-case letters, digits, '-')"),
)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _add_settings(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # Accepted before and after the subcommand; SUPPRESS keeps a value given before it.
    default = argparse.SUPPRESS if suppress else None
    for dest, env, help_text, _ in SETTINGS:
        parser.add_argument(_flag(dest), dest=dest, default=default, help=f"{help_text} [{env}]")
    for dest, env, help_text in BOOL_SETTINGS:
        parser.add_argument(_flag(dest), dest=dest, default=default,
                            action=argparse.BooleanOptionalAction, help=f"{help_text} [{env}]")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: global settings, then one subcommand."""
    parser = argparse.ArgumentParser(prog="tpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_settings(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_settings(p, suppress=True)
        if name in ("run", "resume"):
            p.add_argument("--no-stream", action="store_true",
                           help="return once started instead of following worker 0's log")
        if name == "resume":
            p.add_argument("--recreate", action="store_true",
                           help="delete, recreate and set up the TPU first (after preemption)")
        if name == "logs":
            p.add_argument("--worker", default="0", help="worker index, or 'all' (no follow)")
            p.add_argument("--lines", type=int, default=100, help="lines of history to show")
            p.add_argument("--no-follow", action="store_true", help="print and exit")
    return parser


def _env_bool(env: str) -> bool:
    value = os.environ.get(env, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise LaunchError(f"{env}={value!r} is not a boolean; use 1/0, true/false or yes/no")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills each setting from its flag, else its environment variable, else its default.

    Args:
      args: the parsed command line.

    Returns:
      The same namespace with every setting resolved.

    Raises:
      LaunchError: a setting the subcommand needs is unset (names the variable).
    """
    for dest, env, _, default in SETTINGS:
        value = getattr(args, dest, None)
        if value is None:
            value = os.environ.get(env) or default
        setattr(args, dest, value)
    for dest, env, _ in BOOL_SETTINGS:
        value = getattr(args, dest, None)
        setattr(args, dest, _env_bool(env) if value is None else value)
    needed = list(COMMANDS[args.command][1])
    if args.command == "resume" and args.recreate:
        needed.append("type")
    envs = {dest: env for dest, env, _, _ in SETTINGS}
    for dest in needed:
        if not getattr(args, dest):
            raise LaunchError(
                f"{envs[dest]} is not set: export {envs[dest]}=... or pass {_flag(dest)} "
                "(see launch/tpu/example.env)")
    for dest, pattern, example in _FORMATS:
        value = getattr(args, dest)
        if dest in needed and value and not re.fullmatch(pattern, value):
            raise LaunchError(f"{envs[dest]}={value!r} does not look like {example}")
    if not re.fullmatch(r"[1-9]\d*", str(args.stop_wait)):
        raise LaunchError(f"TPU_STOP_WAIT={args.stop_wait!r} must be a whole number of "
                          "seconds, e.g. 600")
    if args.queued and args.preemptible:
        raise LaunchError("queued resources take --spot, not --preemptible (TPU_PREEMPTIBLE)")
    if args.spot and args.preemptible:
        raise LaunchError("TPU_SPOT and TPU_PREEMPTIBLE are both set: gcloud takes one; Spot "
                          "is the newer kind of preemptible capacity")
    if not re.fullmatch(r"[A-Za-z0-9][-A-Za-z0-9._]*", args.run_name):
        # It names files on the workers and goes into their shell scripts.
        raise LaunchError(f"TPU_RUN_NAME={args.run_name!r}: use letters, digits, '.', '_' "
                          "and '-', starting with a letter or digit")
    args.queued_id = args.queued_id or f"{args.name}-qr"
    if args.type and not args.runtime_version:
        args.runtime_version = next(
            (rt for gen, rt in RUNTIMES.items() if args.type.startswith(gen)), DEFAULT_RUNTIME)
    return args


def _jax_version() -> str:
    path = os.path.join(REPO_ROOT, "requirements.txt")
    try:
        with open(path) as f:
            for line in f:
                if line.strip().startswith("jax=="):
                    return line.strip().split("==", 1)[1]
    except OSError as e:
        raise LaunchError(f"cannot read {path}: run tpu.py from a cacophony_jax checkout") from e
    raise LaunchError(f"{path} pins no jax version (a line 'jax==X.Y.Z' is needed)")


def _cmd_create(g: Gcloud) -> None:
    g.call(g.create())
    if g.cfg.queued and not g.cfg.dry_run:
        print(f"queued resource {g.cfg.queued_id} requested; `tpu.py status` shows when it "
              "is ACTIVE, then run `tpu.py setup`", file=sys.stderr)


def _pack_repo(archive: str) -> None:
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = info.name.split("/")
        # .venv* also covers the validator's .venv-hear (README.md, "HEAR").
        if any(p in PACK_EXCLUDE or p.startswith(("workdir", ".venv")) for p in parts[1:]):
            return None
        return info

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(REPO_ROOT, arcname=".", filter=keep)


def _cmd_setup(g: Gcloud) -> None:
    cfg = g.cfg
    script = setup_script(cfg, _jax_version())
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, ARCHIVE_NAME)
        if not cfg.repo_url:
            if cfg.dry_run:
                print(f"# pack {REPO_ROOT} without {sorted(PACK_EXCLUDE)} into {archive}")
            else:
                _pack_repo(archive)
            g.call(g.scp_to_all(archive, ARCHIVE_NAME))
        g.call(g.ssh("all", script))


def _cmd_run(g: Gcloud, overrides: list[str], stream: bool) -> None:
    cfg = g.cfg
    if not cfg.workdir.startswith("gs://"):
        print(f"note: TPU_WORKDIR={cfg.workdir} is on the workers' disks; use gs://... for a "
              "multi-host slice and to resume after a preemption", file=sys.stderr)
    g.call(g.ssh("all", run_script(cfg, overrides)))
    if stream:
        g.call(g.ssh("0", [f"tail -n +1 -F {log_file(cfg, '0')}"]), check=False)


def _cmd_logs(g: Gcloud, worker: str, lines: int, follow: bool) -> None:
    if worker != "all" and not worker.isdigit():
        raise LaunchError(f"--worker must be an index or 'all', got {worker!r}")
    follow = " -F" if follow and worker != "all" else ""
    tail = f"tail -n {lines}{follow} {log_file(g.cfg, '*' if worker == 'all' else worker)}"
    g.call(g.ssh(worker, [tail]), check=False)


def _cmd_stop(g: Gcloud) -> None:
    g.call(g.ssh("all", stop_script(g.cfg)))


def _cmd_status(g: Gcloud) -> None:
    for argv in ([g.queued("describe")] if g.cfg.queued else []) + [g.tpu("describe")]:
        g.call(argv, check=False)


def _gone(g: Gcloud) -> bool:
    """Whether the TPU (or queued resource) does not exist: gcloud answers NOT_FOUND."""
    argv = g.queued("describe") if g.cfg.queued else g.tpu("describe")
    try:
        result = subprocess.run(argv + ["--format=value(name)"], capture_output=True,
                                text=True)
    except FileNotFoundError:
        return False  # call() says how to install gcloud
    return result.returncode != 0 and "NOT_FOUND" in result.stderr


def _cmd_delete(g: Gcloud, missing_ok: bool = False) -> None:
    if missing_ok and not g.cfg.dry_run and _gone(g):
        # e.g. a `resume --recreate` whose create failed for want of capacity, rerun
        what = f"queued resource {g.cfg.queued_id}" if g.cfg.queued else f"TPU {g.cfg.name}"
        print(f"{what} does not exist; nothing to delete", file=sys.stderr)
        return
    if g.cfg.queued:
        # --force also deletes the TPU VM the queued resource holds.
        g.call(g.queued("delete", "--force", "--quiet"))
    else:
        g.call(g.tpu("delete", "--quiet"))


def _wait_active(g: Gcloud) -> None:
    argv = g.queued("describe", "--format=value(state.state)")
    if g.cfg.dry_run:
        print(shlex.join(argv) + "  # repeated until ACTIVE")
        return
    # Waits as long as the request may stay queued (TPU_VALID_UNTIL bounds that).
    while (state := subprocess.run(argv, capture_output=True, text=True).stdout.strip()) \
            != "ACTIVE":
        if state in ("FAILED", "SUSPENDED", ""):
            raise LaunchError(f"queued resource {g.cfg.queued_id} is {state or 'not found'}; "
                              "`tpu.py status` shows why")
        print(f"queued resource {g.cfg.queued_id}: {state}; waiting", file=sys.stderr)
        time.sleep(60)


def _cmd_resume(g: Gcloud, overrides: list[str], stream: bool, recreate: bool) -> None:
    if recreate:
        if not g.cfg.workdir.startswith("gs://"):
            raise LaunchError(
                f"TPU_WORKDIR={g.cfg.workdir} is on the TPU's own disks, which --recreate "
                "deletes with their checkpoints: training would start again from step 0. "
                "Resume runs from a gs:// workdir; to start afresh, delete, create, setup "
                "and run")
        # A preempted Spot TPU / queued resource cannot restart in place: delete, ask
        # again, reinstall; the gs:// workdir still holds the checkpoints. Rerunnable:
        # a TPU deleted by an earlier try that failed to create is not deleted again.
        _cmd_delete(g, missing_ok=True)
        _cmd_create(g)
        if g.cfg.queued:
            _wait_active(g)
        _cmd_setup(g)
    else:
        _cmd_stop(g)
    _cmd_run(g, overrides, stream)


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs one subcommand.

    Args:
      argv: arguments without the program name; `--` separates training overrides.

    Returns:
      The process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args)
        if overrides and cfg.command not in ("run", "resume"):
            raise LaunchError(f"training overrides after -- only apply to run/resume, "
                              f"not {cfg.command}")
        g = Gcloud(cfg)
        stream = not getattr(cfg, "no_stream", False)
        actions = {
            "create": lambda: _cmd_create(g),
            "setup": lambda: _cmd_setup(g),
            "run": lambda: _cmd_run(g, overrides, stream),
            "resume": lambda: _cmd_resume(g, overrides, stream, cfg.recreate),
            "logs": lambda: _cmd_logs(g, cfg.worker, cfg.lines, follow=not cfg.no_follow),
            "stop": lambda: _cmd_stop(g),
            "status": lambda: _cmd_status(g),
            "delete": lambda: _cmd_delete(g),
        }
        actions[cfg.command]()
    except LaunchError as e:
        print(f"tpu.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The gcloud command lines of the Cloud TPU launcher and the shell scripts its workers run.

`tpu.py` resolves the settings and calls these builders; `Gcloud.call` runs a command
(or prints it in dry-run mode). Standard library only, like `tpu.py`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys

METADATA_WORKER = (
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
)
ARCHIVE_NAME = "cacophony_jax_src.tar.gz"  # the packed checkout, in each worker's home
# Training reads and writes file-system paths: a gs:// bucket named in the workdir, in
# TPU_ENV or in an override is mounted here on every worker (Cloud Storage FUSE).
GCS_MOUNT = "/mnt/gcs"
# The most objects a folder renamed on a flat (not hierarchical) bucket may hold:
# Cloud Storage FUSE refuses folder renames above it (0 by default), and Orbax commits
# a checkpoint by renaming its folder.
RENAME_DIR_LIMIT = 100000
# A gs://BUCKET path at the start of a value, after '=' (--flag=, KEY=) or inside a
# list (config.data.extra_evals: 'clotho:gs://b/clotho,esc50:gs://b/esc').
_GS_PATH = re.compile(r"(^|[=,:])gs://([a-z0-9][-_.a-z0-9]*[a-z0-9])(?=[/,:]|$)")
# NAME=value of a variable named as a credential (a KEY, TOKEN, SECRET, PASSWORD or
# CREDENTIALS part, e.g. WANDB_API_KEY), inside any argument (the worker script's
# exports): a real run does not echo its value to the terminal or a log. The value is
# a whole shell word: 'NAME=value' as shlex.quote writes it (a quote inside as
# '"'"'), NAME="value", NAME='value', or NAME=value up to a space or ';'.
_SECRET_NAME = (r"(?:[A-Za-z0-9]+_)*(?:API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|"
                r"CREDENTIALS?)(?:_[A-Za-z0-9]+)*")
_SECRET = re.compile(rf"(?<=')({_SECRET_NAME})=(?:[^']|'\"'\"')*(?=')"
                     rf"|\b({_SECRET_NAME})=(?:\"((?:[^\"\\]|\\.)*)\"|'([^']*)'|[^\s;'\"]+)",
                     re.I)


def hide_secrets(text: str) -> str:
    """`text` (one argument, before it is quoted for the terminal) with the values of
    credential-like variables (``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``)
    replaced by ``***``, for what a real run echoes."""
    def hidden(m: re.Match) -> str:
        if m.group(1):
            return f"{m.group(1)}=***"
        quote = '"' if m.group(3) is not None else "'" if m.group(4) is not None else ""
        return f"{m.group(2)}={quote}***{quote}"

    return _SECRET.sub(hidden, text)


class LaunchError(ValueError):
    """A setting is missing or invalid, or a gcloud command failed."""


class Gcloud:
    """Runs (or, in dry-run mode, prints) gcloud commands for one TPU node."""

    def __init__(self, cfg: argparse.Namespace):
        """Args: cfg: the resolved settings (name, zone, project, dry_run, ...)."""
        self.cfg = cfg
        self.where = [f"--zone={cfg.zone}", f"--project={cfg.project}"]

    def call(self, argv: list[str], check: bool = True) -> int:
        """Runs one command; in dry-run mode prints it instead and returns 0."""
        if self.cfg.dry_run:
            print(shlex.join(argv), flush=True)
            return 0
        print("+ " + shlex.join(map(hide_secrets, argv)), file=sys.stderr, flush=True)
        try:
            code = subprocess.run(argv, check=False).returncode
        except FileNotFoundError as e:
            raise LaunchError(f"{argv[0]} not found: install the Google Cloud CLI and run "
                              "`gcloud auth login`") from e
        if check and code != 0:
            raise LaunchError(f"command failed (exit code {code}): {shlex.join(argv[:6])} ...")
        return code

    def tpu(self, verb: str, *extra: str) -> list[str]:
        """``gcloud compute tpus tpu-vm VERB NAME`` with zone, project and `extra`."""
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.cfg.name, *self.where, *extra]

    def queued(self, verb: str, *extra: str) -> list[str]:
        """``gcloud compute tpus queued-resources VERB ID`` with zone, project and `extra`."""
        return ["gcloud", "compute", "tpus", "queued-resources", verb, self.cfg.queued_id,
                *self.where, *extra]

    def ssh(self, worker: str, script: list[str]) -> list[str]:
        """ssh running `script` (shell lines) on `worker` ('all' or an index)."""
        # A line ending in '&' already ends its command; '& ;' is a shell syntax error.
        joined = "".join(line + (" " if line.endswith("&") else "; ") for line in script)
        return self.tpu("ssh", f"--worker={worker}", *shlex.split(self.cfg.ssh_flags),
                        "--command=" + joined.rstrip("; "))

    def scp_to_all(self, local: str, remote: str) -> list[str]:
        """scp of a local file to `remote` on every worker."""
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.cfg.name}:{remote}",
                "--worker=all", *self.where, *shlex.split(self.cfg.ssh_flags)]

    def create(self) -> list[str]:
        """The create command: a TPU VM / pod slice, or a queued resource for one."""
        cfg = self.cfg
        if cfg.queued:
            argv = self.queued("create", f"--node-id={cfg.name}",
                               f"--accelerator-type={cfg.type}",
                               f"--runtime-version={cfg.runtime_version}")
            if cfg.spot:
                argv.append("--spot")
            if cfg.valid_until:
                argv.append(f"--valid-until-duration={cfg.valid_until}")
        else:
            argv = self.tpu("create", f"--accelerator-type={cfg.type}",
                            f"--version={cfg.runtime_version}")
            if cfg.spot:
                argv.append("--spot")
            if cfg.preemptible:
                argv.append("--preemptible")
        return argv + shlex.split(cfg.create_flags)


def rpath(path: str) -> str:
    """Quotes a remote path for the shell, letting a leading ~/ expand to $HOME."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def log_file(cfg: argparse.Namespace, worker: str) -> str:
    """The (shell-quoted) training log of `worker` ('$W' or '*' are left to the shell)."""
    return f"{rpath(cfg.log_dir)}/{shlex.quote(cfg.run_name)}-worker{worker}.log"


def pid_file(cfg: argparse.Namespace) -> str:
    """The (shell-quoted) file holding the pid of the run this launcher started."""
    return f"{rpath(cfg.log_dir)}/{shlex.quote(cfg.run_name)}.pid"


def on_mount(value: str, buckets: set[str]) -> str:
    """`value` (a path, KEY=PATH or --flag=PATH) with a gs://BUCKET/... path turned into
    the workers' mount of it; the bucket is added to `buckets`."""
    def mounted(match: re.Match) -> str:
        buckets.add(match.group(2))
        return f"{match.group(1)}{GCS_MOUNT}/{match.group(2)}"

    return _GS_PATH.sub(mounted, value)


def train_command(cfg: argparse.Namespace, overrides: list[str],
                  buckets: set[str] | None = None) -> str:
    """The training command line every worker runs (quoted for a POSIX shell), with
    gs:// paths on their mounts (the buckets are added to `buckets`)."""
    buckets = set() if buckets is None else buckets
    # --distributed=on: a pod's worker list lives in the VM metadata, which jax reads
    # itself once asked to start the distributed runtime.
    return shlex.join(["python", "-m", "cacophony_jax.main", f"--config={cfg.config}",
                       f"--workdir={on_mount(cfg.workdir, buckets)}", "--distributed=on",
                       *(on_mount(o, buckets) for o in overrides)])


def mount_lines(buckets: set[str]) -> list[str]:
    """Shell lines that mount each bucket at GCS_MOUNT/<bucket> unless it already is."""
    lines = []
    for bucket in sorted(buckets):
        where = shlex.quote(f"{GCS_MOUNT}/{bucket}")
        # Already mounted by an earlier run: leave it (root cannot chown a FUSE mount).
        lines.append(f"mountpoint -q {where} || {{ sudo mkdir -p {where} && sudo chown "
                     f"\"$(id -u):$(id -g)\" {where} && gcsfuse --implicit-dirs "
                     f"--rename-dir-limit={RENAME_DIR_LIMIT} "
                     f"{shlex.quote(bucket)} {where}; }}")
    return lines


# The files the last unpack wrote (in the code folder), so the next removes those that
# the new checkout no longer has; a workdir or venv in the folder is left alone.
UNPACKED_LIST = ".launcher_files"


def unpack_lines(src: str) -> list[str]:
    """Shell lines that unpack ~/ARCHIVE_NAME into `src` (shell-quoted), first removing
    the files an earlier unpack wrote that the new archive lacks."""
    new = f"~/{ARCHIVE_NAME}.files"
    return [
        f"mkdir -p {src}",
        # Files only ("./a/b" -> "a/b"; folders end in "/").
        f"tar -tzf ~/{ARCHIVE_NAME} | sed -n 's|^[.]/\\(.*[^/]\\)$|\\1|p' | LC_ALL=C sort > {new}",
        f"if [ -f {src}/{UNPACKED_LIST} ]; then LC_ALL=C comm -23 {src}/{UNPACKED_LIST} "
        f"{new} | while IFS= read -r f; do [ -d {src}/\"$f\" ] || rm -f -- {src}/\"$f\"; "
        "done; fi",
        f"tar -xzf ~/{ARCHIVE_NAME} -C {src}",
        f"mv {new} {src}/{UNPACKED_LIST}",
        f"rm -f ~/{ARCHIVE_NAME}",
    ]


def setup_script(cfg: argparse.Namespace, jax_version: str) -> list[str]:
    """Shell lines that fetch the code (clone, or unpack ARCHIVE_NAME) and build the venv.

    Args:
      cfg: the settings.
      jax_version: the jax pin of requirements.txt (jax[tpu] of the same version).

    Returns:
      The script, one command a line.
    """
    src = rpath(cfg.remote_dir)
    py = shlex.quote(cfg.python)
    script = [
        "set -euo pipefail",
        # JAX needs Python >= 3.11; TPU VM images ship an older python3.
        f"if ! command -v {py} >/dev/null; then sudo apt-get update -qq && "
        f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {py} {py}-venv; fi",
    ]
    if cfg.repo_url:
        url, ref = shlex.quote(cfg.repo_url), shlex.quote(cfg.repo_ref)
        script += [
            f"if [ ! -d {src}/.git ]; then git clone --quiet {url} {src}; fi",
            # FETCH_HEAD works alike for a branch, a tag and a commit.
            f"git -C {src} fetch --quiet {url} {ref}",
            f"git -C {src} checkout --quiet --detach FETCH_HEAD",
        ]
    else:
        script += unpack_lines(src)
    return script + [
        # Cloud Storage FUSE, for gs:// workdirs and data (Google's apt repository).
        "if ! command -v gcsfuse >/dev/null; then "
        "echo \"deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" "
        "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
        "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
        "| sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null && "
        "sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "gcsfuse; fi",
        f"cd {src}",
        f"{py} -m venv .venv",
        ". .venv/bin/activate",
        "pip install --quiet --upgrade pip",
        # Same jax as requirements.txt, plus the TPU runtime (libtpu) that matches it.
        f"pip install --quiet -r requirements.txt {shlex.quote(f'jax[tpu]=={jax_version}')}",
        "python -c 'import jax; print(\"jax\", jax.__version__, \"ready\")'",
    ]


def run_script(cfg: argparse.Namespace, overrides: list[str]) -> list[str]:
    """Shell lines that start training in the background on a worker, logging to its file.

    Args:
      cfg: the settings.
      overrides: training flags appended to the command.

    Returns:
      The script, one command a line.
    """
    exports = shlex.split(cfg.train_env)
    bad = [e for e in exports if "=" not in e]
    if bad:
        raise LaunchError(f"TPU_ENV entries must be KEY=VALUE, got {bad}")
    buckets: set[str] = set()
    command = train_command(cfg, overrides, buckets)
    exports = [on_mount(e, buckets) for e in exports]
    pid = pid_file(cfg)
    return [
        "set -euo pipefail",
        f"cd {rpath(cfg.remote_dir)}",
        ". .venv/bin/activate",
        f"mkdir -p {rpath(cfg.log_dir)}",
        f"W=$(curl -sf -H Metadata-Flavor:Google {METADATA_WORKER} || hostname)",
        f"LOG={log_file(cfg, '$W')}",
        f'if [ -f {pid} ] && {_ours(f"$(cat {pid})")}; then '
        f'echo "worker $W: {cfg.run_name} is already running; use tpu.py stop" >&2; exit 1; fi',
        *mount_lines(buckets),
        *(f"export {shlex.quote(e)}" for e in exports),
        # setsid + nohup: training outlives the ssh session; >> keeps earlier attempts' logs.
        f'setsid nohup {command} >> "$LOG" 2>&1 < /dev/null &',
        f"echo $! > {pid}",
        'echo "worker $W: started pid $!, log $LOG"',
    ]


def stop_script(cfg: argparse.Namespace) -> list[str]:
    """Shell lines that stop the run this launcher started (its pid file) and wait for it.

    A worker whose process outlives `cfg.stop_wait` seconds exits 1, so `stop` fails
    and `resume` starts nothing (a partial start would hang in jax.distributed)."""
    pid = pid_file(cfg)
    wait = int(cfg.stop_wait)
    # Only that process (a pid file left by a run that ended may name another process
    # now); waiting frees the TPU for the next run.
    return [f"if [ -f {pid} ] && P=$(cat {pid}) && {_ours('$P')}; then "
            f"kill $P 2>/dev/null || true; "
            f"for i in $(seq {wait}); do {_ours('$P')} || break; sleep 1; done; "
            f"if {_ours('$P')}; then echo \"still running after {wait} s: $P (it "
            "may still be saving its checkpoint); stop again, or kill -9 $P\" >&2; exit 1; "
            f"else rm -f {pid}; echo stopped $P; fi; else rm -f {pid}; echo not running; fi"]


def _ours(pid: str) -> str:
    """A shell test: process `pid` is alive and is a training run (not a process that
    was given the pid of a run that ended)."""
    return f"grep -qa 'cacophony_jax[.]main' /proc/{pid}/cmdline 2>/dev/null"

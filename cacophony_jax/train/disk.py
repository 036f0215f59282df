"""A full disk under the workdir: recognised in any writer's error, reported once.

When the disk fills (or a quota or the file-size limit is reached), every writer of a
run fails at once: Orbax's save threads, TensorStore's array writes, the metrics files.
`failure` finds the cause behind any of their errors, `DiskFullError` is the one error
the run then stops with (what failed, where, what is still intact, the fix), and the
tracebacks Orbax's background threads log for the same cause are dropped (shown with
--verbosity=1). They are not kept in a log file in the workdir: that is on the full
disk.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re

from etils import epath

# errno -> what ran out, said of the workdir.
_CAUSES = {
    errno.ENOSPC: "the disk that holds the workdir {} is full",
    errno.EDQUOT: "the disk quota of the workdir {} is used up",
    errno.EFBIG: "a file in the workdir {} reached the file-size limit (ulimit -f)",
}
# TensorStore reports the errno as text: '... No space left on device [os_error_code='28']'.
_CODE = re.compile(r"os_error_code='(\d+)'")
_PATH = re.compile(r'(?:local file|Failed writing:|Error writing) "(/[^"]+)"')
# Orbax writes a step to `<step>.orbax-checkpoint-tmp...` and renames it when complete.
_STEP = re.compile(r"(\d+)(?:[./]|$)")
# Free bytes under which a disk counts as the full one when an error names no file.
_NEARLY_FULL = 64 << 20


@dataclasses.dataclass(frozen=True)
class Failure:
    """A write that failed because storage ran out."""

    errno: int
    path: str | None  # the file or folder being written, where the error names it


class DiskFullError(OSError):
    """A run stopped because its workdir's disk (quota, file-size limit) ran out."""


def failure(error: BaseException | None) -> Failure | None:
    """The full disk behind `error` (or behind its causes), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        code = error.errno if isinstance(error, OSError) else None
        if code not in _CAUSES:
            match = _CODE.search(text)
            code = int(match.group(1)) if match else next(
                (c for c in _CAUSES if os.strerror(c) in text), None)
        if code in _CAUSES:
            path = getattr(error, "filename", None) if isinstance(error, OSError) else None
            if path is None and (match := _PATH.search(text)):
                path = match.group(1)
            return Failure(code, None if path is None else os.fspath(path))
        error = error.__cause__ or error.__context__
    return None


def in_workdir(found: Failure, workdir: str | os.PathLike) -> bool:
    """Whether `found` is a failure of the workdir's storage (not, say, of /dev/shm
    filling under the input pipeline): its path is in the workdir, or, where the error
    names no path, the workdir's disk is (nearly) full or a limit of the user's ran
    out."""
    workdir = os.path.realpath(os.fspath(workdir))
    if found.path is not None:
        path = os.path.realpath(found.path)
        return path == workdir or path.startswith(workdir.rstrip(os.sep) + os.sep)
    if found.errno != errno.ENOSPC:
        return True
    try:
        stats = os.statvfs(workdir)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL


def complete_steps(checkpoints: epath.Path) -> list[int]:
    """The steps saved completely in a checkpoints folder (an unfinished save is still
    a `<step>.orbax-checkpoint-tmp` folder), oldest first."""
    try:
        return sorted(int(p.name) for p in checkpoints.iterdir()
                      if p.name.isdigit() and p.is_dir())
    except OSError:
        return []


def describe(found: Failure, workdir: str | os.PathLike,
             checkpoints: epath.Path | None = None) -> str:
    """The one-line report of a run stopped by `found`: what failed and where, what
    is intact, and the fix."""
    workdir = os.fspath(workdir)
    what = "writing to the workdir"
    if found.path:
        what = f"writing {found.path}"
        if checkpoints is not None:
            try:
                inside = os.path.relpath(found.path, os.fspath(checkpoints))
            except ValueError:
                inside = os.pardir
            match = _STEP.match(inside)
            if match and not inside.startswith(os.pardir):
                what = f"saving checkpoint step {match.group(1)}"
    steps = complete_steps(checkpoints) if checkpoints is not None else []
    if steps:
        kept = (f"the checkpoints saved before it are intact (newest: step {steps[-1]} in "
                f"{checkpoints})")
        rerun = f"rerun the same command: it resumes from step {steps[-1]}"
    else:
        kept = "no checkpoint had been saved yet"
        rerun = "rerun the same command"
    if found.errno == errno.EFBIG:
        fix = f"raise the limit (ulimit -f unlimited), then {rerun}"
    else:
        fix = (f"free space on that disk (or move the run's --workdir to a disk with room "
               f"and point --workdir there), then {rerun}")
    return f"{what} failed: {_CAUSES[found.errno].format(workdir)}; {kept}. To go on, {fix}"


class _BackgroundTracebacks(logging.Filter):
    """Drops the tracebacks logged for a write that failed on a full disk: Orbax's
    save threads log one per thread (hundreds of lines for one failed save), asyncio
    one per write whose future nobody read. The run reports the cause once; at
    --verbosity=1 (debug) they are shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or failure(exc) is None:
            return True
        return logging.getLogger("absl").isEnabledFor(logging.DEBUG)


for _name in ("absl", "asyncio"):  # Orbax logs through absl
    logging.getLogger(_name).addFilter(_BackgroundTracebacks())

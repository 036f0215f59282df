"""Writing a folder so that readers see the old one or the new one, never half of one.

`replace_folder` writes into a hidden sibling, then renames it into place (moving an
old folder aside first), under an flock on the parent so one writer works at a time.
Whatever a killed writer left behind is cleaned up by the next one: a folder it had
moved aside is put back, half-written siblings are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging


def _clean_up_after_killed_writes(out: pathlib.Path) -> None:
    """Puts back a folder a killed replace had moved aside, and removes the hidden
    folders killed writes left next to `out` (only called with `out`'s lock held, so
    no live writer of `out` owns them)."""
    mine = re.compile(re.escape(f".{out.name}.") + r"(tmp|old)-[a-z0-9_]{8}")
    leftovers = sorted(p for p in out.parent.iterdir() if mine.fullmatch(p.name))
    for path in leftovers:
        if path.name.startswith(f".{out.name}.old-") and (path / "bundle").is_dir() \
                and not out.exists():
            # Killed between moving the old folder aside and moving the new one in.
            logging.warning("restoring %s from %s, left by an interrupted write", out, path)
            (path / "bundle").rename(out)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _lock(out: pathlib.Path) -> Iterator[None]:
    """One writer at a time into `out`'s folder (an flock on the folder: no lock file
    is left behind); a second one waits."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logging.warning("another process is writing into %s; waiting for it", out.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def replace_folder(out: pathlib.Path, write: Callable[[pathlib.Path], Any],
                   check_existing: Callable[[], None]) -> None:
    """Calls ``write(tmp)`` on a fresh sibling folder, then renames it to ``out``.

    Args:
      out: the folder to create or replace.
      write: fills the folder it is given.
      check_existing: called (under the lock) when `out` exists; raises to keep it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        _clean_up_after_killed_writes(out)
        if out.exists():
            check_existing()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # as a plain mkdir would (mkdtemp makes it private)
        try:
            write(tmp)
            if out.exists():
                old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-",
                                                    dir=out.parent))
                out.rename(old / "bundle")
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

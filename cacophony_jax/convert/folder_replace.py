"""Writing a folder so that readers see the old one or the new one, never half of one.

`replace_folder` writes into a hidden sibling, then renames it into place (moving an
old folder aside first), under an flock on the parent so one writer works at a time.
An existing empty folder (a mount point, say, which cannot be renamed) is written
into instead: its entries are filled in a hidden folder inside it and moved up, the
entry readers look for last. Whatever a killed writer left behind is cleaned up by
the next one: a folder it had moved aside is put back, half-written folders are
removed. A failure of the file system (read-only, no space, a path through a file)
raises `FolderWriteError`, which names the folder and the fix, never a hidden one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging


class FolderWriteError(Exception):
    """The file system refused a write; the message names the folder and the fix."""


def _reason(e: OSError, folder: pathlib.Path) -> str:
    """What `e` means for writing into `folder`, and what to do about it."""
    if e.errno == errno.EROFS:
        return f"{folder} is on a read-only file system; choose a folder you can write to"
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"no permission to write into {folder}; choose a folder you can write to "
                "(or change its permissions)")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left for {folder}; free some space or choose another folder"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in (folder, *folder.parents) if p.is_file()), folder)
        return f"{blocker} is a file, not a folder; choose another folder"
    if e.errno == errno.EBUSY:
        return (f"{folder} is in use (a mount point, say) and cannot be moved aside; empty "
                "it (an empty folder is written into) or choose another folder")
    return f"{e.strerror or e} ({folder}); check it or choose another folder"


def _leftover_pattern(out: pathlib.Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{out.name}.") + r"(tmp|old)-[a-z0-9_]{8}")


def _move_entries(source: pathlib.Path, out: pathlib.Path, last: str,
                  moved: list[pathlib.Path] | None = None) -> None:
    """Moves what `source` holds into `out`, `last` after everything else (appending
    each moved entry's new path to `moved`)."""
    for entry in sorted(source.iterdir(), key=lambda p: (p.name == last, p.name)):
        entry.rename(out / entry.name)
        if moved is not None:
            moved.append(out / entry.name)


def _clean_up_after_killed_writes(out: pathlib.Path, last: str) -> None:
    """Puts back a folder a killed replace had moved aside, finishes a killed write
    into an empty folder that had begun moving its entries up, and removes the hidden
    folders killed writes left (only called with `out`'s lock held, so no live writer
    of `out` owns them)."""
    mine = _leftover_pattern(out)
    leftovers = sorted(p for p in out.parent.iterdir() if mine.fullmatch(p.name))
    for path in leftovers:
        if path.name.startswith(f".{out.name}.old-") and (path / "bundle").is_dir() \
                and not out.exists():
            # Killed between moving the old folder aside and moving the new one in.
            logging.warning("restoring %s from %s, left by an interrupted write", out, path)
            (path / "bundle").rename(out)
        shutil.rmtree(path, ignore_errors=True)
    if not out.is_dir() or out.is_symlink():
        return
    inside = sorted(p for p in out.iterdir() if mine.fullmatch(p.name))
    for path in inside:
        others = [p for p in out.iterdir() if p not in inside]
        if others and (path / last).exists():
            # Killed while moving a complete write up into the folder: finish it.
            logging.warning("completing %s from %s, left by an interrupted write", out, path)
            _move_entries(path, out, last)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _lock(out: pathlib.Path) -> Iterator[None]:
    """One writer at a time into `out`'s folder (an flock on the folder: no lock file
    is left behind); a second one waits."""
    try:
        fd = os.open(out.parent, os.O_RDONLY)
    except OSError as e:
        raise FolderWriteError(_reason(e, out.parent)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logging.warning("another process is writing into %s; waiting for it", out.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fresh_folder(out: pathlib.Path, kind: str, where: pathlib.Path) -> pathlib.Path:
    """A new hidden folder ``.{out.name}.{kind}-XXXXXXXX`` in `where`, readable as a
    plain mkdir would make it (mkdtemp makes it private)."""
    try:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=where))
    except OSError as e:
        raise FolderWriteError(_reason(e, where)) from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def check_folder(out: pathlib.Path, check_existing: Callable[[], None],
                 last: str) -> None:
    """Runs `replace_folder`'s check early (to refuse before any costly work).

    Args:
      out: the folder that will be created or replaced.
      check_existing: called (under the lock) when `out` exists; raises to keep it.
      last: as for `replace_folder`.
    """
    if not out.parent.is_dir():
        return
    with _lock(out):
        _clean_up_after_killed_writes(out, last)
        if out.exists() or out.is_symlink():
            check_existing()


def replace_folder(out: pathlib.Path, write: Callable[[pathlib.Path], Any],
                   check_existing: Callable[[], None], last: str) -> None:
    """Calls ``write(tmp)`` on a fresh hidden folder, then puts its content at ``out``.

    Args:
      out: the folder to create or replace (not a link: pass the folder it names).
      write: fills the folder it is given; writes `last` last.
      check_existing: called (under the lock) when `out` exists; raises to keep it.
      last: the entry whose presence tells readers the folder is complete.

    Raises:
      FolderWriteError: the file system refused (names the folder and the fix).
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FolderWriteError(_reason(e, out.parent)) from None
    with _lock(out):
        _clean_up_after_killed_writes(out, last)
        if out.exists() or out.is_symlink():
            check_existing()
        if out.is_dir() and not any(out.iterdir()):
            _write_into_empty(out, write, last)
        else:
            _write_beside(out, write)


def _write_into_empty(out: pathlib.Path, write: Callable[[pathlib.Path], Any],
                      last: str) -> None:
    tmp = _fresh_folder(out, "tmp", out)
    moved: list[pathlib.Path] = []
    try:
        write(tmp)
        _move_entries(tmp, out, last, moved)
    except BaseException as e:
        for entry in (tmp, *moved):  # nothing else is touched
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FolderWriteError(_reason(e, out)) from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _write_beside(out: pathlib.Path, write: Callable[[pathlib.Path], Any]) -> None:
    tmp = _fresh_folder(out, "tmp", out.parent)
    try:
        write(tmp)
        if out.exists():
            old = _fresh_folder(out, "old", out.parent)
            try:
                out.rename(old / "bundle")
            except OSError as e:
                old.rmdir()
                raise FolderWriteError(_reason(e, out)) from None
            try:
                tmp.rename(out)
            except BaseException:
                (old / "bundle").rename(out)  # put the old folder back
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FolderWriteError(_reason(e, out.parent)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Files replaced atomically: written to a hidden sibling, then renamed into place.

A reader (or a rerun after a crash) sees the old file or the new one, never half of
one. Used for results, summaries and embedding indexes; bundles, which are folders,
have their own rule in `convert.bundle`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary sibling of `path`; on leaving without an error it replaces `path`.

    Args:
      path: the file to (re)write; its folder must exist.
      mode: "w" (UTF-8 text) or "wb".

    Yields:
      The open temporary file (removed again if the block raises).
    """
    path = os.fspath(path)
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    try:
        with open(temporary, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if isinstance(error, OSError) and error.errno and not error.filename:
            # A failed write or flush names no file (a full disk, say): name `path`.
            # (OSError(errno, ...) is the errno's own subclass, as the error was.)
            raise OSError(error.errno, error.strerror or str(error), path) from error
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replaces `path` with `text` (UTF-8) atomically.

    Args:
      path: the file; its folder must exist.
      text: the new contents.
    """
    with replacing(path) as f:
        f.write(text)


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Refuses, before any work, a file path that cannot be written.

    Args:
      path: the file to be written later (its missing folders will be created).
      what: how the user named it, e.g. "--out".

    Raises:
      ValueError: `path` is a folder, or its nearest existing folder is a file or is
        not writable; the message names the path and the fix.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder; name a file inside it")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: no write permission in {parent}; "
                         f"choose another place")

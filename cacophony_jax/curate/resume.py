"""Resumable manifest outputs of the curate tools.

`clean` and `caption` append one JSONL row per clip and flush it at once, so a crash
loses at most the row being written. A rerun calls `prepare_output`: it drops a
cut-off last line and returns the ids already written, which are then skipped.
"""

from __future__ import annotations

import json
import os
import re

from absl import logging

_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(row: dict) -> str:
    """One JSONL row, text kept readable (not \\u-escaped) except lone surrogates: a
    file name that is not UTF-8 reaches Python as those, and is written as JSON escapes
    that read back as the same name (UTF-8 cannot hold them)."""
    text = json.dumps(row, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


class OutputError(ValueError):
    """An existing output that is not a manifest this tool can continue."""


def prepare_output(path: str, overwrite: bool) -> set[str]:
    """Starts an output afresh, or readies an existing one to be continued.

    Args:
      path: the output JSONL (its folder is created).
      overwrite: start afresh even if it exists.

    Returns:
      The ids of the rows already in the output (empty when starting afresh).

    Raises:
      OutputError: a line of the existing output is not a manifest row with an "id".
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if overwrite or not os.path.exists(path):
        open(path, "w").close()
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            logging.warning("%s: dropping a partial last line left by an interrupted run", path)
            f.truncate(keep)
    done = set()
    # Only "\n" ends a row: str.splitlines would also split inside captions holding
    # U+2028, U+0085 and the like, which the writers leave unescaped.
    for number, line in enumerate(data[:keep].decode("utf-8", "replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            raise OutputError(f"output {path} line {number} is not a manifest row; it was not "
                              f"written by this tool or is damaged: pass --overwrite (or "
                              f"overwrite=True) to start again, or choose another output"
                              ) from None
    return done

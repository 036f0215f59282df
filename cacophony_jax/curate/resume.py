"""Resumable manifest outputs of the curate tools.

`clean` and `caption` append one JSONL row per clip and flush it at once, so a crash
loses at most the row being written. A rerun calls `prepare_output`: it drops a
cut-off last line and returns the ids already written, which are then skipped.

Overwriting never destroys the old output before the new one is complete: the new
rows go to ``OUTPUT.partial`` (continued, like an output, by a rerun that overwrites
again) and `finish_output` moves it over OUTPUT at the end.
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


def partial_path(path: str) -> str:
    """Where an overwriting run writes its rows until they are complete."""
    return path + ".partial"


def prepare_output(path: str, overwrite: bool) -> tuple[str, set[str]]:
    """Readies the file a run appends its rows to, continuing what is there.

    Args:
      path: the output JSONL (its folder is created).
      overwrite: write a new output that replaces `path` once complete (see
        `finish_output`); until then the rows go to `partial_path(path)`, and `path`
        stays as it was.

    Returns:
      The file to append the rows to, and the ids of the rows already in it.

    Raises:
      OutputError: a line of the file is not a manifest row with an "id", or an
        unfinished overwriting run left rows that a run without `overwrite` would
        leave behind.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = partial_path(path)
    if not overwrite and os.path.exists(partial):
        raise OutputError(f"{partial} holds the new rows of an unfinished --overwrite run; "
                          f"pass --overwrite (or overwrite=True) again to finish it, or "
                          f"delete {partial} to continue {path} as it is")
    target = partial if overwrite else path
    if not os.path.exists(target):
        open(target, "w").close()
        return target, set()
    if overwrite:
        logging.warning("continuing the unfinished --overwrite run in %s (its rows are kept; "
                        "delete it to start the new output from scratch)", target)
    fix = (f"delete {target} to start the new output again" if overwrite else
           "pass --overwrite (or overwrite=True) to write a new one, or choose another output")
    with open(target, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            logging.warning("%s: dropping a partial last line left by an interrupted run",
                            target)
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
            raise OutputError(f"output {target} line {number} is not a manifest row; it was "
                              f"not written by this tool or is damaged: {fix}") from None
    return target, done


def finish_output(path: str, written: str) -> None:
    """Ends a complete run: the rows `prepare_output` had written to `written` become
    the output `path` (in one step, replacing the old output, when they differ).

    Args:
      path: the output JSONL.
      written: the file `prepare_output` returned for it.
    """
    if written != path:
        os.replace(written, path)

"""Resumable manifest outputs of the curate tools.

`clean` and `caption` append one JSONL row per clip and flush it at once, so a crash
loses at most the row being written. A rerun calls `prepare_output`: it checks that
every line is a row of the tool (anything else is refused, never changed), drops a
last row cut off by an interruption and returns the ids already written, which are
then skipped.

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
_CUT_ROW = re.compile(r'\s*\{\s*"id"\s*:')  # how every row of these tools begins


def json_line(row: dict) -> str:
    """One JSONL row, text kept readable (not \\u-escaped) except lone surrogates: a
    file name that is not UTF-8 reaches Python as those, and is written as JSON escapes
    that read back as the same name (UTF-8 cannot hold them)."""
    text = json.dumps(row, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


class OutputError(ValueError):
    """An existing output that is not a manifest this tool can continue."""


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file, through links too (a path that does not exist
    names the file its links resolve to)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def partial_path(path: str) -> str:
    """Where an overwriting run writes its rows until they are complete."""
    return path + ".partial"


def _row_id(line: str, keys: tuple[str, ...]) -> str | None:
    """The id of a manifest row this tool writes, or None when `line` is not one."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("id"), str) or any(
            key not in row for key in keys):
        return None
    return row["id"]


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def prepare_output(path: str, overwrite: bool,
                   keys: tuple[str, ...] = ()) -> tuple[str, set[str]]:
    """Readies the file a run appends its rows to, continuing what is there.

    Nothing is removed before the whole file is checked: every line must be a row of
    this tool (a JSON object with a string "id" and `keys`), except a last line that
    an interrupted run cut off (no final newline, not valid JSON, and begun like a row
    of this tool, ``{"id": ``), which is dropped. A complete last row without its
    newline is kept (the newline is added).

    Args:
      path: the output JSONL (its folder is created).
      overwrite: write a new output that replaces `path` once complete (see
        `finish_output`); until then the rows go to `partial_path(path)`, and `path`
        stays as it was.
      keys: what every row of this tool has besides "id" (tells its outputs from
        other JSONL files).

    Returns:
      The file to append the rows to, and the ids of the rows already in it.

    Raises:
      OutputError: the file is not empty and a line of it is not a row of this tool
        (another file, or a damaged one: nothing of it is changed), or an unfinished
        overwriting run left rows that a run without `overwrite` would leave behind.
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
    if os.path.isdir(target):
        raise OutputError(f"output {target} is a folder; name a .jsonl file")
    if overwrite:
        logging.warning("continuing the unfinished --overwrite run in %s (its rows are kept; "
                        "delete it to start the new output from scratch)", target)
    fix = (f"delete {target} to start the new output again" if overwrite else
           "pass --overwrite (or overwrite=True) to write a new one, or choose another output")
    with open(target, "rb") as f:
        data = f.read()
    # Only "\n" ends a row: str.splitlines would also split inside captions holding
    # U+2028, U+0085 and the like, which the writers leave unescaped.
    # A byte-order mark (an editor's) is not part of the first row.
    lines = data.decode("utf-8-sig", "replace").split("\n")
    cut = lines.pop()  # "" when the file ends with a newline
    done = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        clip_id = _row_id(line, keys)
        if clip_id is None:
            raise OutputError(f"output {target} line {number} is not a row of this tool "
                              f"(a JSON object with {', '.join(repr(k) for k in ('id', *keys))}"
                              f"); it was not written by it or is damaged, and is left "
                              f"as it is: {fix}")
        done.add(clip_id)
    ending = b""
    if cut.strip():
        clip_id = _row_id(cut, keys)
        if clip_id is not None:  # complete, only its newline is missing
            done.add(clip_id)
            ending = b"\n"
        elif not _parses(cut) and (_CUT_ROW.match(cut) or '{"id": '.startswith(cut.strip())
                                   or not cut.strip("\x00")):  # NULs: a crash's padding
            logging.warning("%s: dropping a partial last line left by an interrupted run",
                            target)
            with open(target, "rb+") as f:
                f.truncate(data.rfind(b"\n") + 1)
        else:
            raise OutputError(f"output {target} line {len(lines) + 1} is not a row of this "
                              f"tool nor one cut off by an interrupted run; it was not "
                              f"written by it or is damaged, and is left as it is: {fix}")
    if ending:
        with open(target, "ab") as f:
            f.write(ending)
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

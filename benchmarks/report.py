"""Output shared by the benchmark scripts: a printed row, an optional JSONL record."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any


def emit(row: dict[str, Any], line: str, json_path: str | None) -> None:
    """Prints `line` and appends `row` to `json_path` (if given) as one JSON line."""
    print(line, flush=True)
    append(row, json_path)


def append(row: dict[str, Any], json_path: str | None) -> None:
    """Appends `row` to `json_path` (if given) as one JSON line."""
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def run(main: Callable[[], Any]) -> None:
    """Runs a benchmark's main; a bad flag or input ends in one line, no traceback, and
    output piped into a reader that stops early (`| head`) ends it quietly."""
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
    except BrokenPipeError:
        # Python would report the pipe again while flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)

"""The summary of a `curate build`: per-input counts as a Markdown table, and the
dataset folder's summary.json and summary.md (one section per split)."""

from __future__ import annotations

import json
import os
from typing import Any

from cacophony_jax import atomic_write

_COLUMNS = (("clips", "clips"), ("hours", "hours"), ("captions", "captions"),
            ("synthetic_captions", "synthetic"), ("duplicate", "duplicate"),
            ("overlap", "overlap"), ("too_short", "too short"), ("too_long", "too long"),
            ("unreadable", "unreadable"), ("bad_rows", "bad rows"), ("missing", "missing"))


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (one row per input and a total).

    Args:
      summary: what `build.run_build` returns.

    Returns:
      Markdown text.
    """
    head = "| source | " + " | ".join(title for _, title in _COLUMNS) + " |"
    lines = [f"### split `{summary['split']}`", "", head,
             "|" + "---|" * (len(_COLUMNS) + 1)]
    rows = [*summary["sources"].items(), ("**total**", summary["total"])]
    for name, c in rows:
        cells = [f"{c.get(key, 0):.2f}" if key == "hours" else str(int(c.get(key, 0)))
                 for key, _ in _COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str, summary: dict[str, Any], into: str | None = None) -> None:
    """Writes `summary` into out_dir/summary.json and summary.md, next to the other
    splits' (one summary per folder, one section per split: building "val" keeps
    "train"'s); with `into`, the two files go to that folder instead (to be moved into
    out_dir with the split they describe)."""
    path = os.path.join(out_dir, "summary.json")
    every: dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                every = json.load(f)
        except (OSError, ValueError):
            every = {}
    every[summary["split"]] = summary
    into = out_dir if into is None else into
    atomic_write.write_text(os.path.join(into, "summary.json"), json.dumps(every, indent=1))
    atomic_write.write_text(os.path.join(into, "summary.md"), "# Dataset build summary\n\n"
                            + "\n".join(summary_markdown(s) for s in every.values()))

"""The progress line of long-running commands (embed, caption, eval, curate).

Work that takes a while reports through a `Progress` callable,
``progress(label, done, total)``; `ProgressLine` is the one drawn on stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

Progress = Callable[[str, int, int], None]


class ProgressLine:
    """A throttled progress line on stderr: redrawn in place on a terminal, else a
    plain line every few seconds."""

    def __init__(self, enabled: bool = True, stream: Any = None, unit: str = ""):
        """Args: enabled: draw at all; stream: where to (default stderr); unit: what is
        counted, e.g. "rows" (shown after the counts and in the rate)."""
        self.enabled, self.stream, self.unit = enabled, stream or sys.stderr, unit
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label, self.start, self.last, self.seen = "", 0.0, 0.0, time.monotonic()

    def __call__(self, label: str, done: int, total: int, detail: str = "",
                 final: bool | None = None) -> None:
        """Reports `done` of `total` items of the step called `label`.

        Args:
          label: the step; a new label starts a new rate.
          done: items finished.
          total: items in all.
          detail: more counts shown after the percentage, e.g. "written 3, skipped 1".
          final: whether this is the step's last report, drawn whatever the time and
            ending the line; None: when `done` reaches `total`.
        """
        if not self.enabled:
            return
        now = time.monotonic()
        if label != self.label:  # a new step: its rate counts from the previous report
            self.label, self.start, self.last = label, self.seen, 0.0
        self.seen = now
        final = done >= total if final is None else final
        if not final and now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        unit = f" {self.unit}" if self.unit else ""
        text = f"{label}: {done}/{total}{unit} ({100 * done / max(total, 1):.0f}%)"
        if detail:
            text += f", {detail}"
        if now - self.start > 0.5:
            text += f", {done / (now - self.start):.1f}{unit}/s"
        self.stream.write(("\r" + text.ljust(72) if self.tty else text + "\n")
                          + ("\n" if final and self.tty else ""))
        self.stream.flush()

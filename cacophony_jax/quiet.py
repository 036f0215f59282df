"""Process-wide filters for library noise that a user cannot act on.

Standard library only, so the command line can install them without starting JAX.
"""

from __future__ import annotations

import sys
import warnings


def quiet_abandoned_reads() -> None:
    """Drops the uncatchable tracebacks an abandoned restore leaves (process-wide).

    When Orbax gives up on an unreadable checkpoint (reported once, as an error), the
    restore's other reads still end, each in a traceback printed by
    `sys.unraisablehook`: a read that failed too (with a 60-line TensorStore spec), or
    one whose completion finds Orbax's event loop closed. Thousands for a large model;
    only those two kinds are dropped.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_drops_abandoned_reads", False):
        return

    def hook(unraisable) -> None:
        text = str(unraisable.exc_value)
        if text == "Event loop is closed" or text.startswith(
                "Encountered error while reading array index"):
            return
        previous(unraisable)

    hook._drops_abandoned_reads = True
    sys.unraisablehook = hook


def quiet_abandoned_saves() -> None:
    """Drops the warnings an abandoned save leaves at exit (process-wide).

    When a checkpoint save fails part-way (a full disk, reported once, as an error),
    Orbax never runs the coroutines of its items not yet written; each is reported as
    "coroutine '...CheckpointHandler.async_save' was never awaited" when collected.
    """
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r"coroutine '\w+\.async_save' was never awaited")

"""Process-wide filters for library noise that a user cannot act on.

Standard library only, so the command line can install them without starting JAX.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

# How a read of an abandoned restore ends: Orbax's error for one array (whose text goes
# on with a 60-line TensorStore spec), TensorStore's own error for one chunk
# ('OUT_OF_RANGE: Error reading "params.x/0.0" in OCDBT database ...'), or a completion
# that finds Orbax's event loop closed.
_ABANDONED_READ = re.compile(
    r"Encountered error while reading array index|[A-Z_]+: Error reading |Event loop is closed$")


def _is_abandoned_read(error: BaseException | None) -> bool:
    return error is not None and _ABANDONED_READ.match(str(error)) is not None


class _DropAbandonedReads(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" records of failed reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        unretrieved = str(record.msg).split("\n", 1)[0].endswith(
            "exception was never retrieved")
        return not (unretrieved and _is_abandoned_read(error))


def quiet_abandoned_reads() -> None:
    """Drops the uncatchable tracebacks an abandoned restore leaves (process-wide).

    When Orbax gives up on an unreadable checkpoint (reported once, as an error), the
    restore's other reads still end, each in a traceback: a read that failed too (with
    a 60-line TensorStore spec), or one whose completion finds Orbax's event loop
    closed. They come through `sys.unraisablehook`, as records of the `asyncio` logger
    ("Task exception was never retrieved", when the garbage collector finds a failed
    read nobody awaited) or as a "coroutine ... was never awaited" warning for a read
    never started. Thousands for a large model; only those kinds are dropped.
    """
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedReads) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropAbandonedReads())
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message="coroutine '_read_array_index_and_device_put' was never "
                                    "awaited")
    previous = sys.unraisablehook
    if getattr(previous, "_drops_abandoned_reads", False):
        return

    def hook(unraisable) -> None:
        if _is_abandoned_read(unraisable.exc_value):
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

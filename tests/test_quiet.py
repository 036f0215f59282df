"""The filters for the noise an abandoned checkpoint restore leaves behind."""

import asyncio
import gc
import logging
import sys
import warnings

from cacophony_jax import quiet

SPEC = "Encountered error while reading array index: (slice(0, 64, 1),). See full TensorStore"
CHUNK = ('OUT_OF_RANGE: Error reading "params.x/0.0" in OCDBT database at local file '
         '"/c/10/state/": Requested byte range [0, 15134) is not valid for value of size 50')


async def _read_array_index_and_device_put():  # named as Orbax's reads
    pass


async def _other_read():
    pass


def _unretrieved_failures(errors):
    """Ends a task and a future with each error, retrieves neither, and collects them:
    asyncio reports each to its logger as "... exception was never retrieved"."""
    loop = asyncio.new_event_loop()
    try:
        for error in errors:
            async def fail(error=error):
                raise error

            task = loop.create_task(fail())
            loop.run_until_complete(asyncio.wait([task]))
            future = loop.create_future()
            future.set_exception(error)
            del task, future
            gc.collect()
    finally:
        loop.close()


def test_unretrieved_failed_reads_are_not_logged(monkeypatch, caplog):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
    caplog.set_level(logging.ERROR, logger="asyncio")
    _unretrieved_failures([Exception(SPEC), ValueError(CHUNK)])
    assert caplog.text.count("exception was never retrieved") == 4  # shown until quieted
    caplog.clear()
    with warnings.catch_warnings():
        quiet.quiet_abandoned_reads()
        quiet.quiet_abandoned_reads()  # installed once
    assert len(logging.getLogger("asyncio").filters) == 1
    _unretrieved_failures([Exception(SPEC), ValueError(CHUNK),
                           RuntimeError("Event loop is closed"), ValueError("other")])
    # Another failure is still reported, and so is any other asyncio error.
    assert caplog.text.count("exception was never retrieved") == 2
    assert "ValueError: other" in caplog.text and SPEC not in caplog.text
    logging.getLogger("asyncio").error("Exception in callback", exc_info=Exception(SPEC))
    assert "Exception in callback" in caplog.text
    # A read Orbax never started, collected unawaited: no warning either.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.quiet_abandoned_reads()
        for coroutine in (_read_array_index_and_device_put(), _other_read()):
            del coroutine
            gc.collect()
    assert [str(w.message) for w in seen] == ["coroutine '_other_read' was never awaited"]

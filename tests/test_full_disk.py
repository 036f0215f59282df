"""A full disk: recognised in every writer's error, a save that fails keeps the saved
steps, metrics reach the disk at checkpoints, and a run stopped by it resumes."""

import errno
import gc
import json
import logging
import os
import warnings

import jax
import numpy as np
import pytest
from etils import epath

from cacophony_jax.train import checkpoint, disk, loop, metrics
from tests.helpers import assert_trees_equal, read_metrics, restore_params, tiny_config

# What TensorStore raised when a tmpfs filled during a save (Orbax's array writes).
_TENSORSTORE_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "opt_state.0.1.0.mu.decoder.block_0.attn.value.'
    'kernel/0.0.0" in OCDBT database at local file "{ckpts}/4.orbax-checkpoint-tmp/state.'
    'orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "{ckpts}/4.orbax-checkpoint-'
    'tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/d617": Failed to write 198873 bytes '
    "to file 9: No space left on device [os_error_code='28']")


def test_a_full_disk_is_recognised_in_every_writers_error(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "2").mkdir(parents=True)
    (ckpts / "4.orbax-checkpoint-tmp").mkdir()  # the save the disk cut short
    found = disk.failure(ValueError(_TENSORSTORE_FULL.format(ckpts=ckpts)))
    assert found == disk.Failure(errno.ENOSPC, f"{ckpts}/4.orbax-checkpoint-tmp/state.orbax"
                                               "-checkpoint-tmp/ocdbt.process_0/")
    message = disk.describe(found, tmp_path, ckpts)
    assert message == (
        f"saving checkpoint step 4 failed: the disk that holds the workdir {tmp_path} is "
        f"full; the checkpoints saved before it are intact (newest: step 2 in {ckpts}). To "
        "go on, free space on that disk (or move the run's --workdir to a disk with room "
        "and point --workdir there), then rerun the same command: it resumes from step 2")
    # A plain write, behind another error; the file-size limit (ulimit -f) and quotas.
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m.jsonl"))
        except OSError as e:
            raise RuntimeError("while logging") from e
    except RuntimeError as e:
        wrapped = e
    assert disk.failure(wrapped) == disk.Failure(errno.ENOSPC, str(tmp_path / "m.jsonl"))
    big = disk.failure(ValueError("OUT_OF_RANGE: ... File too large [os_error_code='27']"))
    assert "raise the limit (ulimit -f unlimited)" in disk.describe(big, tmp_path, ckpts)
    assert disk.failure(OSError(errno.EDQUOT, "Disk quota exceeded")).errno == errno.EDQUOT
    assert disk.failure(ValueError("config.data.path is missing")) is None
    assert disk.failure(OSError(errno.ENOENT, "No such file or directory")) is None
    # Full, but not the workdir's disk (shared memory under the input pipeline, say).
    assert not disk.in_workdir(disk.Failure(errno.ENOSPC, "/dev/shm/grain-1"), tmp_path)
    assert disk.in_workdir(found, tmp_path)
    # An error that names no file (a failed write) is the workdir's if its disk is full.
    unnamed = disk.Failure(errno.ENOSPC, None)
    assert not disk.in_workdir(unnamed, tmp_path)  # this disk has room
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096,) * 2 + (0,) * 8))
    assert disk.in_workdir(unnamed, tmp_path)


def _fill_the_disk(monkeypatch, full):
    """From now on every file Orbax writes for which `full(path)` fails with ENOSPC
    (raised in its save threads, as a full disk does)."""
    cls = type(epath.Path(os.sep))
    real = {name: getattr(cls, name) for name in ("write_text", "write_bytes")}

    def failing(name):
        def write(self, *args, **kwargs):
            if full(str(self)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real[name](self, *args, **kwargs)
        return write

    for name in real:
        monkeypatch.setattr(cls, name, failing(name))


def test_a_save_on_a_full_disk_fails_once_and_keeps_the_saved_steps(tmp_path, caplog,
                                                                     monkeypatch):
    state = {"w": np.arange(8.0, dtype=np.float32)}
    ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
    ckpt.save(1, state, None, {"task": "mae"})
    ckpt.wait()
    # (Its metadata, written last: none of its array writes is still running after it.)
    _fill_the_disk(monkeypatch, lambda path: path.endswith(".orbax-checkpoint-tmp/"
                                                          "_CHECKPOINT_METADATA"))
    ckpt.save(2, state, None, {"task": "mae"})
    with pytest.raises(OSError) as raised:
        ckpt.close()  # waits for the save, and releases Orbax's threads all the same
    assert disk.failure(raised.value).errno == errno.ENOSPC
    # Reported once, by the caller: none of Orbax's save threads logs its traceback.
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    monkeypatch.undo()
    # Step 1 was not deleted to keep 1 step (step 2 never completed), and reads back.
    reopened = checkpoint.Checkpointer(tmp_path, keep=1)
    assert reopened.steps() == [1]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, step = reopened.restore(abstract)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], state["w"])
    # The unfinished save is deleted before the next one.
    reopened.save(3, state, None, {"task": "mae"})
    reopened.close()
    assert sorted(os.listdir(tmp_path)) == ["3"]


def test_metrics_reach_the_disk_at_checkpoints_and_once_a_minute(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    writer = metrics.MetricWriter(str(tmp_path), enabled=True)
    for step in range(1, 4):  # rows in quick succession: not fsynced one by one
        writer.write(step, {"loss": 1.0})
    assert not synced
    clock[0] += metrics.SYNC_SECONDS + 1
    writer.write(4, {"loss": 1.0})
    assert len(synced) == 2  # metrics.jsonl and the events file
    writer.sync()  # as the loop does at each checkpoint
    assert len(synced) == 4
    writer.close()
    assert [json.loads(line)["step"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_metric_write_on_a_full_disk_names_the_file(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), enabled=True)
    writer.write(1, {"loss": 1.0})
    real = writer._jsonl

    class Full:
        name = real.name

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer._jsonl = Full()
    with pytest.raises(OSError) as raised:
        writer.write(2, {"loss": 0.5})
    assert raised.value.filename == str(tmp_path / "metrics.jsonl")
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        writer.close()  # closes the events file too, raising the first error
    assert real.closed and writer._tb is None


@pytest.mark.slow
def test_a_run_on_a_full_disk_stops_with_one_error_and_resumes_on_the_rerun(
        tmp_path, caplog, monkeypatch):
    config = tiny_config("mae", 6, **{"train.checkpoint_every": 2, "data.eval.kind": ""})
    # The disk fills once step 2 is saved: the step-4 save fails in Orbax's threads.
    _fill_the_disk(monkeypatch, lambda path: "/4.orbax-checkpoint-tmp" in path)
    with pytest.raises(disk.DiskFullError) as raised:
        loop.run(config, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert str(raised.value).startswith(
        f"saving checkpoint step 4 failed: the disk that holds the workdir {tmp_path} is "
        f"full; the checkpoints saved before it are intact (newest: step 2 in {ckpts})")
    assert "rerun the same command: it resumes from step 2" in str(raised.value)
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert sorted(os.listdir(ckpts)) == ["2", "4.orbax-checkpoint-tmp"]
    saved = restore_params(config, tmp_path)
    monkeypatch.undo()
    del raised  # and with it the coroutines of the items the failed save never wrote
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        gc.collect()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        loop.run(config, str(tmp_path))  # with space again
    assert f"resuming from {ckpts} step 2" in caplog.text
    assert sorted(os.listdir(ckpts)) == ["2", "4", "6"]  # the unfinished save is gone
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows after step 2 were logged once, by the rerun
    assert_trees_equal(saved, restore_params(tiny_config("mae", 2), ckpts / "2"))

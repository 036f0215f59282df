"""Metric output: console progress, JSONL and TensorBoard event files.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from typing import Any

import jax
import numpy as np

from cacophony_jax import atomic_write


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line (-inf for a line that is not a row: kept)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -math.inf


def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s' or '42s'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class _EventFile:
    """A TensorBoard events file, written in the calling thread.

    tensorboardX's SummaryWriter writes from a thread of its own and closes the file at
    exit: a write that fails (a full disk) printed tracebacks from both and reached the
    training loop late, if at all. Here it fails in the call that wrote, naming the file.
    The records are the ones SummaryWriter writes (file version, the purge marker of a
    resumed run, one scalar summary per value).
    """

    def __init__(self, directory: str, purge_step: int | None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import RecordWriter

        self._event = Event
        os.makedirs(directory, exist_ok=True)
        # tensorboardX's name for it (one per process: two in the same second share it).
        self.path = os.path.join(directory, f"events.out.tfevents.{str(time.time())[:10]}."
                                            f"{socket.gethostname()}")
        self._records = RecordWriter(self.path)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:  # hides the events of an earlier process from there on
            self._write(Event(wall_time=time.time(), step=purge_step,
                              file_version="brain.Event:2"))
            self._write(Event(wall_time=time.time(), step=purge_step,
                              session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        from tensorboardX.summary import scalar

        now = time.time()
        for key, value in values.items():
            # TensorBoard tag names allow no '@' ("t2a_R@10" -> "t2a_R10").
            self._write(self._event(wall_time=now, step=step,
                                    summary=scalar(key.replace("@", ""), value)))
        self._records._writer.flush()  # to the OS; `sync` also to the disk (RecordWriter's
        # own flush fsyncs every time, which a bucket mount pays with a whole upload)

    def sync(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


# The longest time rows stay unsynced to the disk (see `MetricWriter.sync`).
SYNC_SECONDS = 60.0


class MetricWriter:
    """Writes scalar metrics to `workdir/metrics.jsonl` and TensorBoard events.

    A write that fails raises OSError naming the file (a full disk, say).
    """

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb: _EventFile | None = None
        self._synced = time.monotonic()
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._workdir = workdir
        self._jsonl = open(  # noqa: SIM115 - held open for the whole run
            os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        # The events file is opened at the first write, with the purge step resume_at
        # found.
        self._purge_step: int | None = None

    def _tensorboard(self) -> _EventFile:
        if self._tb is None:
            directory = os.path.join(self._workdir, "tensorboard")
            with _naming(directory):
                self._tb = _EventFile(directory, self._purge_step)
        return self._tb

    def resume_at(self, step: int) -> None:
        """Drops the rows logged after `step` by an earlier, interrupted process.

        A run resumed from its step-`step` checkpoint computes those steps again, so
        their old rows would appear twice; TensorBoard's are purged the same way.
        """
        if not self.enabled:
            return
        path = self._jsonl.name
        self._jsonl.close()
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if _row_step(line) <= step]
        if kept and not kept[-1].endswith("\n"):  # a row cut short by a killed process
            kept.pop()
        if len(kept) < len(lines):
            with atomic_write.replacing(path) as f:
                f.writelines(kept)
            logging.info("metrics.jsonl: dropped %d row(s) after step %d, logged before the "
                         "restart (those steps run again)", len(lines) - len(kept), step)
            self._purge_step = step + 1  # hides the old events from that step on
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def logged_values(self, step: int) -> dict[str, Any]:
        """The values metrics.jsonl holds at `step` (rows merged; empty where this
        process writes no metrics)."""
        if not self.enabled:
            return {}
        self._jsonl.flush()
        values: dict[str, Any] = {}
        with open(self._jsonl.name, encoding="utf-8") as f:
            for line in f:
                if _row_step(line) == step:
                    with contextlib.suppress(ValueError):
                        values.update(json.loads(line))
        values.pop("step", None)
        return values

    def logged(self, step: int, keys: Any = None, prefix: str = "") -> bool:
        """Whether metrics.jsonl holds a row at `step` with all of `keys`, or with a key
        starting with `prefix` (True where this process writes no metrics)."""
        if not self.enabled:
            return True
        self._jsonl.flush()
        keys = set(keys or ())
        with open(self._jsonl.name, encoding="utf-8") as f:
            for line in f:
                if _row_step(line) == step:
                    try:
                        row = set(json.loads(line))
                    except ValueError:
                        continue
                    if keys <= row and (not prefix or any(k.startswith(prefix) for k in row)):
                        return True
        return False

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Records `metrics` (scalars) at `step`."""
        if not self.enabled:
            return
        row = {k: _scalar(v) for k, v in metrics.items()}
        with _naming(self._jsonl.name):
            self._jsonl.write(json.dumps({"step": int(step), **row}) + "\n")
            self._jsonl.flush()
        tb = self._tensorboard()
        with _naming(tb.path):
            tb.add_scalars(int(step), row)
        if time.monotonic() - self._synced > SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """Writes the rows through to the disk (fsync). A bucket mounted with Cloud
        Storage FUSE uploads a file then (or when it is closed): a preempted host loses
        the rows written since. Done at every checkpoint and every SYNC_SECONDS; each
        upload sends the whole file, so not at every row."""
        if not self.enabled:
            return
        self._synced = time.monotonic()
        with _naming(self._jsonl.name):
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        if self._tb is not None:
            with _naming(self._tb.path):
                self._tb.sync()

    def close(self) -> None:
        """Flushes and closes the files (every one, even when one of them fails)."""
        error = None
        for file in (self._jsonl, self._tb):
            if file is None:
                continue
            try:
                with _naming(getattr(file, "path", None) or file.name):
                    file.close()
            except OSError as e:
                error = error or e
        self._jsonl = self._tb = None
        if error is not None:
            raise error


@contextlib.contextmanager
def _naming(path: str):
    """Adds `path` to an OSError raised without a file name (a failed write or flush)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, path) from error


class Progress:
    """Throughput, input-wait share, model TFLOP/s, MFU and ETA between log steps.

    The first window of a run (or of a resumed run) is its first step alone, which
    includes compiling the step: it reports `perf/first_step_seconds` and no rates.

    Args:
      total_steps, start_step: the run's length and where it starts.
      global_batch_size: examples per step.
      step_flops_per_device: model FLOPs of one step on one device (None: not
        counted, so no TFLOP/s or MFU).
      peak_flops_per_device: the device's peak FLOP/s (None: no MFU).
    """

    def __init__(self, total_steps: int, start_step: int, global_batch_size: int,
                 step_flops_per_device: float | None = None,
                 peak_flops_per_device: float | None = None):
        self.total = total_steps
        self.batch = global_batch_size
        self.flops = step_flops_per_device
        self.peak = peak_flops_per_device if step_flops_per_device else None
        self._t0 = time.perf_counter()
        self._last_time = self._t0
        self._last_step = start_step
        self._wait = self._pause = 0.0
        self._first = True

    def add_wait(self, seconds: float) -> None:
        """Accounts time the loop spent waiting for the input pipeline."""
        self._wait += seconds

    def add_pause(self, seconds: float) -> None:
        """Accounts time spent outside training (evaluation, checkpoint saves): the
        rates of the window that holds it leave it out."""
        self._pause += seconds

    def rates(self, step: int) -> dict[str, float]:
        """Rates since the previous call; resets the window."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time - self._pause, 1e-9)
        steps = step - self._last_step
        if self._first:
            # Compiling dominates the first step: a rate or an ETA from it misleads.
            self._first = False
            self._last_time, self._last_step, self._wait, self._pause = now, step, 0.0, 0.0
            return {"perf/first_step_seconds": elapsed}
        out = {
            "perf/steps_per_sec": steps / elapsed,
            "perf/examples_per_sec": steps * self.batch / elapsed,
            "perf/input_wait_fraction": min(1.0, self._wait / elapsed),
        }
        if self.flops:
            achieved = steps * self.flops / elapsed
            out["perf/model_tflops_per_device"] = achieved / 1e12
            if self.peak:
                out["perf/mfu"] = achieved / self.peak
        self._last_time, self._last_step, self._wait, self._pause = now, step, 0.0, 0.0
        return out

    def line(self, step: int, metrics: dict[str, float], rates: dict[str, float]) -> str:
        """One console line: step, loss parts, examples/s, input wait and ETA."""
        parts = [f"step {step}/{self.total}", f"loss {metrics['loss']:.4f}"]
        for key in sorted(metrics):
            if key.startswith("loss/"):
                parts.append(f"{key[5:]} {metrics[key]:.4f}")
        if "perf/first_step_seconds" in rates:
            parts += [f"first step {rates['perf/first_step_seconds']:.1f} s (compiling it)",
                      f"lr {metrics.get('learning_rate', 0.0):.2e}"]
            return " | ".join(parts)
        sps = rates["perf/steps_per_sec"]
        eta = (self.total - step) / sps if sps > 0 else float("inf")
        parts += [f"{rates['perf/examples_per_sec']:.1f} ex/s",
                  f"input {100 * rates['perf/input_wait_fraction']:.0f}%"]
        if "perf/mfu" in rates:
            parts.append(f"MFU {100 * rates['perf/mfu']:.1f}%")
        elif "perf/model_tflops_per_device" in rates:
            parts.append(f"{rates['perf/model_tflops_per_device']:.3g} TFLOP/s/device")
        parts += [f"lr {metrics.get('learning_rate', 0.0):.2e}",
                  f"ETA {format_duration(eta)}"]
        return " | ".join(parts)


def format_eval(values: dict[str, float]) -> str:
    """'t2a_R@1 12.0, t2a_R@10 40.1, ...' with the 'eval/' prefix dropped; the sets of
    config.data.extra_evals follow, each as '; eval_<kind>: t2a_R@1 ...'."""
    sets: dict[str, list[str]] = {}  # the sets in the order evaluated, their names sorted
    for key, value in values.items():
        prefix, _, name = key.rpartition("/")
        sets.setdefault(prefix, []).append(f"{name} {value:.4g}")
    sets = {prefix: sorted(parts) for prefix, parts in sets.items()}
    first = sets.pop("eval", [])
    return "; ".join([", ".join(first)] * bool(first) +
                     [f"{prefix}: {', '.join(parts)}" for prefix, parts in sets.items()])


def eval_missing(writer: MetricWriter, step: int) -> bool:
    """Whether metrics.jsonl lacks the evaluation of `step` (process 0 keeps the file;
    every process gets its answer, as evaluating is collective)."""
    missing = not writer.logged(step, prefix="eval")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        missing = bool(np.any(multihost_utils.process_allgather(np.asarray(missing))))
    return missing


def log_evaluation_again(writer: MetricWriter, step: int,
                         final: dict[str, Any]) -> None:
    """Logs what an evaluation of a step already evaluated adds (a process killed while
    evaluating it, or a rerun of a finished run with another evaluation set): one row
    per metric and step, so TensorBoard shows no step twice. A value that differs from
    the one logged (the evaluation settings changed) is named: the run's returned
    results (results.json) hold the new ones, metrics.jsonl keeps the old."""
    logged = writer.logged_values(step)
    new = {k: v for k, v in final.items() if k not in logged}
    if new:
        writer.write(step, new)
    changed = sorted(k for k, v in final.items() if k in logged and _differs(v, logged[k]))
    if changed:
        logging.warning(
            "evaluated step %d again and got other values than metrics.jsonl holds for it "
            "(%s%s): were the evaluation settings changed? The results returned (and the "
            "recipe's results.json) are this evaluation's; metrics.jsonl keeps the logged "
            "ones", step, ", ".join(changed[:5]), ", ..." if len(changed) > 5 else "")


def _differs(a: Any, b: Any) -> bool:
    try:  # numbers within a device's rounding of each other are the same result
        return not np.isclose(float(a), float(b), rtol=1e-4, atol=1e-8)
    except (TypeError, ValueError):
        return a != b

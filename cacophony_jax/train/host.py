"""What the host does around the train step: prefetching batches, stop signals, and
profiler traces (used by `loop.run`)."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from cacophony_jax.data import to_global


class Prefetcher:
    """Pulls host batches in a thread, makes them global, remembers iterator states.

    The iterator state recorded with each batch is the one to checkpoint after the
    step that consumed it, so resuming replays exactly the following batches.
    """

    def __init__(self, data_iter, mesh, depth: int):
        self._it, self._mesh = data_iter, mesh
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                state = self._it.get_state()
                failed = int(np.sum(batch.pop("num_failed", 0)))
                item = (to_global.to_global(batch, self._mesh), state, failed)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._queue.put(e)

    def next(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


def make_workdir(workdir: str) -> epath.Path:
    """The workdir, created if needed; a file of that name is refused."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--workdir {workdir} is a file; name a folder (new or a run's)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, no permission, a read-only disk
        raise ValueError(f"--workdir {workdir} cannot be created ({e.strerror or e}): name a "
                         "folder you can write") from None
    if "://" not in workdir and not os.access(path, os.W_OK):
        raise ValueError(f"--workdir {workdir} is not writable: name a folder you can write")
    # What the run writes there, checked now rather than at the first save or log row.
    for name, folder in (("checkpoints", True), ("metrics.jsonl", False),
                         ("config.json", False)):
        if (path / name).exists() and (path / name).is_dir() != folder:
            kind = "a file" if folder else "a folder"
            raise ValueError(f"{path / name} is {kind}, where the run keeps its {name}: "
                             f"move it away or name another --workdir")
    return path


@contextlib.contextmanager
def workdir_lock(workdir: epath.Path):
    """Holds `workdir/.lock` for a run, so a second run on the same workdir stops at once
    instead of interleaving checkpoints and metrics with the first.

    The first process locks (the others write what it coordinates) and tells the others
    whether it could, so all of a refused run's processes stop together. The lock goes
    with the process, so a killed run leaves none behind. Where the file system has no
    locks, the run goes on with a warning.
    """
    handle, holder = None, None
    if jax.process_index() == 0 and "://" not in str(workdir):
        handle, holder = _lock(workdir)
    busy = holder is not None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
    if busy:
        import socket

        elsewhere = holder and not holder.endswith(f" on {socket.gethostname()}")
        # Only process 0 reads the lock file: the others point to its message.
        holder = holder or ("another run" if jax.process_index() == 0 else
                            "another run (process 0's error names it)")
        raise WorkdirBusyError(
            f"workdir {workdir} is in use by {holder}: two runs would "
            "interleave their checkpoints and metrics; stop that run (it resumes from its "
            "newest checkpoint) or use another --workdir"
            + ("; if that machine went down, its lock ends when the shared file system "
               "notices (NFS: after its lease, about 90 s): rerun then" if elsewhere else ""))
    try:
        check_shared(workdir)
        yield
    finally:
        if handle is not None:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


_SHARED: set[str] = set()  # workdirs every process was found to see


def check_shared(workdir: epath.Path, wait_s: float = 10.0) -> None:
    """Refuses a multi-process run whose workdir is not one folder for all processes.

    The same path on every host can still be each host's own disk; every process would
    then save its part of each checkpoint where no other process reads it, which shows
    only when a restore fails. Process 0 writes a file with a token it shares; every
    other process must read it back (within `wait_s`, for file systems that show new
    files late). The file's name is new each time, so no host can have it cached from
    an earlier check (network file systems cache what a name held). Object-store paths
    (gs://...) are one folder by definition.

    Raises:
      ValueError (on every process): which processes did not see the file.
    """
    folder = os.path.abspath(str(workdir))
    if jax.process_count() == 1 or "://" in str(workdir) or any(
            folder == done or folder.startswith(done + os.sep) for done in _SHARED):
        return  # a recipe's stages work in folders of its checked workdir
    from jax.experimental import multihost_utils

    def named(token: np.ndarray) -> str:
        return os.path.join(str(workdir), f".shared-check-{token.tobytes().hex()}")

    token = np.frombuffer(os.urandom(16), np.uint32)
    if jax.process_index() == 0:
        with open(named(token), "w", encoding="utf-8") as f:
            f.write(token.tobytes().hex())
    # The write comes before the broadcast, every read after it.
    token = np.asarray(multihost_utils.broadcast_one_to_all(token), np.uint32)
    path = named(token)
    seen, deadline = jax.process_index() == 0, time.monotonic() + wait_s
    while not seen and time.monotonic() < deadline:
        try:
            with open(path, encoding="utf-8") as f:
                seen = f.read() == token.tobytes().hex()
        except OSError:
            pass
        if not seen:
            time.sleep(0.5)
    flags = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
    if jax.process_index() == 0:
        with contextlib.suppress(OSError):
            os.remove(path)
    blind = [p for p, flag in enumerate(flags.tolist()) if not flag]
    if not blind:
        _SHARED.add(folder)
    else:
        raise ValueError(
            f"--workdir {workdir} is not one folder shared by the processes of this run: "
            f"process(es) {blind} do not see the file process 0 wrote there. Every host "
            "writes its part of each checkpoint into the workdir: use a gs:// path, or a "
            "shared file system (NFS, gcsfuse) mounted at the same path on every host")


def _lock(workdir: epath.Path) -> tuple[Any, str | None]:
    """(the open lock file or None, who holds it when it is taken)."""
    import fcntl
    import socket

    handle = open(os.path.join(str(workdir), ".lock"), "a+", encoding="utf-8")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, holder
    except OSError as e:
        logging.warning("workdir %s cannot be locked (%s): make sure no other run uses it",
                        workdir, e)
        handle.close()
        return None, None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle, None


class WorkdirBusyError(ValueError):
    """Another run holds the workdir."""


class StopRequestedError(Exception):
    """Training stopped early on a signal, after saving a checkpoint at `step`.

    Callers end there (a multi-stage run starts no later stage); the entry point exits
    with 128 + `signum`, as a process ended by that signal would.
    """

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step} after signal {signum}; rerun the same "
                         "command to resume")
        self.step, self.signum = step, signum


class SecondInterruptError(KeyboardInterrupt):
    """A second Ctrl-C: the run stops at once, without the checkpoint the first asked for."""


class StopSignal:
    """SIGTERM or a first Ctrl-C (SIGINT) -> save a checkpoint at the next step and stop
    (`StopRequestedError`); a second Ctrl-C interrupts at once, a third (should the
    second's exception be lost) ends the process.

    One may hold the signals inside another (a recipe's, between its stages, around a
    stage's loop): a stop asked for while the outer one held them (as the stage opened
    its data or trained its tokenizer) carries over to the inner one, and one asked for
    while the inner one held them goes back to the outer one when it is restored.
    """

    def __init__(self):
        self.requested, self._interrupted = False, False
        self.signum = int(signal.SIGTERM)  # what a stop agreed with other processes reports
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        outer = self._outer()
        if outer is not None and outer.requested:
            self.requested, self.signum = True, outer.signum

    def _outer(self) -> StopSignal | None:
        """The StopSignal that held the signals before this one, if any."""
        for old in self._old.values():
            owner = getattr(old, "__self__", None)
            if isinstance(owner, StopSignal):
                return owner
        return None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            # The second's exception can be lost where it lands (Python ignores what a
            # handler raises inside JAX's garbage-collection callback, which runs often
            # while a step compiles): there, or at a third Ctrl-C, the process ends as an
            # unhandled Ctrl-C ends it. Saves in flight are left uncommitted; a rerun
            # resumes from the newest committed step.
            lost = frame is not None and frame.f_code.co_name == "_xla_gc_callback"
            if self._interrupted or lost:
                logging.warning("Ctrl-C again: ending the process now")
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
                return
            self._interrupted = True
            raise SecondInterruptError
        how = " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""
        when = ("the next step" if jax.process_count() == 1 else
                "the next step all processes agree on (one in 10)")
        logging.warning("signal %d received: checkpointing at %s and stopping%s", signum,
                        when, how)
        self.requested, self.signum = True, int(signum)

    def agreed(self) -> bool:
        """True when any process was asked to stop (all processes agree)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        outer = self._outer()
        if outer is not None and self.requested:
            outer.requested, outer.signum = True, self.signum


class Profiler:
    """Captures a profiler trace of `num_steps` steps, after this run's first steps.

    The first `PROFILE_AFTER` steps of a run (compilation, input warm-up) are left out;
    the trace goes to `directory` (TensorBoard's profile plugin or Perfetto read it).
    Stopping waits for the traced steps to finish, the only wait it adds.
    """

    PROFILE_AFTER = 3

    def __init__(self, directory: epath.Path, num_steps: int, start: int, total: int):
        if jax.process_count() > 1:  # trace files are named by host: one folder each
            directory = directory / f"process_{jax.process_index()}"
        self.directory, self.active = directory, False
        self.first = min(start + self.PROFILE_AFTER, max(start, total - num_steps))
        self.last = min(self.first + num_steps, total) if num_steps > 0 else -1

    def annotate(self, step: int):
        """Context for dispatching `step` (a step marker inside a trace)."""
        if self.active:
            return jax.profiler.StepTraceAnnotation("train", step_num=step)
        return contextlib.nullcontext()

    def before(self, step: int) -> None:
        if step == self.first and step < self.last:
            try:
                jax.profiler.start_trace(str(self.directory))
            except Exception as error:  # noqa: BLE001 - a diagnostic, not worth a failed run
                logging.warning("no profiler trace (%s); training goes on", error)
                return
            self.active = True

    def after(self, step: int, outputs) -> float:
        """Ends the trace after its last step; returns the seconds that took (writing
        the trace is not training time), else 0."""
        if not (self.active and step >= self.last):
            return 0.0
        jax.block_until_ready(outputs)  # the traced steps' own time stays training time
        start = time.perf_counter()
        if self.stop():
            logging.info("profiler trace of steps %d-%d written to %s", self.first + 1,
                         self.last, self.directory)
        return time.perf_counter() - start

    def stop(self) -> bool:
        """Ends a running trace; True when it was written."""
        if not self.active:
            return False
        self.active = False
        try:
            jax.profiler.stop_trace()
        except Exception as error:  # noqa: BLE001 - a diagnostic, not worth a failed run
            logging.warning("the profiler trace could not be written to %s (%s); training "
                            "goes on", self.directory, error)
            return False
        return True

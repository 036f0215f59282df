"""Orbax checkpoints of the train state, the Grain iterator and the config.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter,config}`, the first process's
host counters also in the step's metadata (`IteratorTarget`). Saves are
asynchronous and the manager is always closed (an unclosed async save hangs at
exit). A step folder that cannot be restored is skipped with a warning in favour
of the previous one and is never overwritten or deleted: it is renamed
`<step>.corrupt-N` at once, out of the keep-N count. A save that never finished (a
`<step>.orbax-checkpoint-tmp` folder, e.g. of a run stopped by a full disk) is not a
step: a run that opens the workdir again deletes it (before its first save).
`checkpoint_read` reads the checkpoints of a run that a user path names.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_ckpt

from cacophony_jax.train import agree

ITEMS = ("state", "data_iter", "config")
COUNTERS_KEY = "cacophony_host_counters"
# Host counters that each process keeps for itself (the rest, e.g. examples_seen and
# first_batch, every process counts the same).
PER_PROCESS_COUNTERS = ("failed_records",)


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used."""


class _FrozenIteratorState:
    """The Grain iterator state captured when the step it belongs to finished.

    The loop prefetches batches, so the live iterator is ahead of the state that
    matches the saved model; we save the state recorded with the batch instead.
    """

    def __init__(self, state: dict[str, Any], counters: dict[str, int] | None = None):
        self._state = dict(state, **{COUNTERS_KEY: counters}) if counters else state

    def get_state(self) -> bytes:
        return json.dumps(self._state, indent=1).encode()


class IteratorTarget:
    """The restore target for a Grain iterator whose saved state carries host counters.

    The loop's own per-process counters (e.g. data/failed_records) ride in the saved
    iterator state under COUNTERS_KEY, so they continue across a resume; the first
    process's (those the metrics show) are also in the step's metadata, so they
    continue where the iterator item is missing or cannot be restored. Steps saved
    without either restore as before, with counters of zero. Counter "first_batch" is
    the global batch the saved iterator's stream began at (`pipeline.train_dataset`'s
    `first_batch`, nonzero after a resume that had to place the input by its step):
    its position counts from there, so the iterator is rebuilt with `rebuild(first)`
    before the position is set.
    """

    def __init__(self, iterator: Any, rebuild: Any = None,
                 expect: dict[str, int] | None = None):
        self.iterator = iterator
        self.rebuild = rebuild
        # Settings a saved position only fits (saved with it as counters): another
        # global batch moves every host's rows, another worker count Grain may accept
        # and then fail on.
        self.expect = dict(expect or {})
        self.first = 0  # the global batch the iterator's stream begins at
        self.counters: dict[str, int] = {}
        self.restored = False  # whether a saved position was set
        self.prefetch_asked = False

    def set_state(self, state: bytes | dict[str, Any]) -> None:
        state = dict(json.loads(state) if isinstance(state, (bytes, str)) else state)
        counters = {k: int(v) for k, v in (state.pop(COUNTERS_KEY, None) or {}).items()}
        # The host's totals hold even where the position does not fit this run.
        self.counters = counters
        for key, value in self.expect.items():
            if key in counters and counters[key] != value:
                raise CheckpointError(f"it was saved with data.{key}={counters[key]}, this "
                                      f"run has {value}")
        first = counters.get("first_batch", 0)
        if first != self.first:
            if self.rebuild is None:
                raise CheckpointError(f"the saved input position counts from batch {first}, "
                                      "and this iterator cannot be rebuilt there")
            getattr(self.iterator, "close", lambda: None)()
            self.iterator, self.first = self.rebuild(first), first
        self.iterator.set_state(state)
        self.restored = True

    def start_prefetch(self) -> None:
        """Grain's restore asks for this once the position is set; it is put off until
        `prefetch`, so that a run with nothing left to train decodes nothing."""
        self.prefetch_asked = True

    def prefetch(self) -> None:
        """Starts the iterator's prefetching where Grain's restore asked for it."""
        start = getattr(self.iterator, "start_prefetch", None)
        if self.prefetch_asked and start is not None:
            start()


def brief(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (Orbax's and
    TensorStore's run to many lines of specs)."""
    text = str(error).split("See full TensorStore details")[0]  # a method's repr follows
    return " ".join(text.split())[:limit]


class _ReadOnlyNotice(logging.Filter):
    """Drops Orbax's warnings that a manager we opened read-only is read-only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Given directory is read only")
                    or "read_only=True, setting save_interval_steps" in message)


logging.getLogger("absl").addFilter(_ReadOnlyNotice())


class Checkpointer:
    """Saves and restores {state, data_iter, config} under one folder."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
                 async_save: bool = True, read_only: bool = False):
        # Orbax's array writer refuses relative paths (e.g. --workdir=runs/x).
        text = os.fspath(directory)
        self.directory = epath.Path(text if "://" in text else os.path.abspath(text))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            save_interval_steps=0 if read_only else 1,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=ITEMS)
        self.read_only = read_only

    def steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state: Any, data_iter: Any = None,
                step: int | None = None) -> tuple[Any, int] | None:
        """Restores the newest readable step (or `step`) onto `abstract_state`.

        Args:
          abstract_state: ShapeDtypeStructs with shardings (the restore target).
          data_iter: a Grain DatasetIterator (or an IteratorTarget around one) to set
            to the saved position, or None.
          step: a specific step; None tries the newest, then older ones.

        Returns:
          (state, step) or None if there is nothing readable.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        unreadable = []
        for candidate in candidates:
            try:
                if data_iter is not None and step is None:
                    # A damaged position would make the resume silently inexact; an
                    # older step resumes exactly.
                    self._check_iterator_files(candidate)
                restored = self.manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
            except Exception as e:  # noqa: BLE001 - any failure means unreadable
                if step is not None:
                    raise CheckpointError(
                        f"checkpoint step {candidate} in {self.directory} cannot be "
                        f"restored: {brief(e, 500)}") from e
                logging.warning("checkpoint step %s in %s is unreadable (%s: %s); trying "
                                "an older one", candidate, self.directory,
                                type(e).__name__, brief(e))
                unreadable.append(candidate)
                continue
            if not self.read_only:
                # Once an older step has been read (so the newer ones are truly bad, not
                # a run whose config no longer fits them all): out of the keep-N count,
                # so retention never deletes them.
                for bad in unreadable:
                    self._move_aside(bad)
            if data_iter is not None:
                self.restore_iterator(candidate, data_iter)
            return restored.state, candidate
        return None

    def _iterator_file(self, step: int) -> epath.Path:
        return (self.directory / str(step) / "data_iter"
                / f"process_{jax.process_index()}-of-{jax.process_count()}.json")

    def _check_iterator_file(self, step: int) -> None:
        """Raises CheckpointError when this process's saved input position is there but
        damaged (not JSON); a missing one is a changed process count, not damage."""
        path = self._iterator_file(step)
        if not path.exists():
            return
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"its input-pipeline position {path} is damaged "
                                  f"({brief(e)})") from None

    def _check_iterator_files(self, step: int) -> None:
        """`_check_iterator_file` on every process: all skip `step` when any one's
        position is damaged, as they must resume from the same step."""
        error = None
        try:
            self._check_iterator_file(step)
        except Exception as e:  # noqa: BLE001 - an unreadable file too (EIO, ESTALE)
            error = e if isinstance(e, CheckpointError) else CheckpointError(
                f"its input-pipeline position cannot be read ({brief(e)})")
        try:
            agree.agree(f"reading step {step}'s input positions", error)
        except agree.OtherProcessError as e:
            raise CheckpointError(str(e)) from None

    def _saved_counters(self, step: int) -> dict[str, int]:
        """The first process's host counters kept in `step`'s metadata ({} if none).

        Another process takes only those every process shares (`PER_PROCESS_COUNTERS`
        are the first process's own: its count would not be theirs)."""
        try:
            saved = (self.manager.metadata(step).custom_metadata or {}).get(COUNTERS_KEY)
            counters = {k: int(v) for k, v in (saved or {}).items()}
        except Exception:  # noqa: BLE001 - saved before they were kept there, or unreadable
            return {}
        if jax.process_index() != 0:
            counters = {k: v for k, v in counters.items() if k not in PER_PROCESS_COUNTERS}
        return counters

    def restore_iterator(self, step: int, data_iter: Any) -> None:
        """Sets `data_iter` (as for `restore`) to the input position saved at `step`;
        one that cannot be restored is warned about and left as it is."""
        try:
            self.manager.restore(step, args=ocp.args.Composite(
                data_iter=grain_ckpt.CheckpointRestore(data_iter)))
        except Exception as e:  # noqa: BLE001
            if isinstance(data_iter, IteratorTarget) and not data_iter.counters:
                data_iter.counters = self._saved_counters(step)  # the totals still hold
            # E.g. saved by a different number of processes or workers: the model state
            # is still valid; the caller places the input by the step instead.
            logging.warning("the input position saved at step %s was not restored (%s): "
                            "was it saved with another data.num_workers, global batch size "
                            "or number of processes? The model resumes; the input continues "
                            "in the same stream after the examples drawn so far (as many "
                            "batches as step %s implies where that count was not saved)",
                            step, brief(e), step)

    def save(self, step: int, state: Any, iterator_state: dict[str, Any] | None,
             config_json: dict[str, Any], force: bool = False,
             counters: dict[str, int] | None = None) -> bool:
        """Starts saving `state` at `step` (asynchronously when configured).

        `counters` (this process's, saved with its iterator state; the first process's
        also in the step's metadata) come back in the IteratorTarget given to `restore`.

        Returns:
          True if a save was started.
        """
        if step in self.manager.all_steps():
            return False  # this exact step is already on disk (unreadable ones are moved)
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config_json),
        }
        if iterator_state is not None:
            items["data_iter"] = grain_ckpt.CheckpointSave(
                _FrozenIteratorState(iterator_state, counters))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force,
                                 custom_metadata={COUNTERS_KEY: counters} if counters else None)

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            n = 0
            while (self.directory / f"{step}.corrupt-{n}").exists():
                n += 1
            src.rename(self.directory / f"{step}.corrupt-{n}")
            logging.warning("moved unreadable checkpoint %s aside to %s.corrupt-%d (kept "
                            "for inspection; rename it back to try it again)", src, step, n)
        if jax.process_count() > 1:  # every process sees the rename before it reloads
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()

    def read_config(self, step: int) -> dict[str, Any]:
        """The config JSON saved with `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config

    def saved_config(self, step: int | None = None) -> dict[str, Any] | None:
        """The config saved with `step` (default the newest), or None where there is
        none or it cannot be read."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        try:
            return dict(self.read_config(step))
        except Exception:  # noqa: BLE001 - an unreadable config says nothing
            return None

    def saved_task(self, step: int | None = None) -> str | None:
        """The task ('mae', 'cacophony') of the config saved with `step`, or None."""
        return (self.saved_config(step) or {}).get("task")

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (also after a failed save,
        whose error is raised once)."""
        waited = False
        try:
            self.manager.wait_until_finished()
            waited = True
        finally:
            try:
                self.manager.close()
            except Exception:
                # After a failed save Orbax raises its error again here, before it
                # releases its threads and stores (left running, they fail at exit with
                # tracebacks of their own); a second close releases them.
                self.manager.close()
                if waited:
                    raise

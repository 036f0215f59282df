"""Reading the checkpoints of a training run that a user path names.

A path names a run's workdir (with `checkpoints/`), its checkpoints folder or one
step folder: `resolve` finds the checkpoints folder and step, `saved_steps` lists the
steps, `saved_config` reads the config saved with one, and `restore_subtree` reads
one part of a saved state (the stage-1 encoder a stage-2 run starts from, the
parameters an export writes), from the newest readable step unless one is named
(`read_subtree` also says which step that was).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from cacophony_jax.train.checkpoint import Checkpointer, CheckpointError, brief


def resolve(path: str) -> tuple[epath.Path, int | None]:
    """Finds the checkpoint folder and step named by a user path.

    Accepts a workdir (with `checkpoints/`), a checkpoints folder, or one step folder.

    Returns:
      (checkpoints folder, step or None for the newest).
    """
    p = epath.Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {path!r} does not exist")
    if p.is_file():
        raise CheckpointError(f"{path!r} is a file, not a training checkpoint: name a "
                              "training workdir, its checkpoints folder or one step folder "
                              "(a released .ckpt file or an exported bundle starts stage 2's "
                              "audio encoder through config.train.init_from)")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints", None
    if p.name.isdigit() and (p / "state").exists():
        return p.parent, int(p.name)
    return p, None


def saved_steps(path: str | os.PathLike) -> list[int]:
    """The step folders (finished saves or not) under a workdir or its checkpoints
    folder, oldest first; [] when there are none or the folder cannot be read."""
    folder = epath.Path(path)
    if (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    try:
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    except OSError:
        return []


def saved_config(path: str) -> dict[str, Any] | None:
    """The config saved with the checkpoint a user path names (the newest step of a
    workdir), or None where there is none or it cannot be read."""
    directory, step = resolve(path)
    reader = Checkpointer(directory, read_only=True, async_save=False)
    try:
        return reader.saved_config(step)
    finally:
        reader.close()


def restore_subtree(path: str, keys: tuple[str, ...], abstract: Any,
                    task: str | None = None) -> Any:
    """Restores one subtree of a saved state (e.g. the stage-1 encoder): the subtree
    `read_subtree` returns."""
    return read_subtree(path, keys, abstract, task)[0]


def read_subtree(path: str, keys: tuple[str, ...], abstract: Any,
                 task: str | None = None) -> tuple[Any, int]:
    """Restores one subtree of a saved state, and says which step it came from.

    Args:
      path: a workdir, checkpoints folder or step folder of a training run.
      keys: dict path inside the saved state, e.g. ('params', 'encoder').
      abstract: ShapeDtypeStructs with shardings for that subtree.
      task: the task whose runs hold that subtree; a checkpoint whose saved config
        names another task is refused before reading it.

    Returns:
      (the subtree placed as `abstract` says, the step it was read from: the named
      one, or the newest readable one).
    """
    directory, step = resolve(path)
    reader = Checkpointer(directory, read_only=True, async_save=False)
    try:
        # A named step, or the newest readable one (as a workdir resumes).
        named = step is not None
        candidates = list(reversed(reader.steps())) if step is None else [step]
        if not candidates:
            raise CheckpointError(f"no checkpoint found under {path!r}")
        saved = reader.saved_task(candidates[0])
        if task is not None and saved is not None and saved != task:
            raise CheckpointError(
                f"{path!r} is a checkpoint of a {saved!r} run, not of a {task!r} run")
        item: Any = abstract
        for key in reversed(keys):
            item = {key: item}
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        for step in candidates:
            try:
                restored = reader.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                 partial_restore=True)))
                break
            except Exception as e:  # noqa: BLE001
                if step != candidates[-1]:
                    logging.warning("checkpoint step %s in %s: %s unreadable (%s: %s); trying "
                                    "an older one", step, directory, "/".join(keys),
                                    type(e).__name__, brief(e))
                    continue
                raise CheckpointError(
                    f"could not read {'/'.join(keys)} from checkpoint step {step} in "
                    f"{directory}{' (nor from any newer step)' if len(candidates) > 1 else ''}"
                    f": {brief(e, 500)}. Is it a checkpoint of the right stage and model "
                    "variant?") from e
        logging.info("read %s from %s step %d", "/".join(keys), directory, step)
        planned = (reader.saved_config(step) or {}).get("train", {}).get("steps")
        newer = [s for s in reader.steps() if s > step]
        if named and newer:  # an older step asked for by name: the run went on past it
            logging.info("(the run has newer steps: %s)", newer)
        elif isinstance(planned, int) and step < planned:
            logging.warning("read %s from step %d of %s, a run configured for %d steps: it "
                            "had not finished (still training, stopped, or its newer steps "
                            "are unreadable)", "/".join(keys), step, directory, planned)
        out = restored.state
        for key in keys:
            out = out[key]
        # A partial restore of a path the checkpoint lacks hands back the targets.
        if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(out)):
            raise CheckpointError(
                f"checkpoint step {step} in {directory} holds no {'/'.join(keys)}: is it "
                "a checkpoint of the right stage?")
        return out, step
    finally:
        reader.close()

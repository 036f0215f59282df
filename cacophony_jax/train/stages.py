"""Runs one training config, or a multi-stage recipe (stage 1 -> stage 2)."""

from __future__ import annotations

import contextlib
import json
import logging

import jax
import ml_collections
from etils import epath

from cacophony_jax import atomic_write
from cacophony_jax.train import agree, checks, host, init, loop

# The stage being trained: (its name, or None for a one-stage config; its config).
_RUNNING: tuple[str | None, ml_collections.ConfigDict] | None = None


def running_stage() -> tuple[str | None, ml_collections.ConfigDict] | None:
    """(name or None, config) of the stage `run` is training or last trained, else None
    (what an error raised from `run` is about)."""
    return _RUNNING


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    """Trains `config` in `workdir`; a config with `stages` runs each in a subfolder.

    In a multi-stage config every stage after the first whose `train.init_from` is
    'previous' starts from the previous stage's checkpoints. Before any stage trains,
    every stage's values, paths and data lists are checked; a later stage's own
    `train.init_from` path and stage-2 captions too. A finished stage (a rerun's) opens
    no training data: it only evaluates again.

    Returns:
      stage name -> final evaluation metrics.

    Raises:
      host.StopRequestedError: a stage was stopped by a signal (after saving); no later stage runs.
    """
    from cacophony_jax.tasks import common

    common.forget_opened()
    try:
        with _warn_once() as shown:
            return _run(config, workdir, shown)
    finally:
        common.forget_opened()


class _ShownWarnings(logging.Filter):
    """Notes the warnings logged while `recording`; afterwards drops their repeats (the
    recipe opens each stage's data up front, then again when the stage trains)."""

    def __init__(self) -> None:
        super().__init__()
        self.recording, self.seen = True, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed message: the handler reports it
            return True
        if self.recording:
            self.seen.add(text)
            return True
        return text not in self.seen


@contextlib.contextmanager
def _warn_once():
    shown = _ShownWarnings()
    from absl import logging as absl_logging

    handlers = {*logging.getLogger().handlers, absl_logging.get_absl_handler()}
    for handler in handlers:
        handler.addFilter(shown)
    try:
        yield shown
    finally:
        for handler in handlers:
            handler.removeFilter(shown)


def _run(config: ml_collections.ConfigDict, workdir: str, shown: _ShownWarnings
         ) -> dict[str, dict[str, float]]:
    agree.check_devices()
    # Every stage's settings, and the workdir, the same on every process (a later
    # stage's too, before the first trains), before any process checks its own.
    agree.check_same_run({**json.loads(config.to_json_best_effort()), "workdir": workdir})
    error = None
    try:  # every stage's mistakes before any training, on every process of the run
        if not workdir.strip():
            raise ValueError("--workdir is empty: name the folder for the run's "
                             "checkpoints and metrics (e.g. --workdir=runs/mae)")
        checks.check_local("--workdir", workdir)
        for i, (name, stage) in enumerate(
                [(None, config)] if "stages" not in config else
                [(n, config.stages[n]) for n in config.stage_order]):
            try:
                if i == 0 and stage.task == "cacophony" and stage.train.init_from == "previous":
                    raise ValueError(
                        "config.train.init_from='previous' names the stage before this one "
                        "in a multi-stage config (one with `stages`, as "
                        "configs/quickstart.py); this run has no stage before it: give the "
                        "path of a stage-1 run, a released .ckpt file or a bundle")
                checks.check_config(stage)
                checks.check_paths(stage)
                # A finished stage (a rerun's) trains nothing: its training data stays shut.
                done = init.finished(stage, epath.Path(workdir) / (name or ""))
                _open_data(stage, keep=i == 0, later=i > 0, train=not done)
                if i > 0 and stage.train.init_from not in ("", "previous"):
                    _check_start(stage)
            except ValueError as e:
                if name is None:
                    raise
                raise ValueError(f"stage {name!r} (--config.stages.{name}.*): {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure here must reach `agree`
        error = e
    shown.recording = False  # a stage that opens its data again does not repeat them
    agree.agree("the config checks", error)  # a host that lacks a path stops them all
    global _RUNNING
    if "stages" not in config:
        _RUNNING = (None, config)
        return {config.task: loop.run(config, workdir)}
    root = host.make_workdir(workdir)
    with host.workdir_lock(root):  # the recipe's own files (results.json) too
        results = _run_stages(config, root)
    if jax.process_index() == 0:
        print(summary(results), flush=True)
    return results


def _open_data(stage: ml_collections.ConfigDict, keep: bool, later: bool,
               train: bool = True) -> None:
    """Opens a stage's training and evaluation data (reads their lists, not their
    audio), so a wrong layout, split or column stops the run on every process (or the
    recipe before stage 1 trains). `keep`: hand the sources to the stage's training,
    which would otherwise read the lists again (the first stage's: a later stage's
    start hours later). `later`: a later stage of a recipe, whose stage-2 training
    data is checked for captions too (the first stage's training checks at once).
    `train`: False for a finished stage, which reads no training data."""
    from cacophony_jax.data import records
    from cacophony_jax.tasks import common

    opened = {}
    try:
        blocks = (["train"] if train else []) + (["eval"] if stage.data.eval.kind else [])
        for which in blocks:
            # (Not open_eval_source: its warnings come when the stage trains.)
            opened[which] = common.open_block(stage, which, *common.block_sizes(stage, which),
                                              reuse=False)
        if later and train and stage.task == "cacophony":
            records.check_captions(opened["train"])
        for which, source in opened.items():
            if which == "eval" and not len(source):
                raise ValueError(f"config.data.eval (kind={stage.data.eval.kind!r}, "
                                 f"split={stage.data.eval.split!r}) has no clips to evaluate")
        for _, sub in common.extra_eval_blocks(stage):
            source = common.open_block(sub, "eval", *common.block_sizes(sub, "eval"),
                                       reuse=False)
            size = len(source)
            if getattr(source, "close", None) is not None:
                source.close()
            if not size:
                raise ValueError(f"{sub.data.eval_label} names a set with no clips (split "
                                 f"{sub.data.eval.split!r})")
    except BaseException:
        for source in opened.values():
            if getattr(source, "close", None) is not None:
                source.close()
        raise
    for which, source in opened.items():
        if keep:
            common.keep_opened(stage, which, source)
        elif getattr(source, "close", None) is not None:
            source.close()


def _check_start(stage: ml_collections.ConfigDict) -> None:
    """Reads the audio encoder a later stage's `train.init_from` names (a path, not
    'previous'), as that stage will: the wrong kind of run or file, or an encoder of
    another width, stops the recipe before its first stage trains. The model's shapes
    are traced, nothing is compiled; the encoder read is dropped again."""
    from cacophony_jax import tasks
    from cacophony_jax.optim import optimizer
    from cacophony_jax.parallel import mesh as mesh_lib
    from cacophony_jax.parallel import partition
    from cacophony_jax.train import init
    from cacophony_jax.train import state as state_lib

    plan = None  # stage 1 is refused without one
    if stage.task == "cacophony":
        mesh = mesh_lib.make_mesh(stage.mesh)
        tx, _ = optimizer.make_optimizer(stage.optim, stage.train.steps)
        plan = state_lib.plan_state(tasks.build(stage).init_params, tx, mesh,
                                    partition.rules_from_config(stage.sharding_rules))
    init.start_encoder(stage, plan)


def _run_stages(config: ml_collections.ConfigDict, root: epath.Path
                ) -> dict[str, dict[str, float]]:
    global _RUNNING
    results: dict[str, dict[str, float]] = {}
    previous, stage_steps = None, 0
    # Between stages a signal is held here (each stage's loop takes it over while it
    # runs): a stop asked for as one stage ends starts no later stage.
    between = host.StopSignal()
    try:
        for name in config.stage_order:
            stage = config.stages[name]
            if stage.train.init_from == "previous":
                if previous is None:
                    raise ValueError(f"stage {name!r} starts from 'previous' but is first")
                with stage.unlocked():
                    stage.train.init_from = str(root / previous)
            if previous is not None and between.agreed():
                raise host.StopRequestedError(int(stage_steps), between.signum)
            logging.info("=== stage %s -> %s", name, root / name)
            _RUNNING = (name, stage)
            results[name] = loop.run(stage, str(root / name))
            previous, stage_steps = name, stage.train.steps
    finally:
        between.restore()
    if jax.process_index() == 0:
        atomic_write.write_text(root / "results.json", json.dumps(results, indent=2))
    return results


def summary(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of every stage's final evaluation, with chance levels.

    Chance for retrieval at k is k / clips (text->audio: one right clip among all),
    for zero-shot top-k it is k / classes.
    """
    lines = ["| stage | metric | value | chance |", "|---|---|---|---|"]
    for stage, values in results.items():
        for key, value in sorted(values.items()):
            # eval/<metric>, or eval_<kind>/<metric> for config.data.extra_evals' sets.
            prefix, _, name = key.rpartition("/")
            clips = values.get(f"{prefix}/num_clips", 0.0)
            classes = values.get(f"{prefix}/num_classes", 0.0)
            chance = ""
            if name.startswith("t2a_R@") and clips:
                chance = f"{100 * min(int(name.split('@')[1]) / clips, 1):.3g}"
            elif name.startswith("zeroshot_top") and classes:
                chance = f"{100 * min(int(name.removeprefix('zeroshot_top')) / classes, 1):.3g}"
            shown = key.removeprefix("eval/")
            lines.append(f"| {stage} | {shown} | {value:.4g} | {chance} |")
    return "\n".join(lines)

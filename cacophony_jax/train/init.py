"""Where a run's starting point comes from: tokenizer, and state by resume order.

Resume order: this workdir's newest readable checkpoint -> `config.train.resume`
-> `config.train.init_from` (stage 2 takes only an audio encoder: of a stage-1 run,
a released checkpoint or a bundle, `encoder_init`) -> fresh. The
text tower can additionally start from local RoBERTa weights.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
from etils import epath

from cacophony_jax.data import records, sources
from cacophony_jax.data import tokenizer as tokenizer_lib
from cacophony_jax.train import checkpoint, checkpoint_read, encoder_init
from cacophony_jax.train import state as state_lib

TOKENIZER_FILE = "tokenizer.json"


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: epath.Path,
                      train_source: Any) -> tokenizer_lib.Tokenizer | None:
    """Loads the configured tokenizer, the workdir's, or trains one on the captions.

    Whichever it is, the workdir keeps a copy (`tokenizer.json`, written by `keep_tokenizer`
    once the run's checkpoints are known to fit): export reads that, not a path that
    may since point elsewhere, and a resume whose `tokenizer.path` now holds another
    tokenizer is refused.

    Args:
      config: the run's config.
      workdir: the run's folder.
      train_source: the training data, whose captions a new tokenizer is trained on;
        None for a run that has checkpoints (it never trains one).

    Returns:
      The tokenizer, or None for tasks without text.
    """
    if config.task != "cacophony":
        return None
    saved: epath.Path | None = workdir / TOKENIZER_FILE
    if not saved.exists():
        if has_checkpoints(workdir) and not config.tokenizer.path:
            raise ValueError(
                f"{workdir} holds checkpoints but not the {TOKENIZER_FILE} they were "
                "trained with (copied without it?); a new tokenizer would renumber the "
                f"token ids. Put that {TOKENIZER_FILE} back in the workdir, or pass it as "
                "config.tokenizer.path")
        saved = None
    elif not has_checkpoints(workdir):
        # Kept by an attempt that failed before its first checkpoint: nothing was
        # trained with it, and today's data or settings may differ.
        logging.info("%s was kept by an attempt that saved no checkpoint: not used", saved)
        saved = None
    if saved is None and config.train.resume:
        # A run continued from another workdir's checkpoint: its token ids are that
        # run's, so its tokenizer comes along (a new BPE would renumber them).
        saved = _resumed_tokenizer(config.train.resume)
    kept = tokenizer_lib.Tokenizer.load(str(saved)) if saved is not None else None
    if config.tokenizer.path:
        tok = tokenizer_lib.Tokenizer.load(config.tokenizer.path)
        if kept is not None and kept.fingerprint != tok.fingerprint:
            raise ValueError(
                f"config.tokenizer.path={config.tokenizer.path!r} is not the tokenizer this "
                f"workdir was trained with ({saved}, fingerprint {kept.fingerprint}; the path "
                f"holds {tok.fingerprint}): point it at that tokenizer, or leave it empty to "
                "use the workdir's copy")
        return tok
    if kept is not None:
        if saved.parent != workdir:
            logging.info("using the tokenizer of the resumed run, %s", saved)
        return kept
    if config.train.resume:
        logging.warning("config.train.resume=%r: the run it continues kept no %s, so a new "
                        "tokenizer is trained; if that run trained on other captions, pass "
                        "its tokenizer as config.tokenizer.path", config.train.resume,
                        TOKENIZER_FILE)
    from cacophony_jax.models import variants
    vocab = (config.tokenizer.vocab_size
             or variants.cacophony_config(config.model.variant).text.vocab_size)
    logging.info("training a %d-token byte-level BPE on the training captions", vocab)
    texts = list(iter_captions(train_source))
    if not texts:
        # Its message names the set and how to caption it: a tokenizer path alone would
        # only move the failure on to the input pipeline.
        records.check_captions(train_source)
        raise ValueError("the training data has no captions to train a tokenizer on; set "
                         "config.tokenizer.path to a tokenizer.json or RoBERTa folder")
    tok = tokenizer_lib.Tokenizer.train_bpe(texts, vocab)
    if tok.vocab_size < vocab:
        # BPE stops when no pair of tokens repeats; the model keeps its `vocab` rows.
        log = logging.warning if config.tokenizer.vocab_size else logging.info
        log("the training captions gave a %d-token vocabulary, not the %d asked for: BPE "
            "ran out of repeated pairs (%d captions); the model's unused embedding rows "
            "stay untrained", tok.vocab_size, vocab, len(texts))
    return tok


def _resumed_tokenizer(resume: str) -> epath.Path | None:
    """The tokenizer kept by the run that `resume` (its workdir, checkpoint folder or
    step folder) belongs to, or None."""
    folder = epath.Path(resume)
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / TOKENIZER_FILE).exists() and (candidate / "config.json").exists():
            return candidate / TOKENIZER_FILE
    return None


def keep_tokenizer(tokenizer: tokenizer_lib.Tokenizer | None, workdir: epath.Path) -> None:
    """Writes the run's tokenizer to the workdir (process 0), unless it holds the one
    its checkpoints were trained with."""
    saved = workdir / TOKENIZER_FILE
    if tokenizer is None or jax.process_index() != 0:
        return
    if not saved.exists() or not has_checkpoints(workdir):
        tokenizer.save(str(saved))  # atomic: a reader never sees half a file


def has_checkpoints(workdir: epath.Path) -> bool:
    """Whether the workdir holds a saved step (finished or not: a step folder)."""
    return bool(checkpoint_read.saved_steps(workdir / "checkpoints"))


def finished(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> bool:
    """Whether the run starts at `config.train.steps` or later, so that it trains nothing
    and opens no training data: the workdir's newest saved step is there, or, in a
    workdir without one, the step `config.train.resume` names is (should that step prove
    unreadable, the run goes back to an older one and opens its data then).

    A stage-2 run continued from another workdir counts only when its tokenizer does
    not have to be trained on the data: the resumed run kept one, or
    `config.tokenizer.path` names one.
    """
    steps = checkpoint_read.saved_steps(epath.Path(workdir) / "checkpoints")
    if steps:
        return steps[-1] >= config.train.steps
    if not config.train.resume:
        return False
    try:
        directory, step = checkpoint_read.resolve(config.train.resume)
    except checkpoint.CheckpointError:
        return False  # restoring names the problem
    if step is None:
        saved = checkpoint_read.saved_steps(directory)
        step = saved[-1] if saved else None
    if step is None or step < config.train.steps:
        return False
    return (config.task != "cacophony" or bool(config.tokenizer.path)
            or _resumed_tokenizer(config.train.resume) is not None)


def iter_captions(source: Any):
    """Every real and synthetic caption of a source, without decoding audio."""
    for record in sources.metadata_rows(source):
        yield from record.get("captions") or ()
        yield from record.get("synthetic_captions") or ()


# Config fields that change the train state's tree (parameters or optimiser state).
STATE_FIELDS = ("model.variant", "model.scan", "model.sigmoid_bias", "optim.sam.enabled",
                "optim.accum_steps", "optim.freeze", "optim.clip_norm")


# Config fields that shape the learning-rate schedule: a resume that changes them goes
# on, but the steps already taken followed the old schedule.
SCHEDULE_FIELDS = ("train.steps", "optim.learning_rate", "optim.warmup_steps",
                   "optim.schedule", "optim.min_lr_ratio")

# Config fields that say which training records are read in which order (seed: the
# shuffle's): a resume that changes them goes on from the old data's saved position.
DATA_FIELDS = ("data.train.kind", "data.train.path", "data.train.split", "data.synthetic_seed",
               "data.synthetic_train_size", "seed")


def lookup(tree: Any, key: str) -> Any:
    """The value at dotted `key` ("optim.sam.enabled") of a config or its JSON, or None
    where the tree has no such field."""
    for part in key.split("."):
        if not isinstance(tree, (dict, ml_collections.ConfigDict)) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _changed_fields(config: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer,
                    fields: tuple[str, ...] = STATE_FIELDS,
                    step: int | None = None) -> list[str]:
    """'field (saved -> now)' for each of `fields` the config saved with `step` (default
    the newest) sets differently (empty when that config cannot be read)."""
    steps = ckpt.steps()
    if step is None and not steps:
        return []
    saved = ckpt.saved_config(steps[-1] if step is None else step)
    if saved is None:  # then the message stays general
        return []
    return [f"config.{key} ({lookup(saved, key)!r} -> {lookup(config, key)!r})"
            for key in fields if lookup(saved, key) != lookup(config, key)]


def _resumed(config: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer,
             step: int) -> None:
    logging.info("resuming from %s step %d", ckpt.directory, step)
    if step >= config.train.steps:
        return  # nothing left to train: changed settings change nothing
    changed = _changed_fields(config, ckpt, SCHEDULE_FIELDS, step)
    if changed:
        logging.warning("resuming with %s: the learning-rate schedule from step %d on is "
                        "the new one, the steps before followed the old one (not the run "
                        "the new settings would have trained from the start)", ", ".join(changed),
                        step + 1)
    changed = _changed_fields(config, ckpt, ("data.global_batch_size",), step)
    if changed:
        logging.warning("resuming with %s: steps from %d on see batches of the new size "
                        "(the learning rate was tuned for the old one; see docs/scaling.md, "
                        "'Global batch and learning rate')", ", ".join(changed), step + 1)
    changed = _changed_fields(config, ckpt, DATA_FIELDS, step)
    if changed:
        logging.warning("resuming with %s: the saved input-pipeline position belongs to the "
                        "old data, so the new data is read from that position of its own "
                        "order, not from its start", ", ".join(changed))


def restore_or_init(config: ml_collections.ConfigDict, task: Any, tx: Any,
                    plan: state_lib.StatePlan, ckpt: checkpoint.Checkpointer,
                    data_iter: Any) -> state_lib.TrainState:
    """Returns the starting state, following the resume order."""
    _check_task(config, ckpt)
    steps = ckpt.steps()
    changed = _changed_fields(config, ckpt) if steps else []
    if changed:
        # The newest step was saved with other settings of fields the state's shape may
        # depend on: try it alone. A change that keeps the shapes (clip_norm 1.0 -> 0.5)
        # resumes; one that does not is refused now, not after every step has been
        # reported unreadable.
        try:
            state, step = ckpt.restore(plan.abstract, data_iter, step=steps[-1])
        except checkpoint.CheckpointError:
            raise checkpoint.CheckpointError(
                f"the newest checkpoint in {ckpt.directory} (step {steps[-1]}) does not fit "
                f"this config: it changes {', '.join(changed)}, which the saved state's "
                "shape depends on. Run with the values it was saved with, use another "
                "--workdir, or move that checkpoints folder aside to start afresh") from None
        logging.warning("resuming with %s: the saved state fits the new values",
                        ", ".join(changed))
        _resumed(config, ckpt, step)
        encoder_init.check_start(config, ckpt.directory.parent)
        return state
    restored = ckpt.restore(plan.abstract, data_iter)
    if restored is not None:
        _resumed(config, ckpt, restored[1])
        encoder_init.check_start(config, ckpt.directory.parent)
        return restored[0]
    if steps:
        # Training from scratch here would later push these aside: say so instead.
        changed = _changed_fields(config, ckpt)
        why = (f"it changes {', '.join(changed)}, which the saved state's shape depends on"
               if changed else "were they saved with another model variant or options, or "
               "are they all damaged? (see the warnings above)")
        raise checkpoint.CheckpointError(
            f"none of the checkpoints in {ckpt.directory} (steps {ckpt.steps()}) fits this "
            f"config: {why}. Run with the values they were saved with, use another "
            "--workdir, or move that checkpoints folder aside to start afresh")
    if config.train.resume:
        try:
            directory, step = checkpoint_read.resolve(config.train.resume)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"config.train.resume: {e}") from e
        other = checkpoint.Checkpointer(directory, read_only=True, async_save=False)
        try:
            if not other.steps():
                raise checkpoint.CheckpointError(
                    f"config.train.resume={config.train.resume!r}: no checkpoint found under "
                    f"{directory}; name a training workdir, its checkpoints folder or a step")
            saved = other.saved_task(step)
            if saved is not None and saved != config.task:
                hint = (" (to start stage 2 from a stage-1 run's encoder, set "
                        "config.train.init_from instead)" if saved == "mae" else "")
                raise checkpoint.CheckpointError(
                    f"config.train.resume={config.train.resume!r} is a {saved!r} run, this "
                    f"is a {config.task!r} run{hint}")
            restored = other.restore(plan.abstract, data_iter, step=step)
            changed = _changed_fields(config, other) if restored is None else []
            if restored is not None:
                _resumed(config, other, restored[1])
        finally:
            other.close()
        if restored is None:
            why = f": this run changes {', '.join(changed)}" if changed else ""
            raise checkpoint.CheckpointError(
                f"config.train.resume={config.train.resume!r} holds no checkpoint that fits "
                f"this run{why}")
        return restored[0]
    state = state_lib.create_state(task.init_params, tx, plan, config.seed)
    params = dict(state.params)
    if config.train.init_from:
        params["audio_encoder"], start_step = start_encoder(config, plan)
        logging.info("audio encoder initialised from %s", config.train.init_from)
        encoder_init.record_start(config, ckpt.directory.parent, start_step)
    roberta = config.tokenizer.roberta_weights
    if roberta:
        from cacophony_jax.convert import roberta as roberta_lib
        text = roberta_lib.load_roberta_text_tower(roberta, task.model_config.text)
        params["text_encoder"] = jax.device_put(text, plan.shardings.params["text_encoder"])
        logging.info("text tower initialised from %s", roberta)
    return state.replace(params=params)


def start_encoder(config: ml_collections.ConfigDict, plan: state_lib.StatePlan | None
                  ) -> tuple[Any, int | None]:
    """The audio encoder `config.train.init_from` names, in this run's layout and
    shardings, and the step it was read from (None for a released file or a bundle);
    a recipe also reads a later stage's once, up front, to check it.

    Raises:
      ValueError: a stage-1 config with init_from, or (CheckpointError) a start point
        that is not a stage-1 run, released .ckpt file or bundle of this model's width.
    """
    if config.task != "cacophony":
        raise ValueError("config.train.init_from is for stage 2 (its audio encoder from "
                         "a stage-1 run, a released checkpoint or a bundle); stage 1 starts "
                         "from random weights, or continues a stage-1 run's checkpoints "
                         "with config.train.resume")
    try:
        return encoder_init.audio_encoder(config, plan)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(
            f"config.train.init_from: {e} (it takes a stage-1 (mae) run, a released "
            "AudioMAE or Cacophony .ckpt file, or an exported bundle; to continue a "
            "stage-2 run, use config.train.resume)") from e


def check_saved_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Refuses a workdir whose checkpoints belong to another task, before anything
    else about them (the tokenizer they were trained with) is looked for."""
    if not has_checkpoints(workdir):
        return
    reader = checkpoint.Checkpointer(workdir / "checkpoints", read_only=True,
                                     async_save=False)
    try:
        _check_task(config, reader)
    finally:
        reader.close()


def _check_task(config: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer) -> None:
    saved = ckpt.saved_task()
    if saved is not None and saved != config.task:
        raise checkpoint.CheckpointError(
            f"the workdir's checkpoints ({ckpt.directory}) belong to a {saved!r} run, this "
            f"is a {config.task!r} run: use another --workdir")

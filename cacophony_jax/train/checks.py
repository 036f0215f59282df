"""Config checks that need no devices, data or compiles: run for every stage of a
recipe before any of them trains, so a mistake in stage 2 does not wait for stage 1.

Each failure is a ValueError naming the field (``config.optim.b2=2.0 ...``) and what
it may be. The model, loss and data code check again where values are used; these are
the same rules, earlier.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from cacophony_jax.models import axes as axes_names
from cacophony_jax.optim import optimizer
from cacophony_jax.train import init

# Counts a run cannot work with below these values: (config key, minimum, why).
_MINIMUMS = (
    ("seed", 0, ""),
    ("train.steps", 1, ""),
    ("train.log_every", 1, ""),
    ("train.checkpoint_every", 1, ""),
    ("train.keep_checkpoints", 1, " (0 would delete every checkpoint, the last included)"),
    ("train.eval_every", 0, " (0 = only at the end)"),
    ("train.profile_steps", 0, ""),
    ("train.peak_tflops", 0, " (0 = the chip's datasheet value)"),
    ("data.global_batch_size", 1, ""),
    ("data.eval_batch_size", 1, ""),
    ("data.num_workers", 0, " (0 = threads in the training process)"),
    ("data.read_threads", 1, ""),
    ("data.prefetch_batches", 0, ""),
    ("data.text_length", 2, " (bos + eos)"),
    ("data.synthetic_train_size", 0, ""),
    ("data.synthetic_eval_size", 0, ""),
    ("eval.caption_clips", 0, " (0 = no captioning metrics)"),
    ("audio.max_patches", 0, " (0 = all)"),
    ("optim.learning_rate", 0, ""),
    ("optim.warmup_steps", 0, ""),
    ("optim.weight_decay", 0, ""),
    ("optim.sam.rho", 0, ""),
    ("optim.max_logit_scale", 0, " (0 = no ceiling)"),
    ("loss.contrastive_weight", 0, ""),
    ("loss.caption_weight", 0, ""),
    ("loss.chunk_size", 0, " (0 = the whole batch at once)"),
)


def _interval(low: float, high: float, closed_high: bool = False) -> Callable[[Any], bool]:
    return lambda v: low <= v < high or (closed_high and v == high)


# (config key, test, what it must be). Keys a config lacks (stage 1 has no loss block)
# are skipped.
# What to do instead when an optional path is missing.
_MISSING_PATH_HINTS = {
    "tokenizer.path": "; it is optional: leave it out to train a byte-level BPE on the "
                      "training captions, or fetch the RoBERTa tokenizer's files once (see "
                      "the README, 'Using trained or released weights')",
}

_RANGES = (
    ("optim.b1", _interval(0, 1), "in [0, 1)"),
    ("optim.b2", _interval(0, 1), "in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "positive"),
    ("optim.min_lr_ratio", _interval(0, 1, closed_high=True), "in [0, 1]"),
    ("model.drop_path", _interval(0, 1), "in [0, 1)"),
    ("mae.mask_ratio", lambda v: 0 < v < 1, "in (0, 1)"),
    ("data.synthetic_prob", _interval(0, 1, closed_high=True), "in [0, 1]"),
    # tasks/common.clip_samples: a clip holds one 16-frame patch (2,560 samples).
    # At most ten minutes: attention over a clip's patches grows with its square.
    ("audio.clip_seconds", lambda v: 2560 <= round(v * 16000) <= 600 * 16000,
     "in [0.16, 600] (at least one 16-frame patch, at most ten minutes)"),
    ("audio.eval_clip_seconds", lambda v: 2560 <= round(v * 16000) <= 600 * 16000,
     "in [0.16, 600] (at least one 16-frame patch, at most ten minutes)"),
)


def _choices() -> tuple[tuple[str, tuple[str, ...]], ...]:
    from cacophony_jax.losses import CONTRASTIVE_KINDS
    from cacophony_jax.models.attention_ops import ATTENTION_IMPLEMENTATIONS
    from cacophony_jax.models.stack import REMAT_OPTIONS
    from cacophony_jax.models.variants import VARIANTS

    return (("model.variant", VARIANTS), ("model.remat", REMAT_OPTIONS),
            ("model.attention", ATTENTION_IMPLEMENTATIONS),
            ("model.dtype", ("float32", "bfloat16", "float16")), ("loss.kind", CONTRASTIVE_KINDS))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Rejects settings a run cannot work with, naming the key.

    Args:
      config: one stage's config.

    Raises:
      ValueError: the first setting that is out of range, unknown or inconsistent.
    """
    for key, minimum, why in _MINIMUMS:
        value = init.lookup(config, key)
        if value is not None and not (value >= minimum and math.isfinite(value)):
            raise ValueError(f"config.{key}={value} must be a number >= {minimum}{why}")
    for key, test, what in _RANGES:
        value = init.lookup(config, key)
        if value is not None and not (math.isfinite(value) and test(value)):
            raise ValueError(f"config.{key}={value} must be {what}")
    for key, allowed in _choices():
        value = init.lookup(config, key)
        if value is not None and value not in allowed:
            raise ValueError(f"config.{key}={value!r} is not one of {list(allowed)}")
    optimizer.make_optimizer(config.optim, config.train.steps)  # its own rules, too
    if init.lookup(config, "loss.kind") == "sigmoid" and not config.model.sigmoid_bias:
        raise ValueError("config.loss.kind='sigmoid' needs config.model.sigmoid_bias=True "
                         "(the learned bias of the sigmoid loss)")
    chunk = init.lookup(config, "loss.chunk_size") or 0
    if chunk and config.data.global_batch_size % chunk:
        raise ValueError(f"config.loss.chunk_size={chunk} must divide "
                         f"config.data.global_batch_size ({config.data.global_batch_size})")
    if config.task == "cacophony":
        from cacophony_jax.models.variants import cacophony_config

        positions = cacophony_config(config.model.variant).text.max_positions
        if config.data.text_length > positions:
            raise ValueError(f"config.data.text_length={config.data.text_length} is more "
                             f"than the {config.model.variant} text tower's {positions} "
                             "positions")
        max_len = init.lookup(config, "eval.caption_max_len")
        if max_len is not None and max_len != 0 and not 2 <= max_len <= positions:
            raise ValueError(f"config.eval.caption_max_len={max_len} must be 0 (the text "
                             f"length) or in [2, {positions}] (bos, eos and the tokens the "
                             f"{config.model.variant} text tower has positions for)")
    # Optimiser accumulation spans steps: every step still sees the whole global batch.
    pieces = config.audio.frontend_sub_batches
    for key in ("data.global_batch_size", "data.eval_batch_size"):
        batch = init.lookup(config, key)
        if pieces < 1 or batch % pieces:
            raise ValueError(f"config.audio.frontend_sub_batches={pieces} must divide "
                             f"config.{key} ({batch}): set it to a divisor, or 1")
    if config.task == "mae" and init.lookup(config, "audio.max_patches"):
        raise ValueError(f"config.audio.max_patches={config.audio.max_patches} is stage 2's "
                         "patch dropout; stage 1 keeps 1 - config.mae.mask_ratio of the "
                         "patches instead: leave max_patches at 0")
    vocab = init.lookup(config, "tokenizer.vocab_size")
    if vocab and vocab < 261:
        raise ValueError(f"config.tokenizer.vocab_size={vocab} must be 0 (the model's "
                         "vocabulary) or at least 261 (256 bytes + 5 special tokens)")
    if vocab and config.task == "cacophony":
        from cacophony_jax.models.variants import cacophony_config

        rows = cacophony_config(config.model.variant).text.vocab_size
        if vocab > rows:
            raise ValueError(f"config.tokenizer.vocab_size={vocab} is more than the "
                             f"{config.model.variant} text tower's {rows} embedding rows")
    for which in ("train", "eval"):
        size = init.lookup(config, f"data.synthetic_{which}_size")
        if config.data[which].kind == "synthetic" and size == 0:
            off = " (config.data.eval.kind='' turns evaluation off)" if which == "eval" else ""
            raise ValueError(f"config.data.synthetic_{which}_size=0: the synthetic "
                             f"{which} split needs clips{off}")
    _check_mesh(config)
    _check_sources(config)
    _check_sharding_rules(config)


def _check_mesh(config: ml_collections.ConfigDict) -> None:
    sizes = {axis: config.mesh[axis] for axis in ("data", "fsdp") if axis in config.mesh}
    for axis, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"config.mesh.{axis}={size} must be a device count >= 1, or -1 "
                             "(the devices the other axis leaves); fsdp=1 turns FSDP off")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError("config.mesh.data and config.mesh.fsdp are both -1: give one of "
                         "them a count")


def _check_sources(config: ml_collections.ConfigDict) -> None:
    from cacophony_jax.data import sources

    for which in ("train", "eval"):
        block = config.data[which]
        if which == "eval" and not block.kind:
            continue  # evaluation off
        try:
            needs_path = sources.needs_path(block.kind)
        except sources.SourceError as e:
            raise ValueError(f"config.data.{which}.kind: {e}") from None
        if needs_path and not block.path:
            raise ValueError(f"config.data.{which}.kind={block.kind!r} reads files: set "
                             f"config.data.{which}.path")
    from cacophony_jax.tasks import common

    for _, sub in common.extra_eval_blocks(config):  # their form; paths: check_paths
        if sub.data.eval.kind == "synthetic" and not config.data.synthetic_eval_size:
            raise ValueError("config.data.extra_evals names the synthetic set, whose "
                             "config.data.synthetic_eval_size is 0")


def _check_sharding_rules(config: ml_collections.ConfigDict) -> None:
    axes = {"data", "fsdp"}
    for rule in config.sharding_rules:
        target = rule[1] if isinstance(rule, (tuple, list)) and len(rule) == 2 else None
        if (not isinstance(rule, (tuple, list)) or len(rule) != 2
                or not isinstance(rule[0], str)
                or not (target is None or isinstance(target, str) or (
                    isinstance(target, (tuple, list))
                    and all(isinstance(a, str) for a in target)))):
            raise ValueError(f"config.sharding_rules entry {rule!r} must be (logical axis "
                             "name, mesh axis name or tuple of them or None), e.g. "
                             "('batch', ('data', 'fsdp'))")
        named = [target] if isinstance(target, str) else list(target or ())
        unknown = [a for a in named if a not in axes]
        if unknown:
            raise ValueError(f"config.sharding_rules maps {rule[0]!r} to {unknown}, which "
                             f"the mesh lacks; its axes are {sorted(axes)}")
        if len(set(named)) != len(named):
            raise ValueError(f"config.sharding_rules maps {rule[0]!r} to {target!r}, which "
                             "names a mesh axis twice; name each once")
    logical = [rule[0] for rule in config.sharding_rules]
    twice = sorted({name for name in logical if logical.count(name) > 1})
    if twice:
        raise ValueError(f"config.sharding_rules has more than one entry for {twice}; "
                         "keep one each (only the first would count)")
    missing = [name for name in axes_names.ACTIVATION_AXES + axes_names.PARAM_AXES
               if name not in logical]
    if missing:
        raise ValueError(f"config.sharding_rules has no entry for {missing}, which the "
                         "models use; add (name, None) to keep one whole, or map it to a "
                         "mesh axis")


# Paths a config may name: training reads and writes them in place.
_PATH_KEYS = ("data.train.path", "data.eval.path", "train.init_from", "train.resume",
              "tokenizer.path", "tokenizer.roberta_weights")


def check_local(what: str, path: str) -> None:
    """Refuses a remote (scheme://) path: training reads and writes file-system paths."""
    if "://" in str(path):
        bucket = str(path).split("://", 1)[1].split("/", 1)[0]
        raise ValueError(
            f"{what}={path!r} is not a file-system path: training reads and writes files in "
            f"place, so mount the storage and pass the mount, e.g. `gcsfuse --implicit-dirs "
            f"--rename-dir-limit=100000 {bucket} /mnt/gcs/{bucket}` (checkpoints are "
            f"committed by renaming folders) then /mnt/gcs/{bucket}/...; launch/tpu/tpu.py "
            "mounts the gs:// paths it is given on every worker itself")


def check_paths(config: ml_collections.ConfigDict) -> None:
    """Refuses, up front, a remote path or one the run would fail to read later.

    'previous' (a recipe's stage-1 output) is made by the recipe itself; a data path
    is only read when its source kind reads files.

    Raises:
      ValueError: naming the field and the path.
    """
    unused = {f"data.{w}.path" for w in ("train", "eval")
              if config.data[w].kind in ("", "synthetic")}
    for key in _PATH_KEYS:
        path = init.lookup(config, key)
        if not path:
            continue
        check_local(f"config.{key}", path)
        if path != "previous" and key not in unused and not os.path.exists(path):
            raise ValueError(f"config.{key}={path!r} does not exist (relative paths are "
                             f"read from {os.getcwd()}){_MISSING_PATH_HINTS.get(key, '')}")
    from cacophony_jax.tasks import common

    for name, sub in common.extra_eval_blocks(config):
        path = sub.data.eval.path
        if path:
            check_local(f"config.data.extra_evals ({name})", path)
            if not os.path.exists(path):
                raise ValueError(f"config.data.extra_evals: {sub.data.eval.kind}'s path "
                                 f"{path!r} does not exist (relative paths are read from "
                                 f"{os.getcwd()})")

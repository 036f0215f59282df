"""The optimiser built from config: schedule, SAM, clipping, AdamW, masks, freezing.

The chain, in order of application to a gradient ([...] = only when configured;
the partition only when `freeze` is set; then a `logit_scale` parameter's update is
capped so it stays at most `max_logit_scale`):

    [zero frozen grads, with SAM] -> [sam] -> partition(
        trainable: [MultiSteps]( [clip_by_global_norm] -> adamw(schedule, decay mask) ),
        frozen:    set_to_zero )

- SAM is first so that clipping, AdamW and the masks act on the SAM gradient;
  frozen gradients are zeroed before it so the adversarial step moves only
  trained parameters.
- Accumulation (`MultiSteps`) sits behind SAM: every micro-batch gets its own
  SAM gradient (two gradient evaluations per micro-step), the accumulated mean is
  clipped and applied every `accum_steps` calls. That is one big-batch step when the
  loss is a mean over equal micro-batches; it is not exactly one for the MAE loss
  (a mean over each micro-batch's masked patches, whose counts differ with clip
  lengths), the contrastive loss (no negatives across micro-batches) or SAM (one
  perturbation per micro-batch).
- Frozen parameters get exactly zero updates and AdamW keeps no moments for
  them (`optax.partition` hands them to `set_to_zero`).

Steps are counted in train steps (calls of `tx.update`); with accumulation the
learning rate of an update is the schedule's value at the first micro-step of
its window.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cacophony_jax.optim.sam import sam

SCHEDULES = ("cosine", "linear", "constant")
_TRAINABLE, _FROZEN = "trainable", "frozen"


class OptimizerConfigError(ValueError):
    """A config value the optimiser cannot be built from."""


def param_paths(tree: Any) -> Any:
    """The '/'-joined path of every leaf, e.g. 'params/encoder/block_0/mlp/kernel'.

    Args:
      tree: a parameter pytree (nested dicts).

    Returns:
      A pytree of the same structure with strings as leaves.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), tree
    )


def learning_rate_at(schedule: optax.Schedule, step: int) -> float:
    """The learning rate the schedule gives at a train step, as a Python float.

    Args:
      schedule: the schedule returned by `make_optimizer`.
      step: the train step (0-based count of `tx.update` calls).

    Returns:
      The learning rate.
    """
    return float(schedule(jnp.asarray(step, jnp.int32)))


def _compile(pattern: str, field: str) -> re.Pattern | None:
    if pattern == "":
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise OptimizerConfigError(
            f"config.optim.{field}={pattern!r} is not a valid regular expression "
            f"({err}); fix the pattern"
        ) from None


def _base_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine/linear decay or constant."""
    if cfg.schedule not in SCHEDULES:
        raise OptimizerConfigError(
            f"config.optim.schedule={cfg.schedule!r} is unknown; use one of {SCHEDULES}"
        )
    peak = float(cfg.learning_rate)
    end = peak * float(cfg.min_lr_ratio)
    warmup = int(cfg.warmup_steps)
    if warmup < 0:
        raise OptimizerConfigError(f"config.optim.warmup_steps={warmup} must be >= 0")
    if cfg.schedule != "constant" and total_steps <= warmup:
        raise OptimizerConfigError(
            f"config.train.steps ({total_steps}) must exceed config.optim.warmup_steps "
            f"({warmup}) for a {cfg.schedule} decay; lower the warmup "
            f"(--config.optim.warmup_steps) or train longer (a config argument such as "
            f"configs/mae.py:base,steps=N sets the steps and shortens the warmup to fit)"
        )
    decay_steps = max(total_steps - warmup, 1)
    kind = cfg.schedule

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        ramp = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        elif kind == "linear":
            after = peak + (end - peak) * progress
        else:
            after = jnp.full_like(progress, peak)
        return jnp.where(step < warmup, ramp, after)

    return schedule


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """Builds the optimiser chain and its learning-rate schedule.

    Args:
      cfg: the optimizer config block with fields learning_rate, warmup_steps,
        schedule, min_lr_ratio, b1, b2, eps, weight_decay, clip_norm (0 = off),
        max_logit_scale (ceiling of `logit_scale` parameters; 0 = none),
        decay_exclude (regex on '/'-joined param paths exempt from weight decay;
        "" = none), freeze (regex of params kept fixed; "" = none), accum_steps,
        sam.enabled, sam.rho, sam.adaptive.
      total_steps: number of train steps (calls of `tx.update`) of the run.

    Returns:
      (tx, schedule): `tx.update` must be called with `params` and, always, with
      `grad_fn=lambda p: jax.grad(loss)(p, batch)` (ignored when SAM is off).
      `schedule(step)` is the learning rate applied by the update that train
      step `step` contributes to.
    """
    accum = int(cfg.accum_steps)
    if accum < 1:
        raise OptimizerConfigError(f"config.optim.accum_steps={accum} must be >= 1")
    if total_steps % accum:
        raise OptimizerConfigError(
            f"config.train.steps={total_steps} is not a multiple of config.optim.accum_steps="
            f"{accum}: the last {total_steps % accum} batch(es) would never make an update")
    if cfg.clip_norm < 0:
        raise OptimizerConfigError(f"config.optim.clip_norm={cfg.clip_norm} must be >= 0")
    base = _base_schedule(cfg, total_steps)
    exclude = _compile(cfg.decay_exclude, "decay_exclude")
    freeze = _compile(cfg.freeze, "freeze")

    def decay_mask(params: Any) -> Any:
        return jax.tree.map(
            lambda path: exclude is None or exclude.search(path) is None, param_paths(params)
        )

    # AdamW's step count advances once per real update; map it back to train steps.
    inner = optax.adamw(
        lambda count: base(count * accum),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm > 0:
        inner = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), inner)
    if accum > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=accum).gradient_transformation()

    links = []
    if freeze is not None:
        labels = _freeze_labels(freeze, cfg.freeze)
        inner = optax.partition({_TRAINABLE: inner, _FROZEN: optax.set_to_zero()}, labels)
        if cfg.sam.enabled:
            frozen = lambda params: jax.tree.map(lambda label: label == _FROZEN, labels(params))
            links.append(optax.masked(optax.set_to_zero(), frozen))
    if cfg.sam.enabled:
        links.append(sam(rho=cfg.sam.rho, adaptive=cfg.sam.adaptive))
    tx = optax.chain(*links, inner)
    if cfg.max_logit_scale > 0:
        tx = _with_ceiling(tx, re.compile(r"(^|/)logit_scale$"), float(cfg.max_logit_scale))

    def schedule(step: jax.Array) -> jax.Array:
        return base((jnp.asarray(step) // accum) * accum)

    return tx, schedule


def _with_ceiling(tx: optax.GradientTransformationExtraArgs, pattern: re.Pattern,
                  ceiling: float) -> optax.GradientTransformationExtraArgs:
    """`tx` whose updates never take a parameter matching `pattern` above `ceiling`.

    CLIP clamps its logit scale at ln 100 after every step; this is that clamp as part
    of the update (a value already above is not pulled down). The state is `tx`'s own,
    so checkpoints are the same with or without it."""

    def update(updates, state, params=None, **extra):
        updates, state = tx.update(updates, state, params, **extra)
        if params is None:
            raise ValueError("the logit-scale ceiling needs params in tx.update")

        def cap(path: str, u: jax.Array, p: jax.Array) -> jax.Array:
            if pattern.search(path) is None:
                return u
            return jnp.minimum(u, jnp.maximum(ceiling - p, 0).astype(u.dtype))

        return jax.tree.map(cap, param_paths(params), updates, params), state

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _freeze_labels(pattern: re.Pattern, text: str):
    """Label function for `optax.partition`; refuses a pattern that matches nothing, or
    everything."""

    def labels(params: Any) -> Any:
        paths = param_paths(params)
        tree = jax.tree.map(lambda path: _FROZEN if pattern.search(path) else _TRAINABLE, paths)
        if _FROZEN not in jax.tree.leaves(tree):
            examples = ", ".join(jax.tree.leaves(paths)[:4])
            raise OptimizerConfigError(
                f"config.optim.freeze={text!r} matches no parameter; parameter paths "
                f"look like: {examples}"
            )
        if _TRAINABLE not in jax.tree.leaves(tree):
            raise OptimizerConfigError(
                f"config.optim.freeze={text!r} matches every parameter, so nothing would "
                "train; name the parts to keep fixed (e.g. 'audio_encoder/')")
        return tree

    return labels

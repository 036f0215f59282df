"""Linear probe of frozen embeddings: cross-validated logistic regression accuracy.

For each fold, a multinomial logistic regression is trained on the clips of the other
folds and scored (top-1) on the fold's own clips. Features are standardised with the
training folds' mean and standard deviation; the loss is the mean cross-entropy plus
`l2 / 2 * |W|^2` (the bias is not penalised), minimised full-batch with L-BFGS for a
fixed number of iterations in one jitted function, so the result is deterministic.
Every fold is trained on the same padded array (the held-out clips get weight 0), so
one compilation serves all folds.

This is a quick, comparable number for any bundle, stage 1 (MAE) included; it is not
the HEAR protocol (hear-eval-kit trains an MLP with its own splits and early stopping).
Sets without folds of their own get `seeded_folds`: `DEFAULT_FOLDS` folds, each clip's
fold fixed by a seeded hash of its id and balanced within each class.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_L2 = 1e-3  # weight of the L2 penalty, on standardised features
DEFAULT_STEPS = 100  # L-BFGS iterations per fold
DEFAULT_FOLDS = 5  # folds of a set without its own
DEFAULT_SEED = 0  # seed of those folds' hash


class ProbeInputError(ValueError):
    """Embeddings, labels or folds that a linear probe cannot be trained on."""


def seeded_folds(ids: Sequence[str], labels: Sequence[int], folds: int = DEFAULT_FOLDS,
                 seed: int = DEFAULT_SEED) -> np.ndarray:
    """Fold ids 1..`folds` for clips without folds of their own, stratified by class.

    Within each class, the clips are ordered by a seeded hash of their id and dealt
    round-robin, each class starting where the previous one stopped, so every fold
    gets its share of every class and fold sizes, in distinct clips, differ by at most
    one. A clip's fold depends on its id, the set's other ids and labels, and the seed,
    not on the order the set lists them in (adding or removing clips can move others);
    copies of one id (a clip listed twice) share a fold, so a clip is never trained on
    and scored at once.

    Args:
      ids: one clip id per example.
      labels: one class per example (a repeated id is dealt with its least class).
      folds: folds (at least 2, and at most the number of distinct ids).
      seed: the hash's seed.

    Returns:
      int [len(ids)] fold ids.
    """
    unique: dict[str, int] = {}
    for clip_id, label in zip(ids, labels, strict=True):  # a repeated id: its least class
        unique[str(clip_id)] = min(int(label), unique.get(str(clip_id), int(label)))
    if folds < 2 or len(unique) < folds:
        raise ProbeInputError(f"{len(unique)} distinct clip(s) cannot be split into {folds} "
                              f"folds; the probe needs at least {max(folds, 2)}")

    def key(clip_id: str) -> bytes:
        return hashlib.blake2b(f"{seed}:{clip_id}".encode(), digest_size=8).digest()

    by_class: dict[int, list[str]] = {}
    for clip_id, label in unique.items():
        by_class.setdefault(label, []).append(clip_id)
    fold_of: dict[str, int] = {}
    for label in sorted(by_class):
        for clip_id in sorted(by_class[label], key=key):
            fold_of[clip_id] = len(fold_of) % folds + 1
    return np.asarray([fold_of[str(clip_id)] for clip_id in ids], np.int64)


def _loss(params, x, onehot, weight, l2):
    logits = x @ params["w"] + params["b"]
    nll = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
    return jnp.sum(weight * nll) / jnp.sum(weight) + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_and_predict(x, onehot, weight, l2, steps):
    """Standardises with the weighted (training) rows, fits, predicts every row."""
    total = jnp.sum(weight)
    mean = weight @ x / total
    std = jnp.sqrt(weight @ (x - mean) ** 2 / total)
    x = (x - mean) / jnp.where(std > 1e-6, std, 1.0)  # a constant feature stays 0
    params = {"w": jnp.zeros((x.shape[1], onehot.shape[1])), "b": jnp.zeros(onehot.shape[1])}
    loss = lambda p: _loss(p, x, onehot, weight, l2)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None, length=steps)
    return jnp.argmax(x @ params["w"] + params["b"], axis=-1)


def linear_probe(embeddings: Any, labels: Sequence[int], folds: Sequence[int], *,
                 expected_folds: Sequence[int] | None = None, l2: float = DEFAULT_L2,
                 steps: int = DEFAULT_STEPS) -> dict[str, Any]:
    """Cross-validated top-1 accuracy of a logistic regression on frozen embeddings.

    Args:
      embeddings: float [n, d].
      labels: one integer class per example.
      folds: one integer fold id per example.
      expected_folds: the folds that must each hold examples (e.g. the folds of the
        set that were asked for); None: those present in `folds`.
      l2: weight of the L2 penalty on the (standardised) weights.
      steps: L-BFGS iterations per fold.

    Returns:
      {"probe_top1": mean over folds of the fold accuracies (%), "probe_fold_top1":
       {fold id (str): accuracy (%)}, "probe_examples": n, "probe_classes": distinct
       labels, "probe_l2": l2}.

    Raises:
      ProbeInputError: the embeddings are not a finite [n, d] array; labels or folds
        do not have one integer per example; an expected fold is empty; there are
        fewer than 2 folds; some fold's training part has fewer than 2 classes.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2 or not x.shape[0] or not x.shape[1]:
        raise ProbeInputError(f"probe embeddings must be a non-empty [n, d] array, got "
                              f"shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise ProbeInputError("probe embeddings hold non-finite values (NaN or inf); the "
                              "model produced them: check the bundle and the audio")
    y, f = _ints(labels, "labels", len(x)), _ints(folds, "fold ids", len(x))
    names = sorted(set(f.tolist()) | set(expected_folds or ()))
    empty = [k for k in names if not np.any(f == k)]
    if empty:
        raise ProbeInputError(f"fold(s) {empty} hold no example to score (their clips are "
                              "missing, unreadable or not single-label); put their audio "
                              "back (the warnings above name the clips that were skipped)")
    if len(names) < 2:
        raise ProbeInputError(f"the probe needs at least 2 folds to train on one and test "
                              f"on another; got fold(s) {names}")
    for k in names:
        if len(set(y[f != k].tolist())) < 2:
            raise ProbeInputError(f"training the probe for fold {k} sees fewer than 2 "
                                  "classes in the other folds; the set needs examples of "
                                  "at least 2 classes outside each fold")
    if not (np.isfinite(l2) and l2 >= 0) or int(steps) < 1:
        raise ProbeInputError(f"probe l2 {l2} must be >= 0 and steps {steps} >= 1")
    classes, index = np.unique(y, return_inverse=True)
    onehot = jnp.asarray(np.eye(len(classes), dtype=np.float32)[index])
    features = jnp.asarray(x, jnp.float32)
    accuracy = {}
    for k in names:
        predicted = np.asarray(_fit_and_predict(features, onehot,
                                                jnp.asarray(f != k, jnp.float32),
                                                jnp.float32(l2), int(steps)))
        accuracy[str(k)] = 100.0 * float(np.mean(predicted[f == k] == index[f == k]))
    return {"probe_top1": float(np.mean(list(accuracy.values()))),
            "probe_fold_top1": accuracy, "probe_examples": int(len(x)),
            "probe_classes": int(len(classes)), "probe_l2": float(l2)}


def _ints(values: Sequence[int], what: str, count: int) -> np.ndarray:
    out = np.asarray(values)
    if out.shape != (count,) or not np.issubdtype(out.dtype, np.integer):
        raise ProbeInputError(f"probe {what} must be {count} integers, one per embedding; "
                              f"got shape {out.shape} of {out.dtype}")
    return out.astype(np.int64)


def probe_set(name: str, source: Any, embedded: dict[str, Any]) -> dict[str, Any]:
    """The linear probe of one embedded evaluation set, on its single-label clips.

    Args:
      name: the set's name (for messages).
      source: the set's source; a fold-based layout (ESC-50, UrbanSound8K) has
        `clip_folds` (clip id -> fold) and `folds`, the folds asked for.
      embedded: `benchmark.embed_source`'s result ("audio_emb", "labels", "ids").

    Returns:
      `linear_probe`'s result and "probe_fold_kind": "the set's folds" or, for a set
      without folds, the seeded folds made here; "probe_skipped" clips without
      exactly one label.

    Raises:
      ProbeInputError: the set cannot be probed (see `linear_probe`; no clip with
        exactly one label; too few for `DEFAULT_FOLDS` folds).
    """
    keep = [i for i, labels in enumerate(embedded["labels"]) if len(labels) == 1]
    skipped = len(embedded["labels"]) - len(keep)
    if not keep:
        raise ProbeInputError(f"no clip of {name} has exactly one class label")
    labels = [embedded["labels"][i][0] for i in keep]
    clip_folds = getattr(source, "clip_folds", None)
    kind = "the set's folds" if clip_folds else \
        f"{DEFAULT_FOLDS} folds by a hash of the clip ids with seed {DEFAULT_SEED}, per class"
    expected = list(getattr(source, "folds", None) or ()) if clip_folds else None
    if clip_folds:
        folds = [clip_folds[embedded["ids"][i]] for i in keep]
    else:
        try:
            folds = seeded_folds([embedded["ids"][i] for i in keep], labels)
        except ProbeInputError as e:
            left_out = f" ({skipped} with several or no labels left out)" if skipped else ""
            raise ProbeInputError(f"{name} has {len(keep)} clip(s) with exactly one class "
                                  f"label{left_out}: {e}") from None
    result = linear_probe(embedded["audio_emb"][keep], labels, folds, expected_folds=expected)
    return {**result, "probe_fold_kind": kind, "probe_skipped": skipped}

"""Training losses: masked-patch MSE (stage 1), contrastive + caption (stage 2).

Every loss is written over the GLOBAL batch. Under `jax.jit` with sharded inputs
XLA inserts the collectives, so there are no axis names or `pmean` here. Losses
are computed in float32 whatever the activation dtype.

The contrastive loss can be evaluated in blocks of rows (`chunk_size`) so that a
very large global batch never holds the whole B x B similarity matrix at once;
the blocked path gives the same value and gradients as the plain one.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

# Finite stand-in for -inf: masked logits must not turn 0 * inf into NaN when the
# per-row losses of excluded rows are multiplied by a zero weight.
_MASKED_LOGIT = -1e30
_NORM_EPS = 1e-12
CONTRASTIVE_KINDS = ("softmax", "sigmoid")


def masked_patch_mse(
    pred: jax.Array, target: jax.Array, mask: jax.Array, norm_target: bool = False
) -> jax.Array:
    """Mean squared error over the masked patches (the MAE objective).

    Args:
      pred: [B, N, D] reconstructed patches.
      target: [B, N, D] true patches.
      mask: [B, N] true (or 1) where a patch was masked and is scored.
      norm_target: normalise every target patch by its own mean and variance over
        its D values (eps 1e-6), as in MAE. Like the MAE reference the variance is
        the unbiased one (ddof=1).

    Returns:
      Scalar float32: squared error averaged over D, then over scored patches.
      0 when no patch is scored.
    """
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    if norm_target:
        mean = jnp.mean(target, axis=-1, keepdims=True)
        var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
        target = (target - mean) * lax.rsqrt(var + 1e-6)
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    weight = mask.astype(jnp.float32)
    return jnp.sum(per_patch * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), _NORM_EPS))


def _block_stats(
    logits: jax.Array, row_ids: jax.Array, col_valid: jax.Array, kind: str
) -> tuple[jax.Array, jax.Array]:
    """Per-row statistics of a [c, B] block of logits against all B candidates.

    Returns (row_loss_term, top1_index): for softmax the logsumexp over valid
    candidates; for sigmoid the SigLIP sum over valid candidates of
    -log sigmoid(z * logit) with z = +1 on the matching pair and -1 elsewhere.
    """
    masked = jnp.where(col_valid[None, :] > 0, logits, _MASKED_LOGIT)
    top1 = jnp.argmax(masked, axis=-1)
    if kind == "softmax":
        term = jax.nn.logsumexp(masked, axis=-1)
    else:
        is_pair = row_ids[:, None] == jnp.arange(logits.shape[1])[None, :]
        signed = jnp.where(is_pair, logits, -logits)
        term = jnp.sum(jax.nn.softplus(-signed) * col_valid[None, :], axis=-1)
    return term, top1


def _stats_over_blocks(
    queries: jax.Array,
    keys: jax.Array,
    col_valid: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    kind: str,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """`_block_stats` for every query row, computing `chunk_size` rows at a time."""
    size = queries.shape[0]
    blocks = queries.reshape(size // chunk_size, chunk_size, queries.shape[1])
    starts = jnp.arange(0, size, chunk_size)

    # Rematerialised so the backward pass keeps only each block's inputs, not
    # its [chunk, B] logits: otherwise scan residuals stack back up to B x B.
    @jax.checkpoint
    def one_block(args):
        block, start = args
        logits = scale * (block @ keys.T) + bias
        return _block_stats(logits, start + jnp.arange(chunk_size), col_valid, kind)

    term, top1 = lax.map(one_block, (blocks, starts))
    return term.reshape(size), top1.reshape(size)


def contrastive_loss(
    audio_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    valid: jax.Array | None = None,
    kind: str = "softmax",
    logit_bias: jax.Array | None = None,
    chunk_size: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Audio-text contrastive loss over the global batch; row i of each is a pair.

    Args:
      audio_emb: [B, P] audio embeddings (normalised here).
      text_emb: [B, P] text embeddings (normalised here).
      logit_scale: scalar; logits are exp(logit_scale) * cosine similarity.
      valid: [B] float, 0 on padding rows, which are then neither queries nor
        candidates. None means every row is real.
      kind: "softmax" (symmetric InfoNCE: mean of the audio->text and text->audio
        cross-entropies with the matching pair as target) or "sigmoid" (SigLIP:
        pairwise binary loss, summed over candidates, averaged over queries).
      logit_bias: scalar added to the logits; required for "sigmoid", ignored by
        "softmax" (a constant shift does not change a softmax).
      chunk_size: if > 0, compute the loss in blocks of this many rows (and, for
        the text->audio side, columns); must divide B. 0 computes it in one go.

    Returns:
      (loss, metrics) with metrics `a2t_accuracy` and `t2a_accuracy` (top-1
      within the batch over valid rows), `scale` (= exp(logit_scale)), the two
      directional losses for softmax and `bias` for sigmoid.
    """
    if kind not in CONTRASTIVE_KINDS:
        raise ValueError(f"contrastive kind {kind!r} is unknown; use one of {CONTRASTIVE_KINDS}")
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid contrastive loss needs logit_bias (a scalar parameter)")
    if audio_emb.shape != text_emb.shape or audio_emb.ndim != 2:
        raise ValueError(
            f"audio and text embeddings must both be [B, P]; got {audio_emb.shape} "
            f"and {text_emb.shape}"
        )
    size = audio_emb.shape[0]
    if chunk_size < 0 or (chunk_size and size % chunk_size):
        raise ValueError(
            f"contrastive chunk_size={chunk_size} must be 0 (off) or divide the global "
            f"batch {size}; change the config's chunk size or batch size"
        )
    a = _l2_normalize(audio_emb)
    t = _l2_normalize(text_emb)
    valid = jnp.ones((size,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    bias = jnp.asarray(0.0 if kind == "softmax" else logit_bias, jnp.float32)

    if chunk_size:
        a2t_term, a2t_top1 = _stats_over_blocks(a, t, valid, scale, bias, kind, chunk_size)
        t2a_term, t2a_top1 = _stats_over_blocks(t, a, valid, scale, bias, kind, chunk_size)
    else:
        logits = scale * (a @ t.T) + bias
        rows = jnp.arange(size)
        a2t_term, a2t_top1 = _block_stats(logits, rows, valid, kind)
        t2a_term, t2a_top1 = _block_stats(logits.T, rows, valid, kind)

    count = jnp.maximum(jnp.sum(valid), 1.0)

    def mean_over_valid(x):
        return jnp.sum(x * valid) / count

    rows = jnp.arange(size)
    metrics = {
        "a2t_accuracy": mean_over_valid((a2t_top1 == rows).astype(jnp.float32)),
        "t2a_accuracy": mean_over_valid((t2a_top1 == rows).astype(jnp.float32)),
        "scale": scale,
    }
    if kind == "softmax":
        diag = scale * jnp.sum(a * t, axis=-1)
        metrics["a2t_loss"] = mean_over_valid(a2t_term - diag)
        metrics["t2a_loss"] = mean_over_valid(t2a_term - diag)
        loss = 0.5 * (metrics["a2t_loss"] + metrics["t2a_loss"])
    else:
        # The SigLIP loss is already symmetric: the row pass sums every valid pair.
        loss = mean_over_valid(a2t_term)
        metrics["bias"] = bias
    return loss, metrics


def caption_loss(
    logits: jax.Array, ids: jax.Array, mask: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher-forced next-token cross-entropy of the captioning decoder.

    Args:
      logits: [B, T, V]; position t predicts ids[:, t + 1].
      ids: [B, T] int token ids (bos ... eos pad).
      mask: [B, T] 1 on real tokens; a position whose target is padding is ignored.
      valid: [B] float, 0 on padding rows of the batch. None: all rows real.

    Returns:
      (loss, metrics): mean negative log-likelihood over real target tokens
      (log-softmax in float32), and `token_accuracy` (argmax == target).
    """
    if logits.ndim != 3 or logits.shape[:2] != ids.shape or ids.shape != mask.shape:
        raise ValueError(
            f"caption logits must be [B, T, V] with ids and mask [B, T]; got "
            f"{logits.shape}, {ids.shape}, {mask.shape}"
        )
    logits = logits[:, :-1].astype(jnp.float32)
    targets = ids[:, 1:]
    weight = mask[:, 1:].astype(jnp.float32)
    if valid is not None:
        weight = weight * valid.astype(jnp.float32)[:, None]
    # lse - target logit avoids building a second [B, T, V] float32 array. The target
    # logit is picked by comparing with the vocabulary index, not gathered: the same
    # value exactly (one term, the rest zeros), but its gradient is an elementwise
    # select that fuses with the softmax's, where a gather's is a scatter-add into a
    # [B, T, V] buffer (6.5 GB written and read per step for the base model at batch
    # 256, benchmarks/RESULTS.md section 6).
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    count = jnp.maximum(jnp.sum(weight), 1.0)
    loss = jnp.sum(nll * weight) / count
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return loss, {"token_accuracy": jnp.sum(correct * weight) / count}


def cacophony_loss(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    *,
    contrastive_weight: float,
    caption_weight: float,
    kind: str,
    chunk_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The stage-2 objective: weighted contrastive loss plus caption loss.

    Args:
      outputs: model outputs with `audio_embedding` [B, P], `text_embedding` [B, P],
        `caption_logits` [B, T, V], `logit_scale` (scalar) and, for the sigmoid
        kind, `logit_bias`.
      batch: the device batch with `text_ids`, `text_mask` and `valid`.
      contrastive_weight: weight of the contrastive loss.
      caption_weight: weight of the caption loss.
      kind: "softmax" or "sigmoid" (see `contrastive_loss`).
      chunk_size: rows per block of the contrastive loss; 0 = unblocked.

    Returns:
      (loss, metrics): metrics hold `loss`, `contrastive_loss`, `caption_loss`
      and the metrics of both parts.
    """
    valid = batch["valid"]
    contrastive, c_metrics = contrastive_loss(
        outputs["audio_embedding"],
        outputs["text_embedding"],
        outputs["logit_scale"],
        valid,
        kind=kind,
        logit_bias=outputs.get("logit_bias"),
        chunk_size=chunk_size,
    )
    caption, t_metrics = caption_loss(
        outputs["caption_logits"], batch["text_ids"], batch["text_mask"], valid
    )
    loss = contrastive_weight * contrastive + caption_weight * caption
    metrics = {"loss": loss, "contrastive_loss": contrastive, "caption_loss": caption}
    return loss, {**metrics, **c_metrics, **t_metrics}

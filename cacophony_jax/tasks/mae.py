"""Stage 1 task: masked-autoencoder reconstruction of log-mel patches."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cacophony_jax import losses
from cacophony_jax.audio import frontend, patches
from cacophony_jax.data import pipeline, to_global
from cacophony_jax.models import mae as mae_lib
from cacophony_jax.models import variants
from cacophony_jax.tasks import common

# Evaluation masks are drawn from this fixed key folded with each clip's id, so every
# evaluation masks a clip the same way, whatever its row (the rows of a batch depend on
# the number of processes).
EVAL_MASK_SEED = 1234


class MAETask:
    """Model, features, loss and evaluation of stage 1."""

    name = "mae"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = mae_lib.MAE(config=variants.mae_config(config.model.variant),
                                 **common.runtime_knobs(config.model))
        self.clip_samples = common.clip_samples(config.audio.clip_seconds)
        self.num_patches = patches.num_patches(frontend.num_frames(self.clip_samples))
        self.num_visible = patches.num_visible_for(self.num_patches, config.mae.mask_ratio)

    def init_params(self, rng: jax.Array) -> Any:
        """Boxed (logically partitioned) parameters for one dummy batch."""
        nv, nm = self.num_visible, self.num_patches - self.num_visible
        z = jnp.zeros
        return self.model.init(
            {"params": rng, "dropout": rng},
            z((1, nv, patches.PATCH * patches.PATCH), jnp.float32),
            z((1, nv), jnp.int32), z((1, nv), jnp.int32), jnp.ones((1, nv), bool),
            z((1, nm), jnp.int32), z((1, nm), jnp.int32), jnp.ones((1, nm), bool),
            deterministic=True)["params"]

    def masked_patches(self, batch: dict[str, jax.Array], rng: jax.Array,
                       num_visible: int) -> patches.MaskedPatches:
        """Log-mel -> patches -> MAE masking with `num_visible` visible patches."""
        logmel, frame_valid = frontend.log_mel(
            batch["audio"], batch["audio_len"],
            sub_batches=self.config.audio.frontend_sub_batches)
        p, t, f, m = patches.patchify(logmel, frame_valid)
        m = m & (batch["valid"][:, None] > 0)
        return patches.mae_mask(rng, p, t, f, m, num_visible, self.config.mae.mask_ratio)

    def features(self, batch: dict[str, jax.Array], rng: jax.Array,
                 train: bool) -> patches.MaskedPatches:
        """The training step's device-side features."""
        del train
        return self.masked_patches(batch, rng, self.num_visible)

    def _reconstruct(self, params, feats, rng, deterministic):
        return self.model.apply(
            {"params": params}, feats.visible_patches, feats.visible_time,
            feats.visible_freq, feats.visible_mask, feats.masked_time, feats.masked_freq,
            feats.masked_mask, deterministic=deterministic, rngs={"dropout": rng})

    def loss(self, params, feats, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Masked-patch MSE of the reconstruction."""
        del batch
        recon = self._reconstruct(params, feats, rng, deterministic=False)
        pred = recon[:, self.num_visible:].astype(jnp.float32)
        loss = losses.masked_patch_mse(pred, feats.masked_target, feats.masked_mask,
                                       norm_target=self.config.mae.norm_target)
        return loss, {"loss/mse": loss}

    def evaluator(self, mesh, tokenizer=None,
                  eval_config: ml_collections.ConfigDict | None = None):
        """Returns params -> metrics over the evaluation split, or None.

        `eval_config`: a config whose `data.eval` names the set (default this task's);
        every set evaluated through one task shares its compiled function."""
        del tokenizer
        source = common.open_eval_source(eval_config or self.config)
        if source is None:
            return None
        clip_samples = common.clip_samples(self.config.audio.eval_clip_seconds)
        sums = common.jitted(self, ("eval_sums", clip_samples),
                             lambda: self._eval_sums_fn(clip_samples))

        def evaluate(params) -> dict[str, float]:
            total, count, clips = 0.0, 0.0, 0
            for batch in pipeline.eval_batches(source, clip_samples,
                                               self.config.data.eval_batch_size):
                s, c, v = sums(params, to_global.to_global(batch, mesh))
                total += float(to_global.to_host(s))
                count += float(to_global.to_host(c))
                clips += int(to_global.to_host(v))
            metrics = common.eval_clip_counts(clips, len(source))
            if count:
                metrics["eval/mse"] = total / count
            return metrics

        return evaluate

    def _eval_sums_fn(self, clip_samples: int):
        """jit: (params, global batch) -> (masked-patch squared error sum, masked patch
        count, valid clips)."""
        num_patches = patches.num_patches(frontend.num_frames(clip_samples))
        num_visible = patches.num_visible_for(num_patches, self.config.mae.mask_ratio)
        norm = self.config.mae.norm_target

        def sums(params, batch):
            keys = jax.vmap(jax.random.fold_in, (None, 0))(
                jax.random.key(EVAL_MASK_SEED), jnp.maximum(batch["example_id"], 0))
            feats = self.masked_patches(batch, keys, num_visible)
            recon = self._reconstruct(params, feats, jax.random.PRNGKey(0), True)
            pred = recon[:, num_visible:].astype(jnp.float32)
            count = jnp.sum(feats.masked_mask.astype(jnp.float32))
            mse = losses.masked_patch_mse(pred, feats.masked_target, feats.masked_mask,
                                          norm_target=norm)
            return mse * count, count, jnp.sum(batch["valid"] > 0)

        return jax.jit(sums)

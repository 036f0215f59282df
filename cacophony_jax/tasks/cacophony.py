"""Stage 2 task: contrastive audio-text learning with a captioning decoder."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cacophony_jax import losses
from cacophony_jax.audio import frontend, patches
from cacophony_jax.data import pipeline, to_global
from cacophony_jax.evals import captioning, retrieval, zeroshot
from cacophony_jax.models import cacophony as cacophony_lib
from cacophony_jax.models import decoding, variants
from cacophony_jax.tasks import common


class AudioFeatures(NamedTuple):
    patches: jax.Array  # [B, N, 256]
    time_idx: jax.Array
    freq_idx: jax.Array
    mask: jax.Array


def audio_features(batch: dict[str, jax.Array], rng: jax.Array | None,
                   max_patches: int, sub_batches: int = 1) -> AudioFeatures:
    """Log-mel -> patches (-> patch dropout when `rng` is given), on the device."""
    logmel, frame_valid = frontend.log_mel(batch["audio"], batch["audio_len"],
                                           sub_batches=sub_batches)
    p, t, f, m = patches.patchify(logmel, frame_valid)
    m = m & (batch["valid"][:, None] > 0)
    if rng is not None and 0 < max_patches < p.shape[1]:
        p, t, f, m = patches.patch_dropout(rng, p, t, f, m, max_patches)
    return AudioFeatures(p, t, f, m)


class CacophonyTask:
    """Model, features, loss and evaluation of stage 2."""

    name = "cacophony"

    def __init__(self, config: ml_collections.ConfigDict, vocab_size: int | None = None):
        self.config = config
        overrides = {}
        if config.model.sigmoid_bias:
            overrides["sigmoid_bias"] = True
        model_config = variants.cacophony_config(config.model.variant, **overrides)
        if vocab_size is not None and vocab_size > model_config.text.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but the {config.model.variant!r} "
                f"text tower only {model_config.text.vocab_size}; use a smaller "
                "config.tokenizer.vocab_size or a larger model variant")
        if config.loss.kind == "sigmoid" and not config.model.sigmoid_bias:
            raise ValueError("config.loss.kind='sigmoid' needs config.model.sigmoid_bias=True")
        self.model_config = model_config
        self.model = cacophony_lib.Cacophony(config=model_config,
                                             **common.runtime_knobs(config.model))
        self.clip_samples = common.clip_samples(config.audio.clip_seconds)
        self.num_patches = patches.num_patches(frontend.num_frames(self.clip_samples))
        self.text_length = config.data.text_length
        if self.text_length > model_config.text.max_positions:
            raise ValueError(
                f"config.data.text_length={self.text_length} exceeds the text tower's "
                f"{model_config.text.max_positions} positions")

    def init_params(self, rng: jax.Array) -> Any:
        """Boxed (logically partitioned) parameters for one dummy batch."""
        n, t = self.num_patches, self.text_length
        return self.model.init(
            {"params": rng, "dropout": rng},
            jnp.zeros((1, n, patches.PATCH * patches.PATCH), jnp.float32),
            jnp.zeros((1, n), jnp.int32), jnp.zeros((1, n), jnp.int32),
            jnp.ones((1, n), bool), jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), jnp.int32),
            deterministic=True)["params"]

    def features(self, batch, rng, train: bool) -> AudioFeatures:
        """Audio features; patch dropout only in training."""
        audio = self.config.audio
        return audio_features(batch, rng if train else None, audio.max_patches,
                              audio.frontend_sub_batches)

    def loss(self, params, feats: AudioFeatures, batch, rng):
        """Weighted contrastive + captioning loss over the global batch."""
        outputs = self.model.apply(
            {"params": params}, feats.patches, feats.time_idx, feats.freq_idx, feats.mask,
            batch["text_ids"], batch["text_mask"], deterministic=False,
            rngs={"dropout": rng})
        cfg = self.config.loss
        loss, parts = losses.cacophony_loss(
            outputs, batch, contrastive_weight=cfg.contrastive_weight,
            caption_weight=cfg.caption_weight, kind=cfg.kind, chunk_size=cfg.chunk_size)
        named = {"loss/contrastive": parts.pop("contrastive_loss"),
                 "loss/caption": parts.pop("caption_loss")}
        parts.pop("loss", None)
        named.update({f"train/{k}": v for k, v in parts.items()})
        return loss, named

    # -- evaluation ---------------------------------------------------------------

    def embed_audio_fn(self):
        """jit: (params, global audio batch) -> audio embeddings [B, P] (one function per
        task, so every evaluation set of a run shares its compilations)."""
        return common.jitted(self, "embed_audio", self._embed_audio_fn)

    def embed_text_fn(self):
        """jit: (params, global text batch) -> text embeddings [B, P] (one per task)."""
        return common.jitted(self, "embed_text", self._embed_text_fn)

    def embed_and_caption_fn(self, max_len: int, tokenizer: Any = None):
        """jit: (params, global audio batch) -> (audio embeddings [B, P], greedy caption
        ids [B, max_len]), encoding the audio once for both (one per task and max_len);
        with `tokenizer`, only ids it can decode are generated."""
        limits = ({} if tokenizer is None else
                  {"vocab_size": tokenizer.vocab_size, "banned": tokenizer.never_generated})
        return common.jitted(self, ("embed_and_caption", max_len, *limits.items()),
                             lambda: self._embed_and_caption_fn(max_len, limits))

    def _embed_audio_fn(self):
        def embed(params, batch):
            feats = audio_features(batch, None, 0, self.config.audio.frontend_sub_batches)
            _, emb = self.model.apply({"params": params}, *feats,
                                      method=cacophony_lib.Cacophony.encode_audio)
            return emb.astype(jnp.float32)
        return jax.jit(embed)

    def _embed_text_fn(self):
        def embed(params, batch):
            _, emb = self.model.apply({"params": params}, batch["text_ids"],
                                      batch["text_mask"],
                                      method=cacophony_lib.Cacophony.encode_text)
            return emb.astype(jnp.float32)
        return jax.jit(embed)

    def _embed_and_caption_fn(self, max_len: int, limits: dict[str, Any]):
        def embed_and_caption(params, batch):
            feats = audio_features(batch, None, 0, self.config.audio.frontend_sub_batches)
            states, emb = self.model.apply({"params": params}, *feats,
                                           method=cacophony_lib.Cacophony.encode_audio)
            ids = decoding.generate(self.model, params, states, feats.mask,
                                    method="greedy", max_len=max_len, **limits)
            return emb.astype(jnp.float32), ids
        return jax.jit(embed_and_caption)

    def evaluator(self, mesh, tokenizer, eval_config: ml_collections.ConfigDict | None = None):
        """Returns params -> retrieval and zero-shot metrics, or None without eval data.

        `eval_config`: a config whose `data.eval` names the set (default this task's);
        every set evaluated through one task shares its compiled functions."""
        source = common.open_eval_source(eval_config or self.config)
        if source is None:
            return None
        texts = pipeline.eval_texts(source)
        embed_audio, embed_text = self.embed_audio_fn(), self.embed_text_fn()
        clip_samples = common.clip_samples(self.config.audio.eval_clip_seconds)
        batch_size = self.config.data.eval_batch_size

        def embed_texts(params, captions):
            rows = []
            for batch in pipeline.text_batches(captions, tokenizer, self.text_length,
                                               batch_size):
                g = to_global.to_global(batch, mesh)
                rows.append(to_global.to_host(embed_text(params, g)))
            return np.concatenate(rows)[:len(captions)]

        caption_clips = self.config.eval.caption_clips
        embed_and_caption = (self.embed_and_caption_fn(
            self.config.eval.caption_max_len or self.config.data.text_length, tokenizer)
                             if caption_clips else None)

        def evaluate(params) -> dict[str, float]:
            audio, predictions = None, {}
            seen = np.zeros(len(source), bool)  # clips that decoded
            for batch in pipeline.eval_batches(source, clip_samples, batch_size):
                g = to_global.to_global(batch, mesh)
                ids = to_global.to_host(g["example_id"])
                valid = to_global.to_host(g["valid"]) > 0
                if embed_and_caption is not None and len(predictions) < caption_clips:
                    emb, tokens = embed_and_caption(params, g)
                    texts_out = tokenizer.captions(to_global.to_host(tokens))
                    for i in np.flatnonzero(valid):
                        predictions[int(ids[i])] = texts_out[i]
                else:
                    emb = embed_audio(params, g)
                emb = to_global.to_host(emb)
                if audio is None:
                    audio = np.zeros((len(source), emb.shape[-1]), np.float32)
                audio[ids[valid]] = emb[valid]
                seen[ids[valid]] = True
            keep = np.flatnonzero(seen)
            metrics = common.eval_clip_counts(len(keep), len(source))
            if not len(keep):
                return metrics
            # Unreadable clips and their captions are left out of retrieval and zero-shot.
            used = texts.subset(keep)
            audio = audio[keep]
            if predictions:
                metrics.update(caption_scores(predictions, texts))
            if used.captions:
                text_emb = embed_texts(params, used.captions)
                r = retrieval.retrieval_metrics(audio, text_emb, used.caption_clip)
                metrics.update({f"eval/{k}": v for k, v in r.items()})
            if used.class_names and any(used.labels):
                class_emb = embed_texts(params, zeroshot.prompts_for(used.class_names))
                z = zeroshot.zeroshot_metrics(audio, class_emb, used.labels)
                metrics.update({f"eval/zeroshot_{k}": v for k, v in z.items()})
                metrics["eval/num_classes"] = float(len(texts.class_names))
            return metrics

        return evaluate


def caption_scores(predictions: dict[int, str], texts: pipeline.EvalTexts) -> dict[str, float]:
    """BLEU/ROUGE-L/CIDEr-D against each clip's captions, and how often a generated
    caption names one of the clip's classes (in percent)."""
    references: dict[int, list[str]] = {}
    for caption, clip in zip(texts.captions, texts.caption_clip, strict=True):
        references.setdefault(int(clip), []).append(caption)
    keys = [k for k in sorted(predictions) if k in references]
    out = {}
    if keys:
        scores = captioning.caption_metrics({str(k): predictions[k] for k in keys},
                                            {str(k): references[k] for k in keys})
        out.update({f"eval/caption_{k}": v for k, v in scores.items()})
    labelled = [k for k in sorted(predictions) if texts.labels[k]]
    if labelled and texts.class_names:
        rate = captioning.class_mention_rate(
            [predictions[k] for k in labelled],
            [[texts.class_names[c] for c in texts.labels[k]] for k in labelled])
        out["eval/caption_names_class"] = 100.0 * rate
    examples = sorted(predictions)[:3]
    logging.info("example captions: %s", " | ".join(
        f"{predictions[k]!r} (ref: {references.get(k, [''])[0]!r})" for k in examples))
    return out

"""Import the released Cacophony (stage 2) and AudioMAE (stage 1) checkpoints.

A release file is one legacy Flax msgpack blob, ``{'0': {'params': tree}}``. Its
audio side is unrolled per layer (``AudioEncoderLayer_i``); its text side is a
Hugging Face Flax RoBERTa with the layers scanned (a leading layer axis). Sizes are
read from the shapes, so the base release and the tiny test fixtures both load.
Attention heads of the text tower and of the audio pool cannot be read from
shapes; they come from the named variant with the same sizes unless given
(``text_heads=`` / ``pool_heads=``; the export command's ``--text-heads`` /
``--pool-heads``). A file with NaN or infinite weights (a damaged download) is
refused.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import serialization

from cacophony_jax.convert import layout
from cacophony_jax.convert.layout import (
    HF_TEXT_LAYER,
    Params,
    Spec,
    add_copy,
    hf_text_embeddings_spec,
    hf_text_layer_spec,
)
from cacophony_jax.models.cacophony import Cacophony, cacophony_init_inputs
from cacophony_jax.models.mae import MAE, mae_init_inputs
from cacophony_jax.models.stack import stack_layers
from cacophony_jax.models.variants import (
    AudioEncoderConfig,
    CacophonyConfig,
    MAEConfig,
    MAEDecoderConfig,
    TextConfig,
    variant_pool_heads,
    variant_text_heads,
)

STAGE2_ROOTS = ("audio_attention_pool", "audio_module", "decoder_module", "logit_scale",
                "text_module", "text_proj")
STAGE1_ROOTS = ("AudioDecoder_0", "AudioEncoder_0")


class OfficialCheckpointError(ValueError):
    """A file that is not a usable official checkpoint (says what is wrong and what to do)."""


def read_flat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a release msgpack file into {"a/b/c": array}.

    Args:
      path: the checkpoint file.

    Returns:
      The parameter tree, flattened with "/"-joined keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OfficialCheckpointError(f"official checkpoint {path!r} does not exist; "
                                      "pass the path of Cacophony.ckpt or AudioMAE.ckpt")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise OfficialCheckpointError(
            f"{path!r} is not a Flax msgpack checkpoint ({type(e).__name__}); the official "
            "release files are Cacophony.ckpt (stage 2) and AudioMAE.ckpt (stage 1)") from None
    if isinstance(tree, dict) and set(tree) == {"0"}:
        tree = tree["0"]
    if isinstance(tree, dict) and "params" in tree:
        tree = tree["params"]
    if not isinstance(tree, dict):
        raise OfficialCheckpointError(f"{path!r} holds no parameter tree")
    flat = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat["/".join(str(k.key) for k in key_path)] = np.asarray(leaf)
    bad = [key for key, a in flat.items()
           if jnp.issubdtype(a.dtype, jnp.inexact) and not np.isfinite(
               a.astype(np.float32) if a.dtype.itemsize < 4 else a).all()]
    if bad:
        # A flipped byte in a weight reads as NaN or inf: the model would give NaNs.
        raise OfficialCheckpointError(
            f"{path!r} is damaged: NaN or infinite values in {len(bad)} of its arrays "
            f"({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); download it again")
    return flat


def check_stage(flat: Mapping[str, np.ndarray], path: str, stage: int) -> None:
    """Raises OfficialCheckpointError unless `flat` (`read_flat`) is a stage-`stage` release
    (1: AudioMAE, 2: Cacophony); the message names what the file is instead."""
    roots = {k.split("/")[0] for k in flat}
    if stage == 2 and roots & set(STAGE1_ROOTS) and not roots & {"text_module"}:
        raise OfficialCheckpointError(
            f"{path!r} is a stage-1 AudioMAE checkpoint; load it with load_official_mae")
    if stage == 1 and roots & {"text_module", "audio_module"}:
        raise OfficialCheckpointError(
            f"{path!r} is a stage-2 Cacophony checkpoint; load it with load_official_cacophony")
    expected = STAGE2_ROOTS if stage == 2 else STAGE1_ROOTS
    if not roots & set(expected):
        raise OfficialCheckpointError(
            f"{path!r} is not an official {'Cacophony' if stage == 2 else 'AudioMAE'} "
            f"checkpoint: top-level keys {sorted(roots)}, expected {list(expected)}")


class _Shapes:
    """Reads sizes from a flat tree, remembering which needed keys were absent."""

    def __init__(self, flat: Mapping[str, np.ndarray]):
        self.flat = flat
        self.absent: list[str] = []

    def __call__(self, key: str, dim: int) -> int:
        if key not in self.flat or self.flat[key].ndim <= dim:
            self.absent.append(key)
            return 1
        return int(self.flat[key].shape[dim])

    def count(self, prefix: str) -> int:
        """Number of consecutive ``prefix{i}/`` groups."""
        n = 0
        while any(k.startswith(f"{prefix}{n}/") for k in self.flat):
            n += 1
        return n

    def done(self, path: str) -> None:
        if self.absent:
            raise OfficialCheckpointError(
                f"{path!r}: cannot read model sizes, missing or mis-shaped keys "
                f"{sorted(set(self.absent))}")


def _audio_sizes(shapes: _Shapes, prefix: str) -> dict[str, int]:
    layer = f"{prefix}/AudioEncoderLayer_0"
    return dict(
        hidden=shapes(f"{prefix}/Dense_0/kernel", 1),
        layers=shapes.count(f"{prefix}/AudioEncoderLayer_"),
        heads=shapes(f"{layer}/MultiHeadDotProductAttention_0/query/kernel", 1),
        mlp=shapes(f"{layer}/MLP_0/Dense_0/kernel", 1),
        patch_dim=shapes(f"{prefix}/Dense_0/kernel", 0),
        freq_patches=shapes(f"{prefix}/freq_positional_embedding", 0),
    )


def _heads(given: int | None, found: int | None, hidden: int, what: str, arg: str,
           path: str) -> int:
    """The head count given, else the named variant's (`found`), checked against the
    width `hidden` the heads split."""
    flag = f"--{arg.replace('_', '-')}"
    if given is None and found is None:
        raise OfficialCheckpointError(
            f"the {what} head count cannot be read from {path!r} (shapes do not tell it) and "
            f"no named variant has its sizes; pass it: {flag} N on the export command "
            f"({arg}=N in Python), N dividing the width {hidden}")
    heads = found if given is None else given
    whole = isinstance(heads, numbers.Integral) and not isinstance(heads, bool)
    if not whole or heads < 1 or hidden % heads:
        raise OfficialCheckpointError(
            f"{flag} {heads!r} ({arg}=) must be a whole number dividing the {what} width "
            f"{hidden} of {path!r}; pass the head count the model was trained with")
    return int(heads)


def _audio_spec(prefix: str, ours: tuple[str, ...], cfg: AudioEncoderConfig | MAEDecoderConfig,
                block_heads: int) -> Spec:
    """Blocks of the audio form (encoder and MAE decoder): names differ, shapes agree."""
    d, hd = cfg.hidden, cfg.hidden // block_heads
    spec: Spec = {}
    same = lambda key, shape, *target: add_copy(spec, key, shape, *ours, *target)

    for i in range(cfg.layers):
        lp, blk = f"{prefix}/AudioEncoderLayer_{i}", f"block_{i}"
        for j, norm in enumerate(("attn_norm", "mlp_norm")):
            for p in ("scale", "bias"):
                same(f"{lp}/LayerNorm_{j}/{p}", (d,), blk, norm, p)
        mha = f"{lp}/MultiHeadDotProductAttention_0"
        for p in ("query", "key", "value"):
            same(f"{mha}/{p}/kernel", (d, block_heads, hd), blk, "attn", p, "kernel")
            same(f"{mha}/{p}/bias", (block_heads, hd), blk, "attn", p, "bias")
        same(f"{mha}/out/kernel", (block_heads, hd, d), blk, "attn", "out", "kernel")
        same(f"{mha}/out/bias", (d,), blk, "attn", "out", "bias")
        for j, (w, shape) in enumerate((("wi", (d, cfg.mlp)), ("wo", (cfg.mlp, d)))):
            same(f"{lp}/MLP_0/Dense_{j}/kernel", shape, blk, "mlp", w, "kernel")
            same(f"{lp}/MLP_0/Dense_{j}/bias", (shape[1],), blk, "mlp", w, "bias")
    for p in ("scale", "bias"):
        same(f"{prefix}/LayerNorm_0/{p}", (d,), "final_norm", p)
    return spec


def _encoder_spec(prefix: str, ours: tuple[str, ...], cfg: AudioEncoderConfig) -> Spec:
    spec = _audio_spec(prefix, ours, cfg, cfg.heads)
    d = cfg.hidden
    add_copy(spec, f"{prefix}/Dense_0/kernel", (cfg.patch_dim, d), *ours, "patch_embed", "kernel")
    add_copy(spec, f"{prefix}/Dense_0/bias", (d,), *ours, "patch_embed", "bias")
    add_copy(spec, f"{prefix}/freq_positional_embedding", (cfg.freq_patches, d), *ours,
          "positions", "freq_table")
    return spec


def _convert(flat: Mapping[str, np.ndarray], spec: Spec, path: str) -> Params:
    """Checks every key and shape against ``spec`` and builds our (unrolled) tree."""
    problems = layout.mismatches(flat, spec)
    if problems:
        raise OfficialCheckpointError(
            f"{path!r} does not match the official layout; " + "; ".join(problems))
    return layout.convert(flat, spec)


def _finish(params: Params, model: nn.Module, inputs: tuple, scan: bool) -> Params:
    """Stacks layers when scanning and checks the tree against the model's own."""
    if scan:
        params = stack_layers(params)
    abstract = nn.unbox(jax.eval_shape(model.init, {"params": jax.random.key(0)}, *inputs))
    want = jax.tree.map(lambda s: s.shape, abstract["params"])
    got = jax.tree.map(np.shape, params)
    if want != got:
        raise AssertionError(f"converted tree differs from the model's: {got} vs {want}")
    return params


def load_official_cacophony(
    path: str | os.PathLike,
    *,
    scan: bool = False,
    text_heads: int | None = None,
    pool_heads: int | None = None,
) -> tuple[CacophonyConfig, Params]:
    """Loads a released stage-2 Cacophony checkpoint onto ``Cacophony``'s tree.

    Args:
      path: the ``.ckpt`` file.
      scan: produce the scanned layout (``Cacophony(..., scan=True)``).
      text_heads: text-tower heads, when no named variant has the file's sizes.
      pool_heads: audio attention-pool heads, likewise.

    Returns:
      (config, params): plain float32 numpy arrays for ``{"params": params}``.
    """
    name = os.fspath(path)
    flat = read_flat(name)
    check_stage(flat, name, 2)
    shapes = _Shapes(flat)
    audio_sizes = _audio_sizes(shapes, "audio_module")
    emb, layer = "text_module/embeddings", f"text_module/{HF_TEXT_LAYER}"
    hidden, vocab = shapes(f"{emb}/word_embeddings/embedding", 1), \
        shapes(f"{emb}/word_embeddings/embedding", 0)
    layers = shapes(f"{layer}/attention/self/query/kernel", 0)
    text = dict(vocab_size=vocab, hidden=hidden, layers=layers,
                mlp=shapes(f"{layer}/intermediate/dense/kernel", 2),
                max_positions=shapes(f"{emb}/position_embeddings/embedding", 0))
    decoder_layers = shapes(f"decoder_module/{HF_TEXT_LAYER}/attention/self/query/kernel", 0)
    projection = shapes("text_proj/kernel", 1)
    shapes.done(name)
    audio = AudioEncoderConfig(**audio_sizes)
    config = CacophonyConfig(
        audio=audio,
        text=TextConfig(heads=_heads(text_heads, variant_text_heads(hidden, layers, vocab),
                                     hidden, "text tower", "text_heads", name), **text),
        decoder_layers=decoder_layers,
        audio_pool_heads=_heads(pool_heads, variant_pool_heads(audio.hidden), audio.hidden,
                                "audio pool", "pool_heads", name),
        projection=projection,
    )
    params = _convert(flat, _cacophony_spec(config), name)
    return config, _finish(params, Cacophony(config, scan=scan), cacophony_init_inputs(config),
                           scan)


def _cacophony_spec(cfg: CacophonyConfig) -> Spec:
    d, h, pool_h = cfg.audio.hidden, cfg.text.hidden, cfg.audio_pool_heads
    spec = _encoder_spec("audio_module", ("audio_encoder",), cfg.audio)
    spec.update(hf_text_embeddings_spec("text_module/embeddings", ("text_encoder",), cfg.text))
    spec.update(hf_text_layer_spec(f"text_module/{HF_TEXT_LAYER}", ("text_encoder",), cfg.text,
                                   cfg.text.layers, cross=False))
    spec.update(hf_text_layer_spec(f"decoder_module/{HF_TEXT_LAYER}", ("decoder",), cfg.text,
                                   cfg.decoder_layers, cross=True))
    copy = lambda key, shape, *target: add_copy(spec, key, shape, *target)
    heads = (pool_h, d // pool_h)
    # The release's single k/v Dense puts the keys in the first half of its outputs.
    copy("audio_attention_pool/query", (d,), "audio_pool", "query")
    spec["audio_attention_pool/Dense_0/kernel"] = ((d, 2 * d), lambda a: {
        ("audio_pool", "key", "kernel"): a[:, :d].reshape(d, *heads),
        ("audio_pool", "value", "kernel"): a[:, d:].reshape(d, *heads)})
    spec["audio_attention_pool/Dense_0/bias"] = ((2 * d,), lambda a: {
        ("audio_pool", "key", "bias"): a[:d].reshape(heads),
        ("audio_pool", "value", "bias"): a[d:].reshape(heads)})
    copy("audio_attention_pool/Dense_1/kernel", (d, cfg.projection), "audio_pool", "out", "kernel")
    copy("audio_attention_pool/Dense_1/bias", (cfg.projection,), "audio_pool", "out", "bias")
    tp = "text_module/pooler"
    spec[f"{tp}/attention_pool_query"] = ((1, h), lambda a: {("text_pool", "query"): a.reshape(h)})
    for theirs, ours in (("key_proj", "key"), ("value_proj", "value")):
        spec[f"{tp}/{theirs}/kernel"] = ((h, h), lambda a, o=ours: {
            ("text_pool", o, "kernel"): a.reshape(h, 1, h)})
        spec[f"{tp}/{theirs}/bias"] = ((h,), lambda a, o=ours: {
            ("text_pool", o, "bias"): a.reshape(1, h)})
    copy("text_proj/kernel", (h, cfg.projection), "text_proj", "kernel")
    copy("text_proj/bias", (cfg.projection,), "text_proj", "bias")
    vocab = cfg.text.vocab_size
    copy("decoder_module/decoder_proj/kernel", (h, vocab), "decoder", "logits", "kernel")
    copy("decoder_module/decoder_proj/bias", (vocab,), "decoder", "logits", "bias")
    copy("logit_scale", (), "logit_scale")
    return spec


def load_official_mae(path: str | os.PathLike, *, scan: bool = False) -> tuple[MAEConfig, Params]:
    """Loads a released stage-1 AudioMAE checkpoint onto ``MAE``'s tree.

    Args:
      path: the ``.ckpt`` file.
      scan: produce the scanned layout (``MAE(..., scan=True)``).

    Returns:
      (config, params): plain float32 numpy arrays for ``{"params": params}``.
    """
    name = os.fspath(path)
    flat = read_flat(name)
    check_stage(flat, name, 1)
    shapes = _Shapes(flat)
    encoder_sizes = _audio_sizes(shapes, "AudioEncoder_0")
    dec = "AudioDecoder_0"
    decoder_sizes = _audio_sizes(shapes, dec)
    shapes.done(name)
    encoder = AudioEncoderConfig(**encoder_sizes)
    decoder = MAEDecoderConfig(**{k: decoder_sizes[k] for k in ("hidden", "layers", "heads",
                                                                 "mlp")})
    config = MAEConfig(encoder=encoder, decoder=decoder)
    spec = _encoder_spec("AudioEncoder_0", ("encoder",), encoder)
    spec.update(_audio_spec(dec, ("decoder",), decoder, decoder.heads))
    dd, patch = decoder.hidden, encoder.patch_dim
    add_copy(spec, f"{dec}/Dense_0/kernel", (encoder.hidden, dd), "decoder", "embed", "kernel")
    add_copy(spec, f"{dec}/Dense_0/bias", (dd,), "decoder", "embed", "bias")
    add_copy(spec, f"{dec}/Dense_1/kernel", (dd, patch), "decoder", "head", "kernel")
    add_copy(spec, f"{dec}/Dense_1/bias", (patch,), "decoder", "head", "bias")
    add_copy(spec, f"{dec}/freq_positional_embedding", (encoder.freq_patches, dd), "decoder",
          "positions", "freq_table")
    add_copy(spec, f"{dec}/restore_patch", (dd,), "decoder", "mask_token")
    params = _convert(flat, spec, name)
    return config, _finish(params, MAE(config, scan=scan), mae_init_inputs(config), scan)

"""Key-by-key conversion of a flat checkpoint onto our parameter tree, and the layout of
Hugging Face Flax RoBERTa (embeddings and a scanned layer stack) shared by the release
import (`convert.official`) and the RoBERTa import (`convert.roberta`).

A `Spec` maps each key of a flat checkpoint ("a/b/c") to its expected shape and a
converter that turns the array into {our path: array} entries; `mismatches` lists what
does not fit and `convert` builds our (unrolled, ``block_i``) tree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cacophony_jax.models.variants import TextConfig

Params = dict[str, Any]
# official key -> (expected shape, converter to {our path: array})
Spec = dict[str, tuple[tuple[int, ...], Callable[[np.ndarray], dict[tuple[str, ...], Any]]]]

# Where a Flax RoBERTa keeps its scanned layer stack, below the model's root.
HF_TEXT_LAYER = "encoder/layer/ScanFlaxRobertaLayer_0"


def add_copy(spec: Spec, key: str, shape: tuple[int, ...], *target: str) -> None:
    """Adds an entry that copies the array unchanged to our path ``target``.

    Args:
      spec: the spec to extend.
      key: the checkpoint key.
      shape: its expected shape.
      *target: our path.
    """
    spec[key] = (shape, lambda a: {target: a})


def hf_text_layer_spec(prefix: str, ours: tuple[str, ...], cfg: TextConfig, layers: int,
                       cross: bool) -> Spec:
    """Spec of a scanned Hugging Face Flax RoBERTa layer stack ([L, ...] leaves).

    Args:
      prefix: official key prefix of the stack (ends in ``ScanFlaxRobertaLayer_0``).
      ours: our path of the tower holding ``block_i``.
      cfg: text sizes.
      layers: depth of this stack.
      cross: whether the layers have cross-attention (the captioning decoder).

    Returns:
      {official key: (shape, converter to our per-layer paths)}.
    """
    h, heads, m = cfg.hidden, cfg.heads, cfg.mlp
    hd = h // heads
    groups = [("attention", "attn", "attn_norm")]
    if cross:
        groups.append(("crossattention", "cross_attn", "cross_norm"))
    # their suffix -> (their per-layer shape, our path in the block, our shape)
    table: dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...]]] = {}
    for theirs, attn, norm in groups:
        for proj in ("query", "key", "value"):
            table[f"{theirs}/self/{proj}/kernel"] = ((h, h), (attn, proj, "kernel"), (h, heads, hd))
            table[f"{theirs}/self/{proj}/bias"] = ((h,), (attn, proj, "bias"), (heads, hd))
        table[f"{theirs}/output/dense/kernel"] = ((h, h), (attn, "out", "kernel"), (heads, hd, h))
        table[f"{theirs}/output/dense/bias"] = ((h,), (attn, "out", "bias"), (h,))
        for p in ("scale", "bias"):
            table[f"{theirs}/output/LayerNorm/{p}"] = ((h,), (norm, p), (h,))
    for theirs, w, d_in, d_out in (("intermediate", "wi", h, m), ("output", "wo", m, h)):
        table[f"{theirs}/dense/kernel"] = ((d_in, d_out), ("mlp", w, "kernel"), (d_in, d_out))
        table[f"{theirs}/dense/bias"] = ((d_out,), ("mlp", w, "bias"), (d_out,))
    for p in ("scale", "bias"):
        table[f"output/LayerNorm/{p}"] = ((h,), ("mlp_norm", p), (h,))

    def split(target: tuple[str, ...], shape: tuple[int, ...]) -> Callable:
        return lambda a: {ours + (f"block_{i}",) + target: a[i].reshape(shape)
                          for i in range(layers)}

    return {f"{prefix}/{k}": ((layers, *shape), split(target, new))
            for k, (shape, target, new) in table.items()}


def hf_text_embeddings_spec(prefix: str, ours: tuple[str, ...], cfg: TextConfig) -> Spec:
    """Spec of Hugging Face Flax RoBERTa embeddings (word, position, type, LayerNorm).

    Args:
      prefix: official key prefix (ends in ``embeddings``).
      ours: our path of the text tower.
      cfg: text sizes.

    Returns:
      {official key: (shape, converter)}.
    """
    h = cfg.hidden
    spec: Spec = {f"{prefix}/token_type_embeddings/embedding": (
        (1, h), lambda a: {ours + ("type_embed",): a.reshape(h)})}
    add_copy(spec, f"{prefix}/word_embeddings/embedding", (cfg.vocab_size, h), *ours,
          "token_embed", "embedding")
    add_copy(spec, f"{prefix}/position_embeddings/embedding", (cfg.max_positions, h), *ours,
          "position_embed", "embedding")
    for p in ("scale", "bias"):
        add_copy(spec, f"{prefix}/LayerNorm/{p}", (h,), *ours, "embed_norm", p)
    return spec


def mismatches(flat: Mapping[str, np.ndarray], spec: Spec) -> list[str]:
    """What keeps ``flat`` from fitting ``spec``: missing, unknown and mis-shaped keys.

    Args:
      flat: the checkpoint, flattened.
      spec: what it must hold.

    Returns:
      One "missing: [...]", "unknown: [...]" or "mis-shaped: [...]" part per kind of
      problem (empty when it fits).
    """
    missing = sorted(set(spec) - set(flat))
    unknown = sorted(set(flat) - set(spec))
    misshaped = sorted(f"{k} {tuple(flat[k].shape)} (expected {spec[k][0]})"
                       for k in set(spec) & set(flat) if tuple(flat[k].shape) != spec[k][0])
    return [f"{name}: {keys}" for name, keys in
            (("missing", missing), ("unknown", unknown), ("mis-shaped", misshaped)) if keys]


def _nest(items: Iterator[tuple[tuple[str, ...], np.ndarray]]) -> Params:
    tree: Params = {}
    for path, value in items:
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = np.asarray(value, np.float32)
    return tree


def convert(flat: Mapping[str, np.ndarray], spec: Spec) -> Params:
    """Builds our parameter tree from a checkpoint that fits ``spec`` (see `mismatches`).

    Args:
      flat: the checkpoint, flattened.
      spec: its conversion.

    Returns:
      Our parameter tree (float32 numpy arrays) with unrolled ``block_i`` stacks.
    """
    return _nest((p, v) for k, (_, fn) in spec.items() for p, v in fn(flat[k]).items())

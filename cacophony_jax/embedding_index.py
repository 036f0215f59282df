"""The embedding index: audio embeddings of many files in one .npz, searchable by text.

Written by ``cli embed``, read by ``cli search``. Arrays of the file:

    paths       str [n]        absolute paths of the embedded files
    embeddings  float32 [n, P] unit-length audio embeddings
    bundle      str            JSON: {"path", "fingerprint", "tokenizer", "kind",
                               "embedding_size"} of the bundle that embedded them

Embeddings of different bundles live in different spaces, so a search checks that
its bundle is the one the index was built with (`check_bundle`), by the content of
the bundle's own files (`bundle_fingerprint`), not by path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cacophony_jax import atomic_write

INDEX_KEYS = ("paths", "embeddings", "bundle")
_NPZ_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive


class IndexFileError(ValueError):
    """An index that is missing, damaged, or does not fit the bundle; says the fix."""


# The files that make a bundle (convert/bundle.py: BUNDLE_JSON, PARAMS_DIR,
# TOKENIZER_JSON; not imported, as that module loads JAX). Anything else put into a
# bundle's folder (a README, .DS_Store, eval results) does not change the model.
BUNDLE_PARTS = ("bundle.json", "params", "tokenizer.json")


def _is_bundle_file(relative: str) -> bool:
    parts = relative.split(os.sep)
    return parts[0] in BUNDLE_PARTS and not any(p.startswith(".") for p in parts)


def bundle_fingerprint(bundle: str, *, every_file: bool = False) -> str:
    """SHA-256 (first 16 hex digits) over a bundle's own files: names and contents.

    The files hashed are bundle.json, tokenizer.json and those in params/ (hidden ones
    such as .DS_Store excepted), so other files put into the folder change nothing.
    For a bundle holding only its own files the value is the one earlier versions
    gave (they hashed every file of the folder).

    Args:
      bundle: the bundle folder (or a single file).
      every_file: hash every file of the folder, as earlier versions did (a folder
        without bundle.json is always hashed whole).

    Returns:
      The fingerprint; equal bundles (also copies) give equal values.
    """
    digest = hashlib.sha256()
    files = [bundle] if os.path.isfile(bundle) else sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(bundle) for name in names)
    if not every_file and os.path.isfile(os.path.join(bundle, BUNDLE_PARTS[0])):
        files = [p for p in files if _is_bundle_file(os.path.relpath(p, bundle))]
    for path in files:
        digest.update(os.path.relpath(path, bundle).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(model: Any) -> str:
    """The fingerprint of a loaded model's tokenizer ("" when it has none).

    Args:
      model: an `inference.CacophonyModel`.

    Returns:
      The tokenizer's fingerprint, or "".
    """
    return getattr(getattr(model, "tokenizer", None), "fingerprint", "")


def write_index(path: str, paths: Sequence[str], embeddings: Sequence[np.ndarray],
                bundle: str, model: Any) -> str:
    """Writes an index atomically (its folder is created).

    Args:
      path: the .npz file to write.
      paths: the embedded files.
      embeddings: their [P] embeddings, in the same order.
      bundle: the bundle folder that embedded them.
      model: the loaded bundle.

    Returns:
      The absolute path written.
    """
    meta = {"path": os.path.abspath(bundle), "fingerprint": bundle_fingerprint(bundle),
            "tokenizer": tokenizer_fingerprint(model), "kind": getattr(model, "kind", ""),
            "embedding_size": int(embeddings[0].shape[0])}
    out = os.path.abspath(path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with atomic_write.replacing(out, "wb") as f:  # a file object: numpy adds no second suffix
        np.savez(f, paths=np.asarray(paths, dtype=str), embeddings=np.stack(embeddings),
                 bundle=np.asarray(json.dumps(meta)))
    return out


def read_index(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Reads an index written by `write_index`.

    Args:
      path: the .npz file.

    Returns:
      (paths [n] str, embeddings [n, P] float32, bundle metadata dict).
    """
    if os.path.isdir(path):
        raise IndexFileError(f"index {path} is a folder, not an index file; pass the .npz "
                             "file the embed command wrote (its --out)")
    if not os.path.isfile(path):
        raise IndexFileError(f"index {path} does not exist; create it with the embed command")
    not_index = f"{path} is not an index written by the embed command"
    try:
        with open(path, "rb") as f:
            is_npz = f.read(len(_NPZ_MAGIC)) == _NPZ_MAGIC
    except OSError as e:
        raise IndexFileError(f"index {path} cannot be read ({e.strerror}); check the file "
                             "and its permissions") from None
    if not is_npz:  # numpy would try it as a pickle and advise loading it unsafely
        raise IndexFileError(f"{not_index} (it is not an .npz file); pass the .npz file the "
                             "embed command wrote, or rebuild it with embed")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in INDEX_KEYS if k in data.files}
        paths, emb = arrays["paths"], arrays["embeddings"].astype(np.float32)
        meta = json.loads(str(arrays["bundle"]))
    except (OSError, ValueError, EOFError, KeyError) as e:
        why = ("it holds Python objects" if "allow_pickle" in str(e)  # never load those
               else f"{type(e).__name__}: {e}")
        raise IndexFileError(f"{not_index} ({why}); rebuild it with embed") from None
    if emb.ndim != 2 or emb.shape[0] != paths.shape[0]:
        raise IndexFileError(f"{path} is damaged: {paths.shape[0]} paths but embeddings of "
                             f"shape {emb.shape}; rebuild it with the embed command")
    return paths, emb, meta


def check_bundle(index: str, meta: dict[str, Any], bundle: str, fingerprint: str | None,
                 model: Any) -> None:
    """Refuses a search whose bundle is not the one the index was built with.

    Args:
      index: the index file (for the message).
      meta: its bundle metadata (`read_index`).
      bundle: the bundle given for the search.
      fingerprint: that bundle's `bundle_fingerprint` (None when it is not a path).
      model: the loaded bundle.
    """
    if fingerprint == meta.get("fingerprint"):
        return
    if fingerprint is not None and os.path.isdir(bundle) and meta.get(
            "fingerprint") == bundle_fingerprint(bundle, every_file=True):
        return  # an index of an earlier version, which hashed every file of the folder
    # Only two tokenizers can differ: a stage-1 bundle or index has none.
    ours, theirs = tokenizer_fingerprint(model), meta.get("tokenizer")
    same_tokenizer = not ours or not theirs or ours == theirs
    raise IndexFileError(
        f"index {index} was built with bundle {meta.get('path')} (fingerprint "
        f"{meta.get('fingerprint')}) but --bundle {bundle} has fingerprint "
        f"{fingerprint}{'' if same_tokenizer else ' and a different tokenizer'}; "
        f"embeddings of different bundles cannot be compared: search with the bundle "
        f"the index was built with, or rebuild the index with embed --bundle {bundle}")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def rank(embeddings: np.ndarray, queries: np.ndarray, top_k: int
         ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The indexed rows closest to each query by cosine similarity.

    Args:
      embeddings: [n, P] index embeddings.
      queries: [q, P] query embeddings.
      top_k: rows kept per query.

    Returns:
      Per query, (row indices, their scores), best first (ties: lower row first).
    """
    emb = _unit(np.asarray(embeddings, np.float32))
    results = []
    for vector in _unit(np.asarray(queries, np.float32)):
        scores = emb @ vector
        top = np.argsort(-scores, kind="stable")[:top_k]
        results.append((top, scores[top]))
    return results

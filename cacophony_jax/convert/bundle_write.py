"""Writing inference bundles (format: `cacophony_jax.convert.bundle`).

`write_bundle` checks the request (dtype, window, text length, tokenizer), refuses
parameters holding NaN or infinite values, and writes the folder atomically through
`convert.folder_replace`. `check_out` runs the ``--out`` folder checks alone, so that
an export refuses a folder before any costly work: a link names the folder written,
and an existing folder is replaced only on request and only when it holds nothing
but a bundle's own entries (or nothing at all).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cacophony_jax.convert import folder_replace
from cacophony_jax.convert.bundle import (
    BUNDLE_JSON,
    FORMAT,
    OWN_ENTRIES,
    PARAMS_DIR,
    TOKENIZER_JSON,
    VERSION,
    BundleError,
    ModelConfig,
    Params,
    check_numbers,
    dtype_of,
    frontend_settings,
)
from cacophony_jax.data.tokenizer import Tokenizer
from cacophony_jax.models.variants import CacophonyConfig


def _check_request(config: ModelConfig, tokenizer: Tokenizer | None, dtype: str,
                   window_seconds: float, text_length: int) -> None:
    dtype_of(dtype)
    stage2 = isinstance(config, CacophonyConfig)
    check_numbers(window_seconds, text_length, config.text.max_positions if stage2 else None,
                   ("--window-seconds", "--text-length"),
                   ("use the clip length the model was trained on",
                    "pass the text length the model was trained with"))
    if not stage2:
        return
    if tokenizer is None or tokenizer.vocab_size > config.text.vocab_size:
        found = "no tokenizer" if tokenizer is None else f"{tokenizer.vocab_size} tokens"
        raise BundleError(f"a stage-2 bundle needs the tokenizer the model was trained with "
                          f"(got {found}, the model has {config.text.vocab_size} ids)")


def _check_replaceable(out: pathlib.Path, overwrite: bool) -> None:
    """Refuses to replace `out` (an existing path) unless asked to, and unless it is
    a bundle holding nothing else, or an empty folder."""
    if not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder; choose another bundle folder "
                          "(--out)")
    if not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite (overwrite=True "
                          "in Python) to replace it or choose another folder")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not (out / BUNDLE_JSON).is_file():
        raise BundleError(f"{out} exists and is not an inference bundle; refusing "
                          "to replace it, choose another folder")
    extra = [name for name in entries if name not in OWN_ENTRIES]
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise BundleError(f"{out} holds files that are not part of the bundle "
                          f"({', '.join(extra[:5])}{more}), which replacing it would delete; "
                          "move them out of the folder first, or choose another folder")


def _target(out_dir: str | os.PathLike) -> pathlib.Path:
    """The folder a bundle at `out_dir` is written to: the folder a link names (the
    link stays a link), else `out_dir` itself."""
    out = pathlib.Path(out_dir).absolute()
    return pathlib.Path(os.path.realpath(out)) if out.is_symlink() else out


def check_out(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuses a bundle folder `write_bundle` would refuse, before any costly work.

    Args:
      out_dir: the bundle folder to create.
      overwrite: replace an existing bundle at ``out_dir``.
    """
    out = _target(out_dir)
    try:
        folder_replace.check_folder(out, lambda: _check_replaceable(out, overwrite),
                                    BUNDLE_JSON)
    except folder_replace.FolderWriteError as e:
        raise BundleError(f"cannot write the bundle {out} (--out): {e}") from None


def nonfinite_keys(params: Params) -> list[str]:
    """The "/"-joined keys of the float leaves of `params` holding a NaN or infinity.

    Args:
      params: a parameter tree (any array type).

    Returns:
      The keys, in tree order (empty when every value is finite).
    """
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        if a.dtype.itemsize < 4 and jnp.issubdtype(a.dtype, jnp.floating):
            a = a.astype(np.float32)  # bfloat16 and float16
        if jnp.issubdtype(a.dtype, jnp.inexact) and not np.isfinite(a).all():
            bad.append("/".join(str(getattr(k, "key", k)) for k in path))
    return bad


def write_bundle(
    out_dir: str | os.PathLike,
    *,
    config: ModelConfig,
    params: Params,
    tokenizer: Tokenizer | None,
    dtype: str,
    window_seconds: float,
    text_length: int,
    source: dict[str, Any],
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a bundle atomically (temporary folder, then rename).

    Args:
      out_dir: the bundle folder to create.
      config: the model config; its type decides the kind, "cacophony" or "mae".
      params: the unrolled parameter tree (any array type; float leaves are cast).
      tokenizer: the text tokenizer (stage 2), or None (stage 1).
      dtype: "float32" or "bfloat16", the stored parameter dtype.
      window_seconds: clip length the model was trained on.
      text_length: tokens per text including bos/eos (ignored for "mae").
      source: where the parameters came from (stored as is).
      overwrite: replace an existing bundle at ``out_dir`` (only a folder holding
        nothing but a bundle's own entries, or an empty one, is replaced; a link to
        a folder replaces that folder and stays a link).

    Returns:
      The bundle folder (``out_dir``, absolute).
    """
    _check_request(config, tokenizer, dtype, window_seconds, text_length)
    stage2 = isinstance(config, CacophonyConfig)
    want = dtype_of(dtype)
    stored = jax.tree.map(lambda a: np.asarray(a).astype(want) if np.issubdtype(
        np.asarray(a).dtype, np.floating) else np.asarray(a), params)
    bad = nonfinite_keys(stored)
    if bad:
        raise BundleError(f"the parameters to export hold NaN or infinite values in "
                          f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; their source is "
                          "damaged: export from an undamaged checkpoint")
    meta = {"format": FORMAT, "version": VERSION, "kind": "cacophony" if stage2 else "mae",
            "model": dataclasses.asdict(config), "dtype": dtype,
            "frontend": frontend_settings(), "window_seconds": float(window_seconds),
            "text_length": int(text_length) if stage2 else 0,
            "tokenizer_fingerprint": tokenizer.fingerprint if stage2 else "", "source": source}

    def write(folder: pathlib.Path) -> None:
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(folder / PARAMS_DIR, stored)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        if stage2:
            tokenizer.save(folder / TOKENIZER_JSON)
        (folder / BUNDLE_JSON).write_text(json.dumps(meta, indent=2))

    target = _target(out_dir)
    try:
        folder_replace.replace_folder(target, write,
                                      lambda: _check_replaceable(target, overwrite),
                                      BUNDLE_JSON)
    except folder_replace.FolderWriteError as e:
        raise BundleError(f"cannot write the bundle {target} (--out): {e}") from None
    return pathlib.Path(out_dir).absolute()

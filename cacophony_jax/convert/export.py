"""Export trained models as inference bundles (format: `cacophony_jax.convert.bundle`).

``export_from_checkpoint`` takes the parameters of a training run's checkpoint and
the model, tokenizer and clip length from its saved config; ``export_from_official``
takes a released Cacophony.ckpt (stage 2, with RoBERTa's tokenizer) or AudioMAE.ckpt
(stage 1). Both write the unrolled layer layout, whatever the model trained with.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
from absl import logging

from cacophony_jax.convert import official
from cacophony_jax.convert.bundle import (
    KINDS,
    TOKENIZER_JSON,
    BundleError,
    ModelConfig,
    abstract_params,
    dtype_of,
)
from cacophony_jax.convert.bundle_write import check_out, nonfinite_keys, write_bundle
from cacophony_jax.data.tokenizer import Tokenizer, TokenizerError
from cacophony_jax.models import variants
from cacophony_jax.models.stack import unstack_layers

# ---- from a training checkpoint ---------------------------------------------------


def _training_config(directory: Any, step: int, reader: Any) -> dict[str, Any]:
    """The training config saved with ``step``, else the workdir's config.json."""
    try:
        return dict(reader.read_config(step))
    except Exception:  # noqa: BLE001 - older checkpoints may lack the config item
        pass
    config_json = directory.parent / "config.json"
    if config_json.exists():
        return json.loads(config_json.read_text())
    raise BundleError(f"checkpoint step {step} in {directory} has no saved training config "
                      f"and there is no {config_json}; export from the training workdir")


def _find_step(path: str, step: int | None) -> tuple[Any, int, list[int], dict[str, Any]]:
    # Only export reads training checkpoints.
    from cacophony_jax.train import checkpoint, checkpoint_read

    if os.path.isfile(path):
        raise BundleError(f"--checkpoint {path} is a file; it takes a training workdir, its "
                          "checkpoints folder or a step folder (a released .ckpt file goes "
                          "to --official)")
    try:
        directory, found = checkpoint_read.resolve(path)
    except checkpoint.CheckpointError as e:
        raise BundleError(f"{e}; pass a training workdir, its checkpoints folder or a step "
                          "folder") from None
    reader = checkpoint.Checkpointer(directory, read_only=True, async_save=False)
    try:
        steps = reader.steps()
        if found is not None and step is not None and int(step) != found:
            raise BundleError(f"{path} is the folder of step {found} but step {step} was asked "
                              "for (--step); pass the checkpoints folder with --step, or the "
                              "step folder alone")
        step = found if step is None else step
        if not steps:
            stages = sorted(p.name for p in directory.iterdir()
                            if p.is_dir() and (p / "checkpoints").is_dir())
            hint = f" (this looks like a multi-stage run: pass one of {stages})" if stages else ""
            raise BundleError(f"no training checkpoints under {path!r}{hint}; pass a training "
                              "workdir, its checkpoints folder or a step folder")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise BundleError(f"checkpoint step {step} does not exist under {path!r}; "
                              f"saved steps: {steps}")
        return directory, step, steps, _training_config(directory, step, reader)
    finally:
        reader.close()


def export_from_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    step: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Exports the parameters of a training checkpoint as an inference bundle.

    The workdir of a running job may be exported: when the newest step is removed by
    the job's retention (`train.keep_checkpoints`) during the export, the then newest
    step is exported instead.

    Args:
      path: a training workdir, its ``checkpoints`` folder, or one step folder.
      out_dir: the bundle folder to create.
      dtype: stored parameter dtype, "float32" or "bfloat16".
      step: the step to export (default: the step folder given, else the newest).
      overwrite: replace an existing bundle at ``out_dir``.

    Returns:
      The bundle folder.
    """
    from cacophony_jax.train import checkpoint_read

    dtype_of(dtype)
    check_out(out_dir, overwrite)
    path = os.fspath(path)
    for attempt in range(3):
        before = checkpoint_read.saved_steps(path)
        try:
            return _export_from_checkpoint(path, out_dir, dtype=dtype, step=step,
                                           overwrite=overwrite)
        except BundleError as e:
            after = checkpoint_read.saved_steps(path)
            if step is not None or attempt == 2 or not before or before[-1] in after:
                raise
            logging.warning("step %d was removed while it was exported (%s), by the retention "
                            "of the job still training there; exporting step %d instead",
                            before[-1], e, after[-1] if after else -1)
    raise AssertionError("unreachable")


def _export_from_checkpoint(path: str, out_dir: str | os.PathLike, *, dtype: str,
                            step: int | None, overwrite: bool) -> pathlib.Path:
    from cacophony_jax.train import checkpoint, checkpoint_read

    directory, step, steps, train_config = _find_step(os.fspath(path), step)
    try:
        task, model_cfg = train_config["task"], train_config["model"]
        variant, scan = model_cfg["variant"], bool(model_cfg["scan"])
        window_seconds = float(train_config["audio"]["clip_seconds"])
        text_length = int(train_config["data"]["text_length"])
    except (KeyError, TypeError) as e:
        raise BundleError(f"the training config of {directory} lacks {e}; is this a "
                          "cacophony_jax training run?") from None
    if task == "cacophony":
        config: ModelConfig = variants.cacophony_config(
            variant, sigmoid_bias=bool(model_cfg.get("sigmoid_bias", False)))
    elif task == "mae":
        config = variants.mae_config(variant)
    else:
        raise BundleError(f"cannot export task {task!r}; expected one of {KINDS}")
    tokenizer = None
    if task == "cacophony":
        # The workdir's copy is the tokenizer the run trained with; runs from before
        # copies were kept name it only by config path, which is read as it is now.
        kept = directory.parent / TOKENIZER_JSON
        tokenizer_path = (str(kept) if kept.exists()
                          else train_config.get("tokenizer", {}).get("path") or str(kept))
        try:
            tokenizer = Tokenizer.load(tokenizer_path)
        except TokenizerError as e:
            raise BundleError(f"cannot load the run's tokenizer ({e}); a stage-2 workdir "
                              f"keeps it in {TOKENIZER_JSON}") from None
        if tokenizer_path != str(kept):
            logging.warning("%s has no %s (a run from before workdirs kept one): using "
                            "config.tokenizer.path=%s as it reads now; it must be the "
                            "tokenizer the run trained with", directory.parent,
                            TOKENIZER_JSON, tokenizer_path)
    # One CPU device: export never needs accelerator memory, whatever trained it.
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
                            abstract_params(config, scan=scan))
    try:
        params = checkpoint_read.restore_subtree(str(directory / str(step)), ("params",), abstract)
    except checkpoint.CheckpointError as e:
        older = [s for s in steps if s < step]
        hint = (f" If step {step} is damaged (e.g. its save was cut off), export an older "
                f"one: --step {older[-1]} (saved steps: {older})." if older else "")
        raise BundleError(f"{e}{hint}") from None
    params = jax.device_get(params)
    bad = nonfinite_keys(params)
    if bad:
        older = [s for s in steps if s < step]
        hint = (f"export an older step: --step {older[-1]} (saved steps: {older})" if older
                else "export another run's checkpoint")
        raise BundleError(f"checkpoint step {step} in {directory} holds NaN or infinite "
                          f"parameters ({bad[:5]}{' ...' if len(bad) > 5 else ''}); its files "
                          f"are damaged: {hint}")
    if scan:
        params = unstack_layers(params)
    # The path as given: bundle.json travels with the bundle, and an absolute path
    # would carry the exporting machine's folders (a home folder, say) along.
    source = {"type": "checkpoint", "path": os.fspath(path), "step": step, "task": task,
              "variant": variant}
    return write_bundle(out_dir, config=config, params=params, tokenizer=tokenizer,
                        dtype=dtype, window_seconds=window_seconds, text_length=text_length,
                        source=source, overwrite=overwrite)


# ---- from an official release file -----------------------------------------------


def export_from_official(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    window_seconds: float = 10.0,
    text_length: int | None = None,
    text_heads: int | None = None,
    pool_heads: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Exports a released Cacophony.ckpt (stage 2) or AudioMAE.ckpt (stage 1) as a bundle.

    Args:
      ckpt_path: the release file.
      out_dir: the bundle folder to create.
      tokenizer_path: stage 2 only: RoBERTa's tokenizer.json, or a folder with it or
        with vocab.json + merges.txt (the release has no tokenizer of its own).
      dtype: stored parameter dtype, "float32" or "bfloat16".
      window_seconds: clip length the model was trained on (10 s for the release).
      text_length: stage 2 only: tokens per text including bos/eos (default 64).
      text_heads: stage 2 only: attention heads of the text tower (default: those of
        the named variant with the file's sizes; needed when there is none).
      pool_heads: stage 2 only: attention heads of the audio pool, likewise.
      overwrite: replace an existing bundle at ``out_dir``.

    Returns:
      The bundle folder.
    """
    dtype_of(dtype)
    name = os.fspath(ckpt_path)
    if os.path.isdir(name):
        raise BundleError(f"{name} is a folder; --official takes a released .ckpt file (a "
                          "training workdir or step folder goes to --checkpoint)")
    check_out(out_dir, overwrite)
    flat = official.read_flat(name)
    roots = {key.split("/")[0] for key in flat}
    stage1 = bool(roots & set(official.STAGE1_ROOTS)) and "text_module" not in roots
    tokenizer = None
    if stage1:
        for value, flag in ((tokenizer_path, "--tokenizer"), (text_length, "--text-length"),
                            (text_heads, "--text-heads"), (pool_heads, "--pool-heads")):
            if value is not None:
                raise BundleError(f"{name} is a stage-1 (AudioMAE) checkpoint without a text "
                                  f"tower; it takes no {flag.removeprefix('--')} (drop {flag})")
        config, params = official.load_official_mae(name)
        text_length = 0
    else:
        text_length = 64 if text_length is None else text_length
        official.check_stage(flat, name, 2)  # a file that is no release: not "needs a tokenizer"
        if tokenizer_path is None:
            raise BundleError(
                f"{name} is a stage-2 checkpoint and needs the RoBERTa tokenizer it was "
                "trained with; pass it (--tokenizer, or tokenizer_path= in Python): a "
                "tokenizer.json or a folder with vocab.json + merges.txt (from roberta-base)")
        tokenizer = Tokenizer.load(tokenizer_path)
        config, params = official.load_official_cacophony(name, text_heads=text_heads,
                                                          pool_heads=pool_heads)
    source = {"type": "official", "file": os.path.basename(name)}
    return write_bundle(out_dir, config=config, params=params, tokenizer=tokenizer,
                        dtype=dtype, window_seconds=window_seconds, text_length=text_length,
                        source=source, overwrite=overwrite)

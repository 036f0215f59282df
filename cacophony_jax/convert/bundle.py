"""The inference bundle format: one folder with everything needed to run a trained model.

Layout of a bundle folder::

    bundle.json     {"format": "cacophony-bundle", "version": 1,
                     "kind": "cacophony" | "mae", "model": {model config},
                     "dtype": "float32" | "bfloat16", "frontend": {...},
                     "window_seconds": float, "text_length": int,
                     "tokenizer_fingerprint": str, "source": {...}}
    params/         Orbax checkpoint of the parameter pytree only, in "dtype",
                    always in the unrolled layout (``block_0``, ``block_1``, ...)
    tokenizer.json  stage 2 only

A bundle is written into a temporary sibling folder and renamed into place (an
existing empty folder, say a mount point, is filled through a hidden folder inside
it, bundle.json last), so a reader never sees half a bundle. A link names the folder
written; an existing folder is replaced only on request and only when it holds
nothing but a bundle's own entries; parameters with NaN or infinite values are
refused. ``read_bundle`` checks the format version, the front end, the tokenizer
fingerprint and every parameter shape before anything runs. `convert.bundle_write`
writes bundles; `convert.export` makes them from training checkpoints and release files.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib
import shlex
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from cacophony_jax.audio import frontend
from cacophony_jax.data.tokenizer import Tokenizer
from cacophony_jax.models import variants
from cacophony_jax.models.cacophony import Cacophony, cacophony_init_inputs
from cacophony_jax.models.mae import MAE, mae_init_inputs
from cacophony_jax.models.variants import CacophonyConfig, MAEConfig

FORMAT = "cacophony-bundle"
VERSION = 1
KINDS = ("cacophony", "mae")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BUNDLE_JSON = "bundle.json"
PARAMS_DIR = "params"
TOKENIZER_JSON = "tokenizer.json"
# What a bundle folder holds; anything else in it belongs to someone else.
OWN_ENTRIES = (BUNDLE_JSON, PARAMS_DIR, TOKENIZER_JSON)
# The shortest window that still holds one 16-frame patch (16 hops of 160 samples).
MIN_WINDOW_SAMPLES = 16 * frontend.HOP

Params = dict[str, Any]
ModelConfig = CacophonyConfig | MAEConfig


class BundleError(ValueError):
    """A bundle (or export request) that cannot be used; says what is wrong and the fix."""


def frontend_settings() -> dict[str, float]:
    """The log-mel front end every bundle is made for (audio/frontend.py).

    Returns:
      dict with sample_rate, window, hop, n_fft, n_mels, mel_fmax, log_offset,
      log_scale and log_shift.
    """
    return dict(sample_rate=frontend.SAMPLE_RATE, window=frontend.WINDOW, hop=frontend.HOP,
                n_fft=frontend.N_FFT, n_mels=frontend.N_MELS, mel_fmax=frontend.MEL_FMAX,
                log_offset=frontend.LOG_OFFSET, log_scale=frontend.LOG_SCALE,
                log_shift=frontend.LOG_SHIFT)


def model_config(meta: dict[str, Any]) -> ModelConfig:
    """The model config described by a bundle's metadata.

    Args:
      meta: the parsed bundle.json.

    Returns:
      A CacophonyConfig (kind "cacophony") or MAEConfig (kind "mae").
    """
    try:
        fields = dict(meta["model"])
        if meta["kind"] == "cacophony":
            audio, text = fields.pop("audio"), fields.pop("text")
            return CacophonyConfig(audio=variants.AudioEncoderConfig(**audio),
                                   text=variants.TextConfig(**text), **fields)
        return MAEConfig(encoder=variants.AudioEncoderConfig(**fields["encoder"]),
                         decoder=variants.MAEDecoderConfig(**fields["decoder"]))
    except (TypeError, KeyError, ValueError) as e:
        raise BundleError(f"the model config in bundle.json is not valid "
                          f"({type(e).__name__}: {e}); re-export the bundle") from None


def abstract_params(config: ModelConfig, *, scan: bool = False) -> Params:
    """Shapes of a model's float32 parameters (no memory is allocated).

    Args:
      config: a CacophonyConfig or MAEConfig.
      scan: the scanned layout (as trained with ``config.model.scan``).

    Returns:
      The parameter tree of ShapeDtypeStructs.
    """
    if isinstance(config, CacophonyConfig):
        model, inputs = Cacophony(config, scan=scan), cacophony_init_inputs(config)
    else:
        model, inputs = MAE(config, scan=scan), mae_init_inputs(config)
    return nn.unbox(jax.eval_shape(model.init, {"params": jax.random.key(0)}, *inputs))["params"]


# ---- checks shared by writing and reading -------------------------------------------


def check_numbers(window_seconds: Any, text_length: Any, max_positions: int | None,
                  names: tuple[str, str], fixes: tuple[str, str]) -> None:
    """Checks a window and text length (`max_positions` None: no text tower, "mae",
    whose text length is not checked); `names` and `fixes` say, per field, where it
    came from and what to do."""
    (window, text), (fix_window, fix_text) = names, fixes
    if isinstance(window_seconds, bool) or not isinstance(window_seconds, numbers.Real):
        raise BundleError(f"the window ({window}) must be a number of seconds, got "
                          f"{window_seconds!r} ({type(window_seconds).__name__}); {fix_window}")
    if isinstance(text_length, bool) or not isinstance(text_length, numbers.Integral):
        raise BundleError(f"the text length ({text}) must be a whole number of tokens, got "
                          f"{text_length!r} ({type(text_length).__name__}); {fix_text}")
    if not math.isfinite(window_seconds):
        raise BundleError(f"window of {window_seconds} s ({window}) is not a finite number; "
                          f"{fix_window}")
    if not window_seconds * frontend.SAMPLE_RATE >= MIN_WINDOW_SAMPLES:
        raise BundleError(f"window of {window_seconds} s ({window}) is shorter than one "
                          f"16-frame patch (0.16 s); {fix_window}")
    if max_positions is not None and not 2 <= text_length <= max_positions:
        raise BundleError(f"text length {text_length} ({text}) must be in [2, "
                          f"{max_positions}] (the text tower's positions); {fix_text}")


def dtype_of(name: str) -> Any:
    """The numpy-compatible dtype of a bundle dtype name ("float32" | "bfloat16")."""
    if name not in DTYPES:
        raise BundleError(f"dtype {name!r} is not supported; bundles store {list(DTYPES)}")
    return np.dtype(DTYPES[name])


# ---- reading ------------------------------------------------------------------------


def _has_steps(run: pathlib.Path) -> bool:
    """Whether a training run's checkpoints folder holds a step (a folder named by it)."""
    try:
        return any(p.name.isdigit() and p.is_dir() for p in (run / "checkpoints").iterdir())
    except OSError:
        return False


def _training_runs(folder: pathlib.Path) -> list[pathlib.Path]:
    """The training workdir `folder` is or lies in (a stage's workdir, its checkpoints
    folder or a step in it), else the training runs with checkpoints inside it (a
    recipe's workdir, a parent of several runs), else []."""
    if (folder / "checkpoints").is_dir():
        return [folder]
    for inside in (folder, folder.parent):  # the checkpoints folder, or a step in it
        if inside.name == "checkpoints":
            return [inside.parent]
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and _has_steps(p))
    except OSError:
        return []


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a bundle's bundle.json.

    Args:
      path: the bundle folder.

    Returns:
      The metadata dict.
    """
    folder = pathlib.Path(path)
    meta_path = folder / BUNDLE_JSON
    fix = "create one with the export command (export_from_checkpoint / export_from_official)"
    if folder.is_file() and folder.name == BUNDLE_JSON:
        raise BundleError(f"{folder} is a bundle's metadata file; pass the bundle folder "
                          f"that holds it: {folder.parent}")
    if folder.is_file():
        how = ("convert a released checkpoint with `python -m cacophony_jax.cli export "
               "--official FILE --out FOLDER` (Cacophony's also needs --tokenizer)"
               if folder.suffix == ".ckpt" else fix)
        raise BundleError(f"inference bundle {folder} is a file, not a bundle folder; {how}")
    if not folder.is_dir():
        raise BundleError(f"inference bundle {folder} does not exist; {fix}")
    if not meta_path.is_file():
        runs = _training_runs(folder)
        if len(runs) == 1:
            fix = (f"it holds a training run; write its bundle with `python -m "
                   f"cacophony_jax.cli export --checkpoint {shlex.quote(str(runs[0]))} "
                   "--out BUNDLE` and load that")
        elif runs:
            listed = ", ".join(shlex.quote(str(r)) for r in runs)
            fix = (f"it holds several training runs ({listed}); "
                   "write the bundle of one of them with `python -m cacophony_jax.cli "
                   "export --checkpoint RUN --out BUNDLE` and load that (a stage-2 run's "
                   "bundle also captions)")
        raise BundleError(f"{folder} is not an inference bundle ({BUNDLE_JSON} is missing); "
                          f"{fix}")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as e:
        raise BundleError(f"{meta_path} is corrupt ({e}); re-export the bundle") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path} is not a {FORMAT} file; re-export the bundle")
    if meta.get("version") != VERSION:
        raise BundleError(f"{folder} is bundle version {meta.get('version')!r} but this "
                          f"cacophony_jax reads version {VERSION}; re-export it with this "
                          "version")
    missing = sorted({"kind", "model", "dtype", "frontend", "window_seconds", "text_length",
                      "tokenizer_fingerprint"} - set(meta))
    if missing:
        raise BundleError(f"{meta_path} lacks {missing}; re-export the bundle")
    if meta["kind"] not in KINDS:
        raise BundleError(f"{meta_path}: unknown kind {meta['kind']!r} (expected one of "
                          f"{list(KINDS)}); re-export the bundle")
    if meta["frontend"] != frontend_settings():
        raise BundleError(f"{folder} was made for a different audio front end "
                          f"({meta['frontend']}) than this cacophony_jax "
                          f"({frontend_settings()}); re-export it with this version")
    if meta["dtype"] not in DTYPES or not isinstance(meta["tokenizer_fingerprint"], str):
        raise BundleError(f"{meta_path}: dtype {meta['dtype']!r} (one of {list(DTYPES)}) or "
                          f"tokenizer_fingerprint {meta['tokenizer_fingerprint']!r} (a string) "
                          "is damaged; re-export the bundle")
    config = model_config(meta)
    stage2 = isinstance(config, CacophonyConfig)
    if not stage2 and meta["text_length"] != 0:
        raise BundleError(f"{meta_path}: text_length {meta['text_length']!r} must be 0 for an "
                          "AudioMAE bundle (it has no text tower); re-export the bundle")
    check_numbers(meta["window_seconds"], meta["text_length"],
                   config.text.max_positions if stage2 else None,
                   (f"window_seconds in {meta_path}", f"text_length in {meta_path}"),
                   ("re-export the bundle", "re-export the bundle"))
    return meta


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): (tuple(x.shape), np.dtype(x.dtype))
            for p, x in flat}


def _check_params(folder: pathlib.Path, saved: Any, want: Any) -> None:
    got, exp = _flat_shapes(saved), _flat_shapes(want)
    missing, unknown = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    wrong = sorted(f"{k} {got[k][0]} (expected {exp[k][0]})"
                   for k in set(got) & set(exp) if got[k][0] != exp[k][0])
    wrong += sorted(f"{k} dtype {got[k][1]} (expected {exp[k][1]})"
                    for k in set(got) & set(exp) if got[k][1] != exp[k][1])
    if missing or unknown or wrong:
        parts = [f"{label}: {keys[:8]}{' ...' if len(keys) > 8 else ''}" for label, keys in
                 (("missing", missing), ("unknown", unknown), ("mismatched", wrong)) if keys]
        raise BundleError(f"the params in {folder} do not fit the model config in "
                          f"{BUNDLE_JSON} ({'; '.join(parts)}); re-export the bundle")


def _device(device: Any) -> jax.Device | None:
    """`device` as a jax.Device: one, a platform name ("cpu", "gpu", "tpu") for that
    platform's first device, or None."""
    if device is None or isinstance(device, jax.Device):
        return device
    if isinstance(device, str):
        try:
            return jax.devices(device)[0]
        except RuntimeError:
            raise BundleError(f"no {device!r} device in this process (it has "
                              f"{sorted({d.platform for d in jax.devices()})})") from None
    raise BundleError(f"device must be a jax.Device (e.g. jax.devices('cpu')[0]) or a "
                      f"platform name such as 'cpu', got {device!r}")


def read_bundle(
    path: str | os.PathLike, *, device: jax.Device | str | None = None
) -> tuple[dict[str, Any], Params, Tokenizer | None]:
    """Loads a bundle after checking it.

    Args:
      path: the bundle folder.
      device: where to place the parameters: a jax.Device or a platform name ("cpu",
        "gpu"; its first device). Default: the first local device.

    Returns:
      (meta, params, tokenizer): the metadata dict, the unrolled parameter tree as
      jax arrays on ``device`` in the bundle's dtype, and the Tokenizer (None for a
      "mae" bundle).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise BundleError(f"a bundle is a folder path, got {path!r} ({type(path).__name__})")
    device = _device(device)
    folder = pathlib.Path(path).absolute()
    meta = read_meta(folder)
    config = model_config(meta)
    tokenizer = None
    if meta["kind"] == "cacophony":
        tok_path = folder / TOKENIZER_JSON
        if not tok_path.is_file():
            raise BundleError(f"{folder} has no {TOKENIZER_JSON}; re-export the bundle")
        tokenizer = Tokenizer.load(tok_path)
        if tokenizer.fingerprint != meta["tokenizer_fingerprint"]:
            raise BundleError(
                f"bundle/tokenizer mismatch in {folder}: {TOKENIZER_JSON} has fingerprint "
                f"{tokenizer.fingerprint} but {BUNDLE_JSON} expects "
                f"{meta['tokenizer_fingerprint']}; put back the tokenizer the bundle was "
                "exported with (or re-export)")
    dtype = dtype_of(meta["dtype"])
    want = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(
            s.shape, dtype if np.issubdtype(s.dtype, np.floating) else s.dtype),
        abstract_params(config))
    params_dir = folder / PARAMS_DIR
    unreadable = BundleError(f"cannot read the params of {folder}; the bundle is incomplete "
                             "or corrupt: re-export it")
    if not params_dir.is_dir():
        raise unreadable
    checkpointer = ocp.StandardCheckpointer()
    try:
        try:
            saved = checkpointer.metadata(params_dir).item_metadata
        except Exception:  # noqa: BLE001 - Orbax raises many types for a bad folder
            raise unreadable from None
        if saved is None:
            raise unreadable
        _check_params(folder, getattr(saved, "tree", saved), want)
        sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), want)
        try:
            params = checkpointer.restore(params_dir, target)
        except Exception as e:  # noqa: BLE001
            # Orbax's text may end in a pointer to details it printed as a method object.
            said = str(e).split(" See full TensorStore details")[0].splitlines()[0][:200]
            raise BundleError(f"the params of {folder} are corrupt ({type(e).__name__}: "
                              f"{said}); re-export the bundle") from None
    finally:
        checkpointer.close()
    return meta, params, tokenizer

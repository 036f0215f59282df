"""What both tasks share: model knobs from the config and opening data sources."""

from __future__ import annotations

import logging
from typing import Any

import jax.numpy as jnp
import ml_collections

from cacophony_jax.data import sources, spec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def runtime_knobs(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Module fields shared by the models: compute dtype, scan, remat, attention, kernels."""
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={model_cfg.dtype!r}; use one of {list(DTYPES)}")
    return dict(
        dtype=DTYPES[model_cfg.dtype],
        scan=model_cfg.scan,
        remat=model_cfg.remat,
        drop_path=model_cfg.drop_path,
        attention=model_cfg.attention,
        fuse_qkv=model_cfg.fuse_qkv,
        fused_norm=model_cfg.fused_norm,
    )


def jitted(task: Any, key: Any, make: Any) -> Any:
    """The task's jitted function `key`, made by `make()` the first time: one function
    object per task, so evaluations that reuse it reuse its compilations."""
    cache = task.__dict__.setdefault("_jitted", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def clip_samples(seconds: float) -> int:
    """Samples at 16 kHz in a clip of `seconds`."""
    samples = round(seconds * spec.SAMPLE_RATE)
    if samples < 160 * 16:
        raise ValueError(f"clip length {seconds} s is shorter than one 16-frame patch")
    return samples


# Sources opened ahead of training (train.stages checks a run's data before it
# starts), handed to the training's own open_block once: key -> source.
_OPENED: dict[str, Any] = {}


def _key(config: ml_collections.ConfigDict, which: str, size: int, clip_seconds: float
         ) -> str:
    return repr([sorted(config.data[which].items()), size, clip_seconds,
                 config.data.get("synthetic_seed"), config.data.get("skip_bad_rows")])


def keep_opened(config: ml_collections.ConfigDict, which: str, source: Any) -> None:
    """Hands `source` (just opened by `open_block`) to the next open of the same block,
    so a run whose data was checked up front does not read its lists twice."""
    size, seconds = block_sizes(config, which)
    _OPENED[_key(config, which, size, seconds)] = source


def forget_opened() -> None:
    """Closes and drops the sources `keep_opened` holds."""
    while _OPENED:
        close = getattr(_OPENED.popitem()[1], "close", None)
        if close is not None:
            close()


def block_sizes(config: ml_collections.ConfigDict, which: str) -> tuple[int, float]:
    """The synthetic size and clip seconds `open_block` takes for `which`."""
    if which == "train":
        return config.data.synthetic_train_size, config.audio.clip_seconds
    return config.data.synthetic_eval_size, config.audio.eval_clip_seconds


def open_block(config: ml_collections.ConfigDict, which: str, size: int,
               clip_seconds: float, reuse: bool = True) -> Any:
    """The source of `config.data.<which>` ("train" or "eval"); errors name the block.
    `reuse`: take the source `keep_opened` holds for this block, where there is one."""
    kept = _OPENED.pop(_key(config, which, size, clip_seconds), None) if reuse else None
    if kept is not None:
        return kept
    block = config.data[which]
    options: dict[str, Any] = {}
    if block.kind == "synthetic" and block.path:
        raise ValueError(f"config.data.{which}.path={block.path!r} is set but "
                         f"config.data.{which}.kind is 'synthetic', which reads no files: "
                         f"set config.data.{which}.kind (e.g. manifest or array_record)")
    if block.kind == "synthetic":
        options = dict(size=size, clip_seconds=clip_seconds, seed=config.data.synthetic_seed)
    elif block.kind == "manifest":
        options = dict(skip_bad_rows=config.data.skip_bad_rows)
    try:
        return sources.open_source(block.kind, path=block.path, split=block.split, **options)
    except sources.SourceError as e:
        where = ", ".join(f"{k}={block[k]!r}" for k in ("kind", "path", "split") if block[k])
        label = config.data.get("eval_label") if which == "eval" else None
        raise type(e)(f"{label or f'config.data.{which}'} ({where}): {e}") from None


def open_train_source(config: ml_collections.ConfigDict) -> Any:
    """The training source named by `config.data.train`."""
    return open_block(config, "train", *block_sizes(config, "train"))


def open_eval_source(config: ml_collections.ConfigDict) -> Any | None:
    """The evaluation source named by `config.data.eval`, or None when disabled."""
    if not config.data.eval.kind:
        return None
    if config.data.eval.kind == "synthetic" and config.data.train.kind != "synthetic":
        logging.warning("evaluating on the embedded synthetic corpus (config.data.eval.kind="
                        "synthetic) while training on %s data: set config.data.eval.kind and "
                        ".path to a held-out set of yours, or config.data.eval.kind='' to "
                        "skip evaluation", config.data.train.kind)
    return open_block(config, "eval", *block_sizes(config, "eval"))


def extra_eval_blocks(config: ml_collections.ConfigDict
                      ) -> list[tuple[str, ml_collections.ConfigDict]]:
    """The sets `config.data.extra_evals` names, as (metric prefix, config whose
    data.eval is that set), in the order given.

    Raises:
      ValueError: an entry is not KIND:PATH[:SPLIT] or names an unknown kind.
    """
    text = config.data.get("extra_evals", "") or ""
    out, seen = [], {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        kind, _, path = entry.partition(":")
        path, split = sources.path_and_split(path)
        try:
            problem = f"{kind} needs a path" if sources.needs_path(kind) and not path else None
            if kind == "synthetic" and path:
                problem = "the synthetic set reads no files: write 'synthetic:' alone"
        except sources.SourceError as e:  # an unknown kind, with a guess
            problem = str(e)
        if problem:
            raise ValueError(f"config.data.extra_evals entry {entry!r}: {problem}; write "
                             "KIND:PATH[:SPLIT],... e.g. 'clotho:/data/clotho,esc50:"
                             "/data/ESC-50'")
        seen[kind] = seen.get(kind, 0) + 1
        name = f"eval_{kind}" if seen[kind] == 1 else f"eval_{kind}_{seen[kind]}"
        sub = ml_collections.ConfigDict(config.to_dict())
        sub.data.eval = ml_collections.ConfigDict(dict(kind=kind, path=path,
                                                       split=split or "eval"))
        sub.data.extra_evals = ""
        sub.data.eval_label = f"config.data.extra_evals entry {entry!r}"
        out.append((name, sub))
    return out


def eval_clip_counts(used: int, total: int) -> dict[str, float]:
    """The clip counts of an evaluation, warning about clips that could not be read.

    Args:
      used: clips that were decoded and evaluated.
      total: clips in the evaluation set.

    Returns:
      {"eval/num_clips": used}, plus "eval/skipped_clips" when some were left out.
    """
    out = {"eval/num_clips": float(used)}
    if used < total:
        out["eval/skipped_clips"] = float(total - used)
        logging.warning("evaluation: %d of %d clips could not be read and are left out%s",
                        total - used, total, " (no metrics this time)" if not used else "")
    return out

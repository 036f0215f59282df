"""Where stage 2's audio encoder starts (`config.train.init_from`).

Three kinds of starting point hold a stage-1-style audio encoder:

* a stage-1 training run (its workdir, checkpoints folder or one step folder): the
  encoder of its newest readable step, whether or not the two runs scan their blocks;
* a released checkpoint file (`AudioMAE.ckpt`, or `Cacophony.ckpt`, whose audio
  tower is taken), converted as `cli export --official` converts it;
* an exported inference bundle (`cli export`), "mae" or "cacophony".

The encoder's sizes must be this run's `model.variant`'s; a mismatch is refused
before anything is read in full.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from cacophony_jax.models import stack
from cacophony_jax.train import checkpoint, checkpoint_read
from cacophony_jax.train import state as state_lib


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def audio_encoder(config: ml_collections.ConfigDict,
                  plan: state_lib.StatePlan) -> tuple[Any, int | None]:
    """The audio encoder named by `config.train.init_from`, in this run's layout
    (scanned or not) and shardings.

    Returns:
      (the encoder, the step of the stage-1 run it was read from: the named step or
      its newest readable one; None for a released file or a bundle).

    Raises:
      checkpoint.CheckpointError: naming what was found and what this run needs.
    """
    path = os.fspath(config.train.init_from)
    if os.path.isfile(path):
        return _place(_released(path, config), config, plan, path), None
    if os.path.isfile(os.path.join(path, "bundle.json")):
        return _place(_from_bundle(path), config, plan, path), None
    return _stage1_run(config, plan)


def _released(path: str, config: ml_collections.ConfigDict) -> Any:
    from cacophony_jax.convert import official

    try:
        roots = {key.split("/")[0] for key in official.read_flat(path)}
        if roots & set(official.STAGE1_ROOTS) and "text_module" not in roots:
            _, params = official.load_official_mae(path)
            return params["encoder"]
        # Only the audio encoder is kept: the text tower's and pool's head counts
        # (which shapes do not tell) do not matter here.
        _, params = official.load_official_cacophony(path, text_heads=1, pool_heads=1)
        return params["audio_encoder"]
    except official.OfficialCheckpointError as e:
        raise checkpoint.CheckpointError(
            f"{path} is a file but not a released checkpoint this project reads "
            f"({e})") from None


def _from_bundle(path: str) -> Any:
    from cacophony_jax.convert import bundle

    try:
        meta, params, _ = bundle.read_bundle(path, device=jax.local_devices(backend="cpu")[0])
    except bundle.BundleError as e:
        raise checkpoint.CheckpointError(str(e)) from None
    if meta["dtype"] != "float32":
        logging.warning("init_from bundle %s stores %s parameters: the encoder starts from "
                        "values rounded to that precision (export a float32 bundle for the "
                        "exact ones)", path, meta["dtype"])
    encoder = params["encoder"] if meta["kind"] == "mae" else params["audio_encoder"]
    return jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(encoder))


def _place(encoder: Any, config: ml_collections.ConfigDict, plan: state_lib.StatePlan,
           path: str) -> Any:
    """An unrolled host encoder -> this run's layout, checked, on its shardings."""
    if config.model.scan:
        encoder = stack.stack_layers(encoder)
    target = plan.abstract.params["audio_encoder"]
    got = jax.tree.map(np.shape, encoder)
    want = jax.tree.map(lambda s: tuple(s.shape), target)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
        hidden = np.shape(encoder["patch_embed"]["kernel"])[-1] \
            if "patch_embed" in encoder and "kernel" in encoder["patch_embed"] else "?"
        raise checkpoint.CheckpointError(
            f"{path} holds an audio encoder of width {hidden} that does not fit this run's "
            f"model.variant={config.model.variant!r}: set model.variant to the size it was "
            "trained at")
    shardings = plan.shardings.params["audio_encoder"]
    return jax.tree.map(
        lambda a, s, t: jax.make_array_from_callback(
            a.shape, s, lambda index, a=a: np.asarray(a[index], t.dtype)),
        encoder, shardings, target)


def _stage1_run(config: ml_collections.ConfigDict,
                plan: state_lib.StatePlan) -> tuple[Any, int]:
    """The encoder of the stage-1 run `config.train.init_from`, and its step."""
    path, keys = config.train.init_from, ("params", "encoder")
    saved = checkpoint_read.saved_config(path)
    saved_variant = _lookup(saved, "model.variant") if saved else None
    if saved_variant is not None and saved_variant != config.model.variant:
        raise checkpoint.CheckpointError(
            f"{path} is a model.variant={saved_variant!r} run, this run is "
            f"model.variant={config.model.variant!r}: set model.variant={saved_variant!r}, "
            "or start from a run of this size")
    saved_scan = _lookup(saved, "model.scan") if saved else None
    target = plan.abstract.params["audio_encoder"]
    if saved_scan is None or bool(saved_scan) == bool(config.model.scan):
        return checkpoint_read.read_subtree(path, keys, target, task="mae")
    # Read it whole in the saved layout (stacked or per block), then convert.
    to_saved, to_target = ((stack.stack_layers, stack.unstack_layers) if saved_scan
                           else (stack.unstack_layers, stack.stack_layers))
    mesh = jax.tree.leaves(plan.shardings.params)[0].mesh
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    layout = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole),
                          jax.eval_shape(to_saved, target))
    saved_encoder, step = checkpoint_read.read_subtree(path, keys, layout, task="mae")
    encoder = to_target(saved_encoder)
    logging.info("stage-1 encoder converted from model.scan=%s to model.scan=%s",
                 bool(saved_scan), bool(config.model.scan))
    return jax.device_put(encoder, plan.shardings.params["audio_encoder"]), step


# Which step of a stage-1 run a stage-2 workdir started from (written at its fresh start).
START_FILE = "init_from.json"


def _newest_step(path: str) -> int | None:
    """The step a stage-1 run's path names, or its newest (readable or not); None for a
    file or bundle."""
    try:
        directory, step = checkpoint_read.resolve(path)
    except checkpoint.CheckpointError:
        return None
    steps = checkpoint_read.saved_steps(directory) if step is None else [step]
    return steps[-1] if steps else None


def record_start(config: ml_collections.ConfigDict, workdir: Any, step: int | None) -> None:
    """Notes in the workdir which step of `config.train.init_from` this run started from:
    `step`, the one `audio_encoder` read (process 0; nothing for a released file or
    bundle, whose step is None)."""
    if step is None or jax.process_index() != 0:
        return
    from cacophony_jax import atomic_write

    atomic_write.write_text(os.path.join(os.fspath(workdir), START_FILE), json.dumps(
        {"init_from": os.path.realpath(config.train.init_from), "step": step}))


def check_start(config: ml_collections.ConfigDict, workdir: Any) -> None:
    """Warns when the stage-1 run this resumed run started from has trained on since
    (a recipe rerun with more stage-1 steps): this run keeps its older encoder."""
    if not config.train.init_from:
        return
    try:
        with open(os.path.join(os.fspath(workdir), START_FILE), encoding="utf-8") as f:
            start = json.load(f)
    except (OSError, ValueError):
        return  # started before runs noted it, or from a file
    now = _newest_step(config.train.init_from)
    if (isinstance(start, dict) and now is not None and start.get("step") != now
            and start.get("init_from") == os.path.realpath(config.train.init_from)):
        logging.warning(
            "this run's audio encoder started from step %s of %s, which now holds step %d; "
            "the run goes on from its own checkpoints, so its results belong to the older "
            "encoder: to train from the new one, delete or move %s and rerun",
            start.get("step"), config.train.init_from, now, os.fspath(workdir))

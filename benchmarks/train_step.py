"""Train-step time, examples/s and model-FLOPs utilisation (MFU) for both stages.

The step is built exactly as `train.loop.run` builds it (`tasks.build`,
`optim.optimizer.make_optimizer`, `train.state.plan_state` / `create_state`,
`train.step.jit_train_step`) and fed random int16 audio and random caption tokens
placed with `data.to_global.to_global`, so the front end, patching, the model, the
loss and the optimiser update are all timed; the host input pipeline is not (see
input_pipeline.py).

Usage:

    python benchmarks/train_step.py --stage mae,cacophony --variant tiny --batch 8
    python benchmarks/train_step.py --stage mae --variant tiny --sweep-batch 8,16,32
    python benchmarks/train_step.py --stage cacophony --variant base --batch 64 \\
        --dtype bfloat16 --remat dots          # on a GPU/TPU
    python benchmarks/train_step.py --stage cacophony --variant tiny --batch 64 \\
        --loss-kind sigmoid --loss-chunk-size 16

Model FLOPs are counted from the traced step (cacophony_jax/train/flops.py: every
matrix product and convolution, loops times their trip count), traced without remat
and with XLA attention so that recomputation is not counted and fused attention
kernels are; the same count on every backend. XLA's cost analysis of the compiled step is reported
beside it (`xla_flops_per_example`), but it counts loop bodies once, remat as work
and custom calls (cuDNN attention) as nothing. MFU = model FLOPs per device per
second / the device's peak (flops.PEAK_TFLOPS, dense bf16; on CPU a measured matmul
peak).

More than one row (`--sweep-batch`, or several stages) runs each row in its own
process: the script starts itself once per row and collects the rows. A device's
`peak_bytes_in_use` is the process's high-water mark since it started, and JAX cannot
reset it, so in one process a row after a larger one would report the larger one's
memory. `--in-process` measures every row in this process instead (faster, and the
compiled memory per row is still right); a row whose peak did not rise above the
earlier rows' then has no peak of its own (`peak_not_attributable`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import time
from typing import Any

# Run from a checkout: make the package importable without installing it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cacophony_jax import xla_defaults  # noqa: E402

xla_defaults.apply()  # the XLA options training runs with (before JAX starts)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import accounting, profile_summary, report, step_rows  # noqa: E402
from cacophony_jax import tasks  # noqa: E402
from cacophony_jax.data import spec, to_global  # noqa: E402
from cacophony_jax.optim import optimizer  # noqa: E402
from cacophony_jax.parallel import mesh as mesh_lib  # noqa: E402
from cacophony_jax.parallel import partition  # noqa: E402
from cacophony_jax.train import flops  # noqa: E402
from cacophony_jax.train import state as state_lib  # noqa: E402
from cacophony_jax.train import step as step_lib  # noqa: E402

STAGES, LOSS_KINDS = step_rows.STAGES, step_rows.LOSS_KINDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring; the flags: step_rows)."""
    return step_rows.parse_args(argv, __doc__.split("\n\n")[0])


def make_config(stage: str, variant: str, batch: int, *, dtype: str = "", scan: bool = False,
                remat: str = "none", fsdp: int = 1, clip_seconds: float = 0.0,
                text_length: int = 0, sub_batches: int = 0, attention: str = "",
                sam: bool = False, fuse_qkv: bool = False, fused_norm: bool = False,
                loss_kind: str = "", loss_chunk_size: int = 0) -> ml_collections.ConfigDict:
    """The training config of `stage`/`variant` with the benchmark's overrides.

    Args:
      stage: "mae" or "cacophony".
      variant: "tiny" or "base".
      batch: global batch size.
      dtype: compute dtype ("" keeps the config's).
      scan, remat: block-stack settings.
      fsdp: mesh fsdp size (-1 for all devices); data takes the rest.
      clip_seconds, text_length, sub_batches (the front end's): 0 keeps the config's.
      attention: the attention implementation ("" keeps the config's).
      sam: enable SAM (a second gradient per step; the paper's stage-2 recipe).
      fuse_qkv: project query, key and value in one matrix product (model.fuse_qkv).
      fused_norm: the audio blocks' LayerNorms as Pallas kernels (model.fused_norm).
      loss_kind: stage 2's contrastive loss, "softmax" or "sigmoid" ("" keeps the
        config's); "sigmoid" also adds the model's learned logit bias
        (model.sigmoid_bias), which that loss needs.
      loss_chunk_size: stage 2's contrastive loss in blocks of this many rows
        (loss.chunk_size; must divide `batch`; 0 keeps the config's, unblocked).
        Stage 1 has no contrastive loss: both are ignored for it.

    Returns:
      A locked ConfigDict.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    if stage == "mae":
        from configs import mae as module
    else:
        from configs import cacophony as module
    config = module.get_config(variant)
    config.unlock()
    config.data.global_batch_size = batch
    config.model.dtype = dtype or config.model.dtype
    config.model.scan, config.model.remat = scan, remat
    config.model.attention = attention or config.model.attention
    config.model.fuse_qkv, config.model.fused_norm = fuse_qkv, fused_norm
    if sam:
        config.optim.sam.enabled = True
    config.mesh.data, config.mesh.fsdp = (-1, fsdp) if fsdp != -1 else (1, -1)
    if clip_seconds:
        config.audio.clip_seconds = clip_seconds
    if text_length:
        config.data.text_length = text_length
    if sub_batches:
        config.audio.frontend_sub_batches = sub_batches
    if stage == "cacophony":
        if loss_kind:
            if loss_kind not in LOSS_KINDS:
                raise ValueError(f"loss kind {loss_kind!r}: use one of {LOSS_KINDS}")
            config.loss.kind = loss_kind
            config.model.sigmoid_bias = loss_kind == "sigmoid"
        if loss_chunk_size < 0 or (loss_chunk_size and batch % loss_chunk_size):
            raise ValueError(f"loss chunk size {loss_chunk_size} (config.loss.chunk_size) "
                             f"must be 0 (unblocked) or divide the global batch {batch}")
        if loss_chunk_size:
            config.loss.chunk_size = loss_chunk_size
    config.lock()
    return config


@dataclasses.dataclass
class BuiltStep:
    """A jitted train step with everything needed to feed and run it."""

    task: Any
    tx: Any
    schedule: Any
    plan: state_lib.StatePlan
    mesh: jax.sharding.Mesh
    step: Any  # jitted (state, batch) -> (state, metrics)
    shapes: dict[str, tuple[int, ...]]  # global batch shapes
    vocab_size: int  # token ids are drawn below this (0 for stage 1)


def build_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
               ) -> BuiltStep:
    """Builds the train step the way `train.loop.run` does, without data or state.

    Args:
      config: a training config (see `make_config`).
      mesh: the mesh; default `mesh_lib.make_mesh(config.mesh)`.

    Returns:
      A BuiltStep; nothing is allocated on the devices yet.
    """
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
    divisor = mesh_lib.batch_divisor(mesh)
    batch = config.data.global_batch_size
    if batch % divisor:
        raise ValueError(f"batch {batch} must be a multiple of the {divisor} devices the batch "
                         "is split over")
    rules = partition.rules_from_config(config.sharding_rules)
    task = tasks.build(config, None)
    tx, schedule = optimizer.make_optimizer(config.optim, config.train.steps)
    plan = state_lib.plan_state(task.init_params, tx, mesh, rules)
    shapes = {"audio": (batch, task.clip_samples), "audio_len": (batch,), "valid": (batch,)}
    vocab = 0
    if config.task == "cacophony":
        shapes.update(text_ids=(batch, config.data.text_length),
                      text_mask=(batch, config.data.text_length))
        vocab = task.model_config.text.vocab_size
    step = step_lib.jit_train_step(task, tx, schedule, plan, mesh, shapes, rules)
    return BuiltStep(task, tx, schedule, plan, mesh, step, shapes, vocab)


def abstract_batch(built: BuiltStep) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of the global batch with their shardings (for `.lower`)."""
    return {k: jax.ShapeDtypeStruct(s, spec.TRAIN_KEYS[k],
                                    sharding=mesh_lib.batch_sharding(built.mesh, len(s)))
            for k, s in built.shapes.items()}


def random_batch(built: BuiltStep, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of the contract: noise audio, full lengths, random captions."""
    rng = np.random.default_rng(seed)
    batch, samples = built.shapes["audio"]
    audio = np.rint(rng.normal(0.0, 0.1, (batch, samples)).clip(-1, 1) * 32767)
    out = {"audio": audio.astype(np.int16), "audio_len": np.full(batch, samples, np.int32),
           "valid": np.ones(batch, np.float32)}
    if "text_ids" in built.shapes:
        length = built.shapes["text_ids"][1]
        ids = rng.integers(3, built.vocab_size, (batch, length)).astype(np.int32)
        ids[:, 0] = spec.BOS_ID
        ends = rng.integers(2, length, batch)  # position of eos
        pos = np.arange(length)[None, :]
        ids[pos == ends[:, None]] = spec.EOS_ID
        ids[pos > ends[:, None]] = spec.PAD_ID
        out["text_ids"], out["text_mask"] = ids, (pos <= ends[:, None]).astype(np.int32)
    return out


def model_flops_per_example(config: ml_collections.ConfigDict,
                            mesh: jax.sharding.Mesh | None = None) -> float:
    """Model FLOPs of one example's training step, counted from the traced program
    (`cacophony_jax.train.flops.step_model_flops`: no remat, XLA attention)."""
    reference = ml_collections.ConfigDict(config.to_dict())  # cuDNN cannot trace on CPU
    reference.model.remat, reference.model.attention = "none", "xla"
    built = build_step(reference, mesh)
    total = flops.step_model_flops(reference, None, built.tx, built.schedule, built.plan,
                                   built.mesh, built.shapes)
    return total / config.data.global_batch_size


def measure(config: ml_collections.ConfigDict, steps: int, warmup: int,
            peak: tuple[float, str] | None = None, override_tflops: float = 0.0,
            profile_dir: str = "", profile_steps: int = 3) -> dict:
    """Compiles, runs and times one configuration (one table row).

    Args:
      config: from `make_config`.
      steps: timed steps.
      warmup: untimed steps after compiling.
      peak: (per-device FLOP/s, source), measured once by the caller; None = measure.
      override_tflops: see `accounting.peak_flops_per_device`.
      profile_dir: when set, `profile_steps` more steps are traced into this folder
        after the timed ones, and the row gets the trace's summary ("profile").
      profile_steps: steps traced.

    Returns:
      The row: settings, compile_s, step_s, examples_per_s, first_loss (the first
      step's), model_flops_per_example,
      tflops_per_device, peak_tflops, mfu, memory (bytes), and profile if traced.
    """
    built = build_step(config)
    devices = list(built.mesh.devices.flat)
    # The process's high-water mark so far: this row's peak is only its own if it rises.
    before = step_rows.device_memory_stats(devices[0])
    start = time.perf_counter()
    compiled = built.step.lower(built.plan.abstract, abstract_batch(built)).compile()
    compile_s = time.perf_counter() - start
    xla_flops = accounting.step_flops(compiled)
    # One device's share of the step's model FLOPs.
    flops = (model_flops_per_example(config, built.mesh) * config.data.global_batch_size
             / len(devices))
    state = state_lib.create_state(built.task.init_params, built.tx, built.plan, config.seed)
    batch = to_global.to_global(random_batch(built), built.mesh)
    # The first step's loss, read outside the timing: every run starts from the same
    # parameters and batch, so options that keep the math (fused kernels, XLA flags)
    # should agree here up to rounding.
    state, metrics = compiled(state, batch)
    first_loss = float(metrics["loss"])
    for _ in range(warmup - 1):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / steps
    if not math.isfinite(float(metrics["loss"])):
        raise FloatingPointError(f"the benchmark step produced loss {float(metrics['loss'])}")
    profile = None
    if profile_dir:
        # Traced apart from the timed steps: tracing adds its own overhead.
        with jax.profiler.trace(profile_dir):
            for _ in range(profile_steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        # The compiled step's HLO sorts XLA:CPU's fusions that hold products.
        profile, text = profile_summary.summarize_trace(profile_dir, profile_steps,
                                                        flops / 1e9,
                                                        hlo_text=compiled.as_text())
        print(text, flush=True)
    if peak is None:
        peak = accounting.peak_flops_per_device(devices, config.model.dtype, override_tflops)
    batch_size = config.data.global_batch_size
    achieved = flops / step_s
    mem = accounting.memory_bytes(compiled)
    mem.update(step_rows.row_peak_memory(before, step_rows.device_memory_stats(devices[0])))
    return {
        "stage": config.task, "variant": config.model.variant, "device": devices[0].device_kind,
        "devices": len(devices), "mesh": dict(built.mesh.shape), "batch": batch_size,
        "dtype": config.model.dtype, "scan": bool(config.model.scan),
        "remat": config.model.remat, "attention": config.model.attention,
        "fuse_qkv": bool(config.model.fuse_qkv), "fused_norm": bool(config.model.fused_norm),
        "sam": bool(config.optim.sam.enabled), **step_rows.loss_fields(config),
        "clip_seconds": config.audio.clip_seconds,
        "frontend_sub_batches": config.audio.frontend_sub_batches, "compile_s": compile_s,
        "step_s": step_s, "examples_per_s": batch_size / step_s, "first_loss": first_loss,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", ""),
        "model_flops_per_example": flops * len(devices) / batch_size,
        # XLA's own count, for comparison (loop bodies once, remat and custom calls off).
        "xla_flops_per_example": xla_flops * len(devices) / batch_size,
        "tflops_per_device": achieved / 1e12, "peak_tflops": peak[0] / 1e12,
        "peak_source": peak[1], "mfu": achieved / peak[0], "memory": mem,
        **({"profile": profile} if profile else {}),
    }


def config_from_args(args: argparse.Namespace, stage: str, batch: int
                     ) -> ml_collections.ConfigDict:
    """The config of one row (`stage` at global batch `batch`) from the flags."""
    return make_config(stage, args.variant, batch, dtype=args.dtype, scan=args.scan == "true",
                       remat=args.remat, fsdp=args.fsdp, clip_seconds=args.clip_seconds,
                       text_length=args.text_length, sub_batches=args.frontend_sub_batches,
                       attention=args.attention, sam=args.sam, fuse_qkv=args.fuse_qkv,
                       fused_norm=args.fused_norm, loss_kind=args.loss_kind,
                       loss_chunk_size=args.loss_chunk_size)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measures every requested stage and batch size and prints a table.

    Args:
      argv: command-line arguments (without the program name); None = sys.argv.

    Returns:
      The rows (see `measure`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    stages = [s for s in args.stage.split(",") if s]
    batches = [int(b) for b in args.sweep_batch.split(",") if b] or [args.batch]
    cells = [(stage, batch) for stage in stages for batch in batches]
    if (args.loss_kind or args.loss_chunk_size) and "cacophony" not in stages:
        raise ValueError("--loss-kind and --loss-chunk-size set stage 2's contrastive loss; "
                         "add --stage cacophony")
    for stage, batch in cells:  # bad flags fail here, before anything runs
        config_from_args(args, stage, batch)
    if len(cells) > 1 and not args.in_process:
        # Before this process starts a backend: on a GPU it would take the memory, on a
        # TPU the chips, that the row processes need.
        dtypes = [config_from_args(args, *cell).model.dtype for cell in cells]
        return step_rows.run_rows_apart(pathlib.Path(__file__).resolve(), argv, cells,
                                        dtypes, args.json)
    platform = jax.devices()[0].platform
    if args.attention == "cudnn" and platform != "gpu":
        raise ValueError(f"--attention cudnn is cuDNN's fused attention, for NVIDIA GPUs; "
                         f"this machine runs {platform}: use --attention xla")
    peaks: dict[str, tuple[float, str]] = {}
    rows = []
    for stage, batch in cells:
        config = config_from_args(args, stage, batch)
        dtype = config.model.dtype
        if dtype not in peaks:
            peaks[dtype] = accounting.peak_flops_per_device(jax.devices(), dtype,
                                                            args.peak_tflops)
            if args.peak_source and args.peak_tflops > 0:
                peaks[dtype] = (peaks[dtype][0], args.peak_source)
            print(f"peak {peaks[dtype][0] / 1e12:.4f} TFLOP/s per device "
                  f"({peaks[dtype][1]}, {jax.devices()[0].device_kind})", flush=True)
        profile_dir = ""
        if args.profile:
            profile_dir = str(pathlib.Path(args.profile) / f"{stage}-{batch}")
        rows.append(measure(config, args.steps, args.warmup, peaks[dtype],
                            profile_dir=profile_dir, profile_steps=args.profile_steps))
        report.emit(rows[-1], step_rows.format_row(rows[-1]), args.json)
    return rows


if __name__ == "__main__":
    report.run(main)

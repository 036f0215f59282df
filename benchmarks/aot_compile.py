"""Ahead-of-time compilation of the train step for a target topology, no hardware needed.

Lowers and compiles the real train step (built as the training loop builds it, see
train_step.py) on `jax.ShapeDtypeStruct` inputs that carry their shardings, so nothing
is allocated, and reports per-device memory from `compiled.memory_analysis()`:
arguments (parameters, optimiser state, batch), outputs, temporaries and generated
code, against a per-device memory budget.

Targets:

- ``tpu:<topology>`` (e.g. ``tpu:v5e:4x4``, ``tpu:v4:2x2x2``) compiles for real TPU
  devices through `jax.experimental.topologies.get_topology_desc`. That needs libtpu
  (`pip install "jax[tpu]==<jax version>"`); without it the script says so and compiles
  the CPU stand-in below, one device per chip against the chip's HBM, and its verdict
  and rows say that it is a stand-in (`"stand_in": true`).
- ``gpu:<part>[:N | :HOSTSxN]`` (e.g. ``gpu:h100``, ``gpu:h100:8``, ``gpu:h200:2x8``)
  compiles with XLA:GPU for GPUs that are not there, described by `gpu_targets.py`.
  That needs the CUDA plugin and tool chain (`pip install "jax[cuda12]==<jax
  version>"`); no GPU or driver. Without it the script stops with that install
  command. XLA:GPU's compile-only path reports memory but no cost analysis, so
  FLOPs are left out for it.
- ``cpu`` (default) compiles for `--devices` simulated CPU devices as a stand-in: the
  sharding plan and the parameter/optimiser/batch sizes are exact, but XLA:CPU
  schedules, fuses and rematerialises differently from GPU/TPU compilers (and may
  compute some bf16 ops in f32), so its temporaries are an estimate. It also keeps
  about the same temporaries with and without `model.remat`, so it cannot show what
  remat saves (the report says so when `--remat` is set).

Usage (the script sets the CPU device count itself before JAX starts):

    python benchmarks/aot_compile.py --stage mae,cacophony --variant base \\
        --per-device-batch mae=64,cacophony=128 --mesh 1x8 --dtype bfloat16
    python benchmarks/aot_compile.py --target tpu:v5e:4x4 --mesh 1x16
    python benchmarks/aot_compile.py --target gpu:h100:8 --mesh 1x8
    # stage 2's contrastive loss unblocked and in blocks of 4096 rows, compared
    python benchmarks/aot_compile.py --stage cacophony --variant tiny --mesh 8x1 \\
        --per-device-batch 4096 --dtype float32 --clip-seconds 1 --text-length 16 \\
        --loss-chunk-size 0,4096
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

if __name__ == "__main__":
    # Compile-only: never start a GPU/TPU runtime (a CUDA plugin without a GPU would
    # fail to initialise), and keep libtpu from querying a TPU VM's metadata server.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

# Run from a checkout: make the package and its sibling benchmarks importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import (  # noqa: E402
    accounting,
    collectives,
    gemms,
    kernels,
    report,
    step_rows,
    train_step,
)
from benchmarks.compile_targets import (  # noqa: E402 - this script's names too
    TargetError,
    default_budget,
    target_devices,
)

GIB = 2**30
# XLA options for GPU compiles without a device (no autotuning is possible there).
GPU_COMPILE_ONLY_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="cpu",
                   help="cpu | tpu:<topology> | gpu:<part>[:N], e.g. tpu:v5e:4x4, gpu:h100:8")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (cpu target)")
    p.add_argument("--mesh", default="1x8", help="DATAxFSDP, e.g. 1x8 (full FSDP) or 8x1")
    p.add_argument("--stage", default="mae,cacophony", help="comma list of stages")
    p.add_argument("--variant", default="base", choices=("tiny", "base"))
    p.add_argument("--per-device-batch", default="mae=64,cacophony=128",
                   help="examples per device, per stage (stage=N,...) or one number")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--scan", default="false", choices=("true", "false"))
    step_rows.add_model_flags(p)
    p.add_argument("--clip-seconds", type=float, default=0.0, help="0: the config's")
    p.add_argument("--text-length", type=int, default=0,
                   help="caption tokens, stage 2 (0: the config's)")
    p.add_argument("--loss-kind", default="", choices=("", *train_step.LOSS_KINDS),
                   help="stage 2's contrastive loss (loss.kind; sigmoid also sets "
                        "model.sigmoid_bias); default: the config's, softmax")
    p.add_argument("--loss-chunk-size", default="0",
                   help="stage 2's contrastive loss in blocks of this many rows "
                        "(loss.chunk_size, must divide the global batch; 0: unblocked); a "
                        "comma list compiles stage 2 once per size, to compare them")
    p.add_argument("--device-memory-gb", type=float, default=0.0,
                   help="per-device memory budget in GB (10^9 bytes); 0: the target's "
                        "(see default_budget)")
    p.add_argument("--json", default="", help="append the rows to this JSON-lines file")
    p.add_argument("--dump-hlo", default="",
                   help="write each compiled step's HLO text to DIR/<stage>.hlo.txt "
                        "(for kernels.py)")
    return p.parse_args(argv)


def make_mesh(devices: list, spec: str) -> jax.sharding.Mesh:
    """A ('data', 'fsdp') mesh of `devices` from 'DATAxFSDP'."""
    try:
        data, fsdp = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise TargetError(f"--mesh {spec!r}: write it as DATAxFSDP, e.g. 1x8") from None
    if data * fsdp != len(devices):
        raise TargetError(f"--mesh {spec} needs {data * fsdp} devices; the target has "
                          f"{len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * 2
    grid = np.asarray(devices).reshape(data, fsdp)
    return jax.sharding.Mesh(grid, ("data", "fsdp"), axis_types=auto)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def compile_stage(stage: str, args: argparse.Namespace, mesh: jax.sharding.Mesh,
                  per_device: int, chunk_size: int = 0) -> dict:
    """AOT-compiles one stage's step on `mesh` and returns its memory row.

    `chunk_size` is stage 2's `loss.chunk_size` (0: unblocked). A compile for CPU
    devices is a stand-in (`stand_in` in the row), whatever the target.
    """
    devices = mesh.devices.size
    batch = per_device * devices
    config = train_step.make_config(stage, args.variant, batch, dtype=args.dtype,
                                     scan=args.scan == "true", remat=args.remat,
                                     clip_seconds=args.clip_seconds,
                                     text_length=args.text_length, attention=args.attention,
                                     sam=args.sam, fuse_qkv=args.fuse_qkv,
                                     fused_norm=args.fused_norm, loss_kind=args.loss_kind,
                                     loss_chunk_size=chunk_size)
    built = train_step.build_step(config, mesh)
    state_bytes = per_device_bytes(built.plan.abstract)
    params_bytes = per_device_bytes(built.plan.abstract.params)
    start = time.perf_counter()
    lowered = built.step.lower(built.plan.abstract, train_step.abstract_batch(built))
    # A compile without the GPU cannot autotune Triton GEMM tilings: use cuBLAS GEMMs.
    gpu = mesh.devices.flat[0].platform in ("cuda", "gpu")
    compiled = lowered.compile(GPU_COMPILE_ONLY_OPTIONS if gpu else None)
    compile_s = time.perf_counter() - start
    mem = accounting.memory_bytes(compiled)
    xla_flops = accounting.step_flops(compiled)
    model_flops = train_step.model_flops_per_example(config, mesh)
    hlo = compiled.as_text()
    if args.dump_hlo:
        folder = pathlib.Path(args.dump_hlo)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stage}.hlo.txt").write_text(hlo)
    comms = collectives.summarize(hlo) if devices > 1 else {}
    products = gemms.summarize(hlo)
    # Kernel counts mean launches only in XLA:GPU's programs (kernels.py).
    launched = kernels.summarize(hlo) if gpu else None
    budget = args.device_memory_gb * 1e9 or default_budget(mesh.devices.flat[0])
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(built.plan.abstract.params))
    return {
        "stage": stage, "variant": args.variant, "mesh": dict(mesh.shape),
        "target": args.target, "stand_in": mesh.devices.flat[0].platform == "cpu",
        "device": mesh.devices.flat[0].device_kind, "global_batch": batch,
        "per_device_batch": per_device, "dtype": config.model.dtype,
        "scan": config.model.scan, "remat": config.model.remat,
        "attention": config.model.attention, "sam": bool(config.optim.sam.enabled),
        "fuse_qkv": bool(config.model.fuse_qkv), "fused_norm": bool(config.model.fused_norm),
        **step_rows.loss_fields(config), "text_length": config.data.get("text_length"),
        "clip_seconds": config.audio.clip_seconds, "params": num_params,
        "params_bytes_per_device": params_bytes, "state_bytes_per_device": state_bytes,
        "memory": mem, "compile_s": compile_s,
        # Counted from the traced step (cacophony_jax/train/flops.py); XLA's count
        # beside it differs by backend and is absent for XLA:GPU without a device.
        "flops_per_example": model_flops,
        "xla_flops_per_example": (xla_flops * devices / batch
                                  if math.isfinite(xla_flops) else None),
        "collectives": comms,
        # The compiled program's matrix products (loop bodies once), per example.
        "gemm_flops_per_example": products.total * devices / batch,
        "gemm_bf16_share": products.share("bf16"),
        "gemm_largest_other": [(k, name, f * devices / batch)
                               for k, name, f in products.largest_other],
        "fused_attention_calls": products.fused_attention_calls,
        # Entry-computation kernels and the bytes their operands and results span
        # (benchmarks/kernels.py), per device per step.
        "kernels": launched.counts if launched else {},
        "kernel_bytes": launched.bytes if launched else {},
        "non_product_bytes": launched.non_product_bytes() if launched else None,
        "budget_bytes": budget, "fits": bool(mem) and mem["total"] <= budget,
    }


def format_row(row: dict) -> str:
    """A readable block for one stage."""
    m = row["memory"]
    gib = lambda b: f"{b / GIB:7.2f} GiB"
    flops, xla_flops = row["flops_per_example"], row["xla_flops_per_example"]
    lines = [
        f"{row['stage']} {row['variant']}: {row['params'] / 1e6:.1f} M params, mesh "
        f"{row['mesh']}, {row['per_device_batch']}/device (global {row['global_batch']}), "
        f"{row['dtype']}, scan={row['scan']}, remat={row['remat']}, "
        f"attention={row['attention']}{', SAM' if row['sam'] else ''}"
        f"{', fused qkv' if row['fuse_qkv'] else ''}"
        f"{', fused norm' if row.get('fused_norm') else ''}"
        f"{', ' + step_rows.loss_label(row) if step_rows.loss_label(row) else ''}, "
        f"compiled in {row['compile_s']:.0f} s",
        f"  state per device (params + optimiser, exact): {gib(row['state_bytes_per_device'])}"
        f" (params {gib(row['params_bytes_per_device'])})",
    ]
    if m:
        lines.append(f"  arguments {gib(m['argument'])}  outputs {gib(m['output'])}  aliased "
                     f"{gib(m['alias'])}  temporaries {gib(m['temp'])}  code "
                     f"{gib(m['generated_code'])}")
        verdict = "fits" if row["fits"] else "does NOT fit"
        lines.append(f"  total per device {gib(m['total'])}: {verdict} in "
                     f"{row['budget_bytes'] / 1e9:.1f} GB ({row['budget_bytes'] / GIB:.1f} "
                     f"GiB){stand_in_note(row)}")
        if row.get("stand_in") and row["remat"] != "none":
            lines.append(f"  remat={row['remat']} on the CPU stand-in: XLA:CPU keeps about the "
                         "same temporaries with and without remat, so this compile cannot "
                         "show what remat saves; compile for a gpu: or tpu: target")
    if row["collectives"]:
        parts = [f"{kind} {c['bytes'] / GIB:.2f} GiB ({c['count']}"
                 + (f", {c['unread']} unread)" if c.get("unread") else ")")
                 for kind, c in sorted(row["collectives"].items())]
        lines.append("  collectives per device per step (whole buffers): " + ", ".join(parts))
    xla = f"{xla_flops / 1e9:.1f}" if xla_flops is not None else "n/a"
    lines.append(f"  model FLOPs per example: {flops / 1e9:.1f} GFLOP (XLA cost analysis of "
                 f"this compile: {xla})")
    if row["gemm_flops_per_example"]:
        other = row["gemm_largest_other"]
        largest = (f"; largest other: {other[0][0]} {other[0][2] / 1e9:.2f} GFLOP "
                   f"({other[0][1]})" if other else "")
        attention = (f"; {row['fused_attention_calls']} cuDNN attention calls"
                     if row["fused_attention_calls"] else "")
        lines.append(f"  compiled matrix products: {row['gemm_flops_per_example'] / 1e9:.1f} "
                     f"GFLOP per example, {100 * row['gemm_bf16_share']:.2f} % bf16 x bf16"
                     f"{largest}{attention}")
    if row["kernels"]:
        counts = ", ".join(f"{k} {n}" for k, n in row["kernels"].items())
        lines.append(f"  kernels per step: {sum(row['kernels'].values())} ({counts}); "
                     f"bytes outside matrix products and attention "
                     f"{row['non_product_bytes'] / 1e9:.1f} GB, in products "
                     f"{row['kernel_bytes'].get('product', 0.0) / 1e9:.1f} GB")
    return "\n".join(lines)


def stand_in_note(row: dict) -> str:
    """What the verdict of a CPU stand-in compile is worth ('' for a real target)."""
    if not row.get("stand_in"):
        return ""
    target = row.get("target", "cpu")
    if target.startswith("tpu:"):
        return (f" (CPU stand-in for {target}, not the TPU compiler: its temporaries "
                f"differ from XLA:TPU's)")
    return " (CPU stand-in, not a GPU/TPU compiler: its temporaries are an estimate)"


def _chunk_sizes(text: str) -> list[int]:
    try:
        sizes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise TargetError(f"--loss-chunk-size {text!r}: a number or a comma list of "
                          "numbers") from None
    return sizes or [0]


def _per_device_batches(text: str, stages: list[str]) -> dict[str, int]:
    if "=" not in text:
        return dict.fromkeys(stages, int(text))
    pairs = dict(part.split("=") for part in text.split(",") if part)
    missing = [s for s in stages if s not in pairs]
    if missing:
        raise TargetError(f"--per-device-batch {text!r} has no entry for {missing}")
    return {s: int(pairs[s]) for s in stages}


def main(argv: list[str] | None = None) -> list[dict]:
    """Compiles every requested stage for the target and prints the memory report.

    Args:
      argv: command-line arguments (without the program name); None = sys.argv.

    Returns:
      One row per stage (see `compile_stage`).
    """
    args = parse_args(argv)
    stages = [s for s in args.stage.split(",") if s]
    batches = _per_device_batches(args.per_device_batch, stages)
    chunks = _chunk_sizes(args.loss_chunk_size)
    if (args.loss_kind or any(chunks)) and "cacophony" not in stages:
        raise TargetError("--loss-kind and --loss-chunk-size set stage 2's contrastive "
                          "loss; add --stage cacophony")
    devices, described, budget = target_devices(args.target, args.devices)
    if budget and not args.device_memory_gb:  # a TPU's HBM, for its CPU stand-in
        args.device_memory_gb = budget / 1e9
    if args.fused_norm and devices[0].platform not in ("cuda", "gpu"):
        raise TargetError("--fused-norm compiles Triton kernels for GPUs; elsewhere they "
                          "would be interpreted: use a gpu:<part> target")
    mesh = make_mesh(devices, args.mesh)
    if "cacophony" in stages:  # a chunk size that does not divide fails before any compile
        for chunk in chunks:
            train_step.make_config("cacophony", args.variant,
                                   batches["cacophony"] * mesh.devices.size,
                                   loss_chunk_size=chunk)
    print(f"target: {described}; mesh {dict(mesh.shape)}", flush=True)
    rows = []
    for stage in stages:
        for chunk in chunks if stage == "cacophony" else [0]:
            rows.append(compile_stage(stage, args, mesh, batches[stage], chunk))
            report.emit(rows[-1], format_row(rows[-1]), args.json)
    return rows


if __name__ == "__main__":
    report.run(main)

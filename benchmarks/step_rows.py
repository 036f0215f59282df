"""The rows of `train_step.py`: the flags that choose them, their loss and memory
fields, their table line, and a sweep that measures each row in a process of its own
(so its peak memory is its own).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import subprocess
import sys
import tempfile

import ml_collections

from benchmarks import report, tables
from cacophony_jax import losses

STAGES = ("mae", "cacophony")
LOSS_KINDS = losses.CONTRASTIVE_KINDS

def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model switches the step benchmarks share (remat, attention, SAM, fusions)."""
    p.add_argument("--remat", default="none", help="none | full | dots | minimal")
    p.add_argument("--attention", default="", help="xla | cudnn | auto (default: the config's)")
    p.add_argument("--sam", action="store_true", help="stage 2 with SAM (optim.sam.enabled)")
    p.add_argument("--fuse-qkv", action="store_true",
                   help="one matrix product for query, key and value (model.fuse_qkv)")
    p.add_argument("--fused-norm", action="store_true",
                   help="the audio blocks' LayerNorms as Pallas kernels (model.fused_norm)")


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """Parses train_step.py's command line: what to measure, one row per stage and
    batch size."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--stage", default="mae,cacophony", help="comma list of " + str(STAGES))
    p.add_argument("--variant", default="tiny", choices=("tiny", "base"))
    p.add_argument("--batch", type=int, default=8, help="global batch size")
    p.add_argument("--sweep-batch", default="", help="comma list of global batch sizes")
    p.add_argument("--dtype", default="", help="compute dtype (default: the config's)")
    p.add_argument("--scan", default="false", choices=("true", "false"), help="nn.scan stacks")
    add_model_flags(p)
    p.add_argument("--fsdp", type=int, default=1, help="mesh fsdp size (data takes the rest)")
    p.add_argument("--loss-kind", default="", choices=("", *LOSS_KINDS),
                   help="stage 2's contrastive loss (loss.kind; sigmoid also sets "
                        "model.sigmoid_bias); default: the config's, softmax")
    p.add_argument("--loss-chunk-size", type=int, default=0,
                   help="stage 2's contrastive loss in blocks of this many rows "
                        "(loss.chunk_size, must divide the global batch; 0: unblocked)")
    p.add_argument("--clip-seconds", type=float, default=0.0, help="0: the config's")
    p.add_argument("--text-length", type=int, default=0, help="0: the config's")
    p.add_argument("--frontend-sub-batches", type=int, default=0,
                   help="config.audio.frontend_sub_batches (0: the config's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps after compiling (at least one: its loss is reported)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak to use instead of the table / CPU measurement")
    p.add_argument("--profile", default="",
                   help="after timing, trace --profile-steps more steps into this folder "
                        "and summarise where the device time went (profile_summary.py)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps traced by --profile")
    p.add_argument("--json", default="", help="append the rows to this JSON-lines file")
    p.add_argument("--in-process", action="store_true",
                   help="measure every row in this process instead of one process per row "
                        "(a device's peak memory is then only attributable to a row that "
                        "raised it)")
    # Set by the parent for its row processes: the source of --peak-tflops, so that
    # every row of a sweep is measured against the peak the first one measured.
    p.add_argument("--peak-source", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def loss_fields(config: ml_collections.ConfigDict) -> dict:
    """Stage 2's contrastive-loss settings for a row (none for stage 1)."""
    if "loss" not in config:
        return {}
    return {"loss_kind": config.loss.kind, "loss_chunk_size": config.loss.chunk_size}


def loss_label(row: dict) -> str:
    """'sigmoid loss', 'softmax loss in chunks of 4096', ...; '' for the default loss."""
    kind, chunk = row.get("loss_kind", "softmax"), row.get("loss_chunk_size")
    if kind == "softmax" and not chunk:
        return ""
    return f"{kind} loss" + (f" in chunks of {chunk}" if chunk else "")


def device_memory_stats(device) -> dict:
    """`device.memory_stats()`, or {} where the backend has none (CPU)."""
    return device.memory_stats() or {}


def row_peak_memory(before: dict, after: dict) -> dict[str, int | bool]:
    """The device-memory fields of one row from `memory_stats()` before and after it.

    `peak_bytes_in_use` is the process's high-water mark, which JAX cannot reset. If
    it rose during the row, the new mark is the row's peak (with whatever earlier rows
    left allocated, `bytes_in_use_before`). If it did not, the row's own peak is
    unknown (an earlier row's was at least as high): the mark is kept as
    `process_peak_bytes_in_use` and `peak_not_attributable` is set, so that no row is
    ever labelled with another row's peak.

    Args:
      before, after: `device_memory_stats` of the row's device before and after it.

    Returns:
      {} where the backend has no memory statistics.
    """
    if "peak_bytes_in_use" not in after:
        return {}
    peak, earlier = int(after["peak_bytes_in_use"]), before.get("peak_bytes_in_use")
    if earlier is None or peak > int(earlier):
        return {"peak_bytes_in_use": peak,
                "bytes_in_use_before": int(before.get("bytes_in_use", 0))}
    return {"process_peak_bytes_in_use": peak, "peak_not_attributable": True}


def memory_label(mem: dict) -> tuple[int, str]:
    """(bytes, label) of a row's memory column: the row's peak where the device
    reported one for this row, else the compiled program's footprint."""
    if "peak_bytes_in_use" in mem:
        return mem["peak_bytes_in_use"], "peak"
    if mem.get("peak_not_attributable"):
        return mem.get("total", 0), "compiled; the process peak is an earlier row's"
    return mem.get("total", 0), "compiled"


def format_row(row: dict) -> str:
    """One fixed-width table line."""
    used, label = memory_label(row["memory"])
    return (f"{row['stage']:9s} {row['variant']:4s} {row['devices']:2d} dev batch "
            f"{row['batch']:5d} {row['dtype']:8s} scan={str(row['scan'])[0]} "
            f"remat={row['remat']:7s} attn={row['attention']:5s} {'SAM ' if row['sam'] else ''}"
            f"{'fused-qkv ' if row.get('fuse_qkv') else ''}"
            f"{'fused-norm ' if row.get('fused_norm') else ''}"
            f"{loss_label(row) + ' ' if loss_label(row) else ''}"
            f"fe_sub={row['frontend_sub_batches']:<3d} "
            f"step {1e3 * row['step_s']:9.1f} ms "
            f"{row['examples_per_s']:9.1f} ex/s {row['model_flops_per_example'] / 1e9:8.2f} "
            f"GFLOP/ex {row['tflops_per_device']:8.4f} TFLOP/s/dev MFU "
            f"{100 * row['mfu']:5.1f}% mem/dev {used / 2**20:8.1f} MiB ({label}) "
            f"compile {row['compile_s']:.1f} s")


def run_rows_apart(script: pathlib.Path, argv: list[str], cells: list[tuple[str, int]],
                   dtypes: list[str], json_path: str) -> list[dict]:
    """Measures each (stage, batch) row in a process of its own and collects the rows.

    Each process is this script with the same flags for one row; it prints its own
    line. Rows of one compute dtype share the peak FLOP/s that the first of them
    measured (on CPU a matmul timing), as they would in one process. A row that fails
    (say, out of memory at the largest batch) is reported and the others still run.

    Args:
      script: train_step.py, run once per row.
      argv: the command line (without the program name).
      cells: (stage, global batch) of every row, in order.
      dtypes: each row's compute dtype (the peak FLOP/s depends on it).
      json_path: where the rows are appended ("" = nowhere).

    Returns:
      The rows that were measured.

    Raises:
      ValueError: after the last row, if any row failed.
    """
    print(f"{len(cells)} rows, each in its own process (so that its peak memory is its "
          f"own; --in-process runs them all in this one)", flush=True)
    rows, failed, peaks = [], [], {}
    with tempfile.TemporaryDirectory(prefix="train-step-rows-") as folder:
        for i, ((stage, batch), dtype) in enumerate(zip(cells, dtypes, strict=True)):
            out = pathlib.Path(folder) / f"row-{i}.jsonl"
            # "--flag=value": a value may itself start with "--" (the source "--peak-tflops").
            extra = [f"--stage={stage}", f"--batch={batch}", "--sweep-batch=", f"--json={out}",
                     "--in-process"]
            if dtype in peaks:
                tflops, source = peaks[dtype]
                extra += [f"--peak-tflops={tflops!r}", f"--peak-source={source}"]
            code = subprocess.run([sys.executable, str(script),
                                   *argv, *extra], check=False).returncode
            got = tables.read_rows([out])
            if code or not got:
                failed.append(f"{stage} batch {batch} (exit {code})")
                print(f"{stage} batch {batch}: its process failed (exit {code}); the other "
                      f"rows go on", flush=True)
                continue
            for row in got:
                if math.isfinite(row["peak_tflops"]):
                    peaks.setdefault(row["dtype"], (row["peak_tflops"], row["peak_source"]))
                report.append(row, json_path)
            rows += got
    if failed:
        raise ValueError(f"{len(failed)} of {len(cells)} rows failed: {', '.join(failed)}")
    return rows

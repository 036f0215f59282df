"""Markdown tables of the measurement rows that `suite.py` collects (`summary.md`).

One table per kind of row: attention checks, train steps, profiles, training runs,
LayerNorm kernels and input pipeline rows; each kind is recognised by its keys.
"""

from __future__ import annotations

import json
import pathlib


def _table(header: list[str], cells: list[list[str]]) -> list[str]:
    """Markdown lines of one table (and a blank line after it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in cells] + [""]


def summarize(rows: list[dict]) -> str:
    """Markdown tables of attention-check, train-step, training-run and input rows."""
    out = []
    parity = [r for r in rows if "grad_leaf_median_rel" in r]
    if parity:
        out += _table(
            ["attention check", "batch", "loss difference",
             "gradient difference (median array)", "verdict"],
            [[f"{r['stage']} {r['variant']}, xla vs {r['attention']}", str(r["batch"]),
              f"{r['loss_rel']:.1e}", f"{r['grad_rel']:.1e} ({r['grad_leaf_median_rel']:.1e})",
              "same" if r["same"] else "DIFFERENT"] for r in parity])
    steps = [r for r in rows if "step_s" in r]
    if steps:
        def used_gib(mem: dict) -> str:
            # The device's peak where it reported one for this row (GPU/TPU), else
            # the compiled program's footprint; never an earlier row's peak.
            if "peak_bytes_in_use" in mem:
                return f"{mem['peak_bytes_in_use'] / 2**30:.1f}"
            return f"{mem.get('total', 0) / 2**30:.1f} (compiled)"
        out += _table(
            ["stage", "batch", "attention", "remat", "SAM", "step ms", "examples/s", "MFU",
             "memory GiB", "loss, step 1"],
            [[r["stage"] + (" fused qkv" if r.get("fuse_qkv") else "")
              + (" fused norm" if r.get("fused_norm") else "")
              + (f" ({r['xla_flags']})" if r.get("xla_flags") else ""),
              str(r["batch"]), r["attention"], r["remat"],
              "yes" if r["sam"] else "no", f"{1e3 * r['step_s']:.1f}",
              f"{r['examples_per_s']:.1f}", f"{100 * r['mfu']:.1f} %",
              used_gib(r["memory"]),
              f"{r['first_loss']:.5g}" if "first_loss" in r else "n/a"] for r in steps])
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        labels = ("matmul", "attention", "fusion/other", "copy", "collective")
        out += _table(
            ["profiled step", "batch", "busy", *(f"{k} ms" for k in labels),
             "products' TFLOP/s"],
            [[f"{r['stage']} {r['attention']}", str(r["batch"]),
              f"{100 * r['profile']['busy_fraction']:.1f} %",
              *(f"{r['profile']['categories'].get(k, {}).get('ms_per_step', 0.0):.1f}"
                for k in labels),
              f"{r['profile'].get('product_tflops', float('nan')):.3g}"] for r in profiled])
    runs = [r for r in rows if r.get("kind") == "train"]
    if runs:
        out += _table(
            ["training run", "batch", "workers", "steps", "examples/s", "MFU",
             "TFLOP/s/device", "input wait", "failed records"],
            [[f"{r['stage']} {r['variant']}"
              + (f", {r['allocator']} allocator" if r.get("allocator") else ""),
              str(r["batch"]), str(r["workers"]),
              f"{r['last_step']:.0f}" + (" (stopped)" if r.get("exit") else ""),
              f"{r['examples_per_sec']:.1f}",
              f"{100 * r['mfu']:.1f} %" if "mfu" in r else "n/a",
              f"{r.get('model_tflops_per_device', float('nan')):.3g}",
              f"{100 * r['input_wait_fraction']:.1f} %", f"{r['failed_records']:.0f}"]
             for r in runs])
    norms = [r for r in rows if "forward_ms" in r]
    if norms:
        out += _table(
            ["LayerNorm", "tokens x width", "forward ms", "GB/s", "forward + gradient ms",
             "GB/s", "gradients vs XLA"],
            [["XLA" if r["norm"] == "xla" else f"kernels, rows {r['rows']}, warps {r['warps']}",
              f"{r['tokens']} x {r['width']}", f"{r['forward_ms']:.3f}",
              f"{r['forward_gb_per_s']:.0f}", f"{r['grad_ms']:.3f}",
              f"{r['grad_gb_per_s']:.0f}", f"{r['max_grad_rel']:.1e}"] for r in norms])
    inputs = [r for r in rows if "bench" in r]
    if inputs:
        out += _table(["input", "config", "clips/s", "cores", "clips/s/core"],
                      [[r["bench"], r["config"], f"{r['clips_per_s']:.1f}", str(r["cores"]),
                        f"{r['clips_per_s_per_core']:.1f}"] for r in inputs])
    return "\n".join(out) if out else "(no rows)\n"


def read_rows(paths: list[pathlib.Path]) -> list[dict]:
    rows = []
    for path in paths:
        if path.exists():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    return rows

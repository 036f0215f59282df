"""What to do when a training step runs out of device memory.

XLA reports it as a JaxRuntimeError whose message starts "RESOURCE_EXHAUSTED: Out of
memory while trying to allocate ..." (at compile time or, asynchronously, at the
first read of a later step's result), followed by the allocator's whole state. The
run ends with the first line of that message and the settings that lower memory.
"""

from __future__ import annotations

import re

import ml_collections

# XLA:GPU "Out of memory while trying to allocate", XLA:TPU "Ran out of memory in memory
# space hbm", PJRT "Failed to allocate request for". RESOURCE_EXHAUSTED alone is not
# enough: TensorStore reports a full disk with it too.
_OUT_OF_MEMORY = re.compile(r"out of memory|failed to allocate", re.IGNORECASE)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an out-of-memory error of a device (a RuntimeError saying so)."""
    return isinstance(error, RuntimeError) and bool(_OUT_OF_MEMORY.search(str(error)))


def message(error: BaseException, stage: ml_collections.ConfigDict, devices: int,
            platform: str, stage_name: str | None = None) -> str:
    """One paragraph: what XLA said (its first line) and what lowers memory.

    `stage` is the config that ran out (a multi-stage recipe's stage, named
    `stage_name`: its settings are then given as --config.stages.<name>.*). Settings
    already in effect (cuDNN attention, remat) are not suggested again.
    """
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    key = f"stages.{stage_name}." if stage_name else ""
    batch = stage.data.global_batch_size
    attention = stage.model.get("attention", "")
    remat = stage.model.get("remat", "none") or "none"
    fixes = [f"lower {key}data.global_batch_size ({batch}: {batch / max(1, devices):g} "
             "per device)"]
    if remat not in ("dots", "full"):
        fixes.append(f"set {key}model.remat=dots (recomputes some activations: +3 % FLOPs)")
    elif remat == "dots":
        fixes.append(f"set {key}model.remat=full (recomputes each block: +24 % FLOPs)")
    if platform == "gpu":
        if attention != "cudnn":
            fixes.append(f"use {key}model.attention=cudnn")
        fixes += ["raise XLA_PYTHON_CLIENT_MEM_FRACTION (JAX takes 0.75 of the GPU by "
                  "default)",
                  "or, where the allocator's summary shows enough free memory in pieces, "
                  "set XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async"]
    where = f"stage {stage_name!r}: " if stage_name else ""
    return (f"{where}the training step ran out of device memory ({said}). To fit: "
            + "; ".join(fixes) + ". Per-device memory by batch: docs/scaling.md, "
            "\"Per-device batch and memory\"; benchmarks/train_step.py --sweep-batch "
            "measures it on your device.")

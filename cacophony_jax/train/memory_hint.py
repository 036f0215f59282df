"""What to do when a training step runs out of device memory.

XLA reports it as a JaxRuntimeError whose message starts "RESOURCE_EXHAUSTED: Out of
memory while trying to allocate ..." (at compile time or, asynchronously, at the
first read of a later step's result), followed by the allocator's whole state. The
run ends with the first line of that message and the settings that lower memory.
"""

from __future__ import annotations

import re

# XLA:GPU "Out of memory while trying to allocate", XLA:TPU "Ran out of memory in memory
# space hbm", PJRT "Failed to allocate request for". RESOURCE_EXHAUSTED alone is not
# enough: TensorStore reports a full disk with it too.
_OUT_OF_MEMORY = re.compile(r"out of memory|failed to allocate", re.IGNORECASE)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an out-of-memory error of a device (a RuntimeError saying so)."""
    return isinstance(error, RuntimeError) and bool(_OUT_OF_MEMORY.search(str(error)))


def message(error: BaseException, global_batch: int, devices: int, platform: str,
            attention: str = "", remat: str = "none") -> str:
    """One paragraph: what XLA said (its first line) and what lowers memory.

    Settings already in effect (`attention`, `remat`: the model config's) are not
    suggested again.
    """
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    per_device = global_batch / max(1, devices)
    fixes = [f"lower data.global_batch_size ({global_batch}: {per_device:g} per device)"]
    if remat in ("", "none"):
        fixes.append("set model.remat=dots (recomputes some activations: +3 % FLOPs)")
    if platform == "gpu":
        if attention != "cudnn":
            fixes.append("use model.attention=cudnn")
        fixes += ["raise XLA_PYTHON_CLIENT_MEM_FRACTION (JAX takes 0.75 of the GPU by "
                  "default)",
                  "or, where the allocator's summary shows enough free memory in pieces, "
                  "set XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async"]
    return (f"the training step ran out of device memory ({said}). To fit: "
            + "; ".join(fixes) + ". Per-device memory by batch: docs/scaling.md, "
            "\"Per-device batch and memory\"; benchmarks/train_step.py --sweep-batch "
            "measures it on your device.")

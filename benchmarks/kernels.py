"""Kernels of a compiled step and the bytes each moves, read from its optimised HLO.

A step whose matrix products run near the tensor cores' peak can still be slow if
the rest of it (normalisations, activations and their gradients, bias gradients,
layout copies, the optimiser update) moves many bytes or launches many small
kernels. Without the device, the compiled program still tells both: every
instruction of the entry computation that is not bookkeeping (parameter, constant,
tuple, get-tuple-element, bitcast) becomes one kernel or library call, and the sizes
of its operands and results bound the bytes it reads and writes.

`summarize` groups the entry computation's instructions:

- "product": cuBLAS calls and Triton GEMM fusions,
- "attention": cuDNN fused attention calls,
- "collective": all-reduce, all-gather, reduce-scatter, all-to-all, permutes,
- "copy": layout copies and transposes,
- "fusion": every other fusion (kLoop, kInput, kOutput),
- "other": anything else (custom calls, sorts, scatters outside fusions, ...).

Operands are counted whole even where a kernel reads only part of them, and a
kernel that reads an operand twice counts it once; loop bodies (a scanned stack)
count once. `floor_seconds` turns a summary into a lower bound of the step's time:
products at a given matrix rate, every other byte at a given memory bandwidth.
Meant for XLA:GPU compiles; XLA:CPU's and XLA:TPU's programs are read the same way
but their "kernels" are not launches.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_SIZES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
          "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_SIZES) + r")\[([0-9,]*)\]")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*?)\)(, .*)?$")
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast")
CATEGORIES = ("product", "attention", "fusion", "copy", "collective", "other")


@dataclasses.dataclass
class KernelSummary:
    """Kernel counts and operand + result bytes of a compiled step, per category."""

    counts: dict[str, int]
    bytes: dict[str, float]
    largest: list[tuple[float, str, str]]  # (bytes, category, op name), non-product kernels

    @property
    def kernels(self) -> int:
        return sum(self.counts.values())

    def non_product_bytes(self) -> float:
        """Bytes moved by everything except matrix products and fused attention."""
        return sum(b for k, b in self.bytes.items() if k not in ("product", "attention"))


def type_bytes(type_text: str) -> int:
    """Bytes of an HLO type, summed over a tuple's elements (layouts ignored)."""
    return sum(_SIZES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _SHAPE.findall(type_text))


def entry_computation(hlo_text: str) -> str:
    """The body of the ENTRY computation of an HLO module's text."""
    start = hlo_text.find("\nENTRY ")
    if start < 0:
        raise ValueError("no ENTRY computation in this HLO text")
    body = hlo_text[hlo_text.index("{\n", start) + 2:]
    end = body.find("\n}\n")
    return body if end < 0 else body[:end]


def category(op: str, attrs: str) -> str:
    """The category (see CATEGORIES) of one entry instruction."""
    if op == "custom-call":
        if "__cublas$" in attrs:
            return "product"
        if "__cudnn$fmha" in attrs:
            return "attention"
        return "other"
    if op == "fusion":
        if "__triton_gemm" in attrs or '"kind":"__cublas' in attrs:
            return "product"
        return "fusion"
    if op in ("copy", "transpose", "copy-start"):
        return "copy"
    base = op[:-6] if op.endswith("-start") else op
    if base in _COLLECTIVES:
        return "collective"
    return "other"


def summarize(hlo_text: str, keep: int = 10) -> KernelSummary:
    """Reads a compiled step's entry computation (see the module docstring).

    Args:
      hlo_text: `compiled.as_text()`.
      keep: how many of the largest non-product kernels to list.

    Returns:
      A KernelSummary.
    """
    sizes: dict[str, int] = {}
    counts: collections.Counter = collections.Counter()
    moved: collections.Counter = collections.Counter()
    largest = []
    for line in entry_computation(hlo_text).splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        name, out_type, op, operands, attrs = match.groups()
        attrs = attrs or ""
        sizes[name] = type_bytes(out_type)
        if op in _FREE or op.endswith("-done"):
            continue
        read = sum(sizes.get(o, 0) for o in dict.fromkeys(re.findall(r"%([\w.\-]+)", operands)))
        total = read + sizes[name]
        kind = category(op, attrs)
        counts[kind] += 1
        moved[kind] += total
        if kind not in ("product", "attention"):
            op_name = re.search(r'op_name="([^"]*)"', attrs)
            largest.append((float(total), kind, op_name.group(1) if op_name else name))
    largest.sort(key=lambda item: -item[0])
    return KernelSummary({k: counts[k] for k in CATEGORIES if counts[k]},
                         {k: float(moved[k]) for k in CATEGORIES if counts[k]},
                         largest[:keep])


def floor_seconds(summary: KernelSummary, product_flops: float, matrix_flops_per_s: float,
                  bytes_per_s: float) -> float:
    """A lower bound of the step's time: products at a matrix rate, other bytes at a bandwidth.

    Fused attention is left out (its time depends on the kernel, not its operands).

    Args:
      summary: from `summarize`.
      product_flops: FLOPs of the step's matrix products (`gemms.summarize(...).total`).
      matrix_flops_per_s: achievable rate of large bf16 products on the device.
      bytes_per_s: the device's memory bandwidth.

    Returns:
      Seconds.
    """
    return product_flops / matrix_flops_per_s + summary.non_product_bytes() / bytes_per_s

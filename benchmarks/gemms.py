"""Matrix products of a compiled step, by operand dtype, read from its optimised HLO.

Whether a step's matrix products really run in bf16 decides whether a GPU's tensor
cores reach their bf16 peak: an f32 product on an H100 runs at a fraction of it. The
jaxpr says what the program asks for; the compiled HLO says what the compiler made of
it (which products were fused, upcast or offloaded). This reads every `dot` and every
cuBLAS call (`__cublas$gemm`, `__cublas$lt$matmul`) of `compiled.as_text()`, resolves
the operands' types from their definitions, and adds up 2 x output elements x
contracted length per product, grouped as "lhs x rhs -> out" dtypes. cuDNN fused
attention calls are counted but hold no visible products. The breakdown is meant for
XLA:GPU compiles: XLA:CPU upcasts bf16 products to f32, and XLA:TPU rewrites batched
products as dilated convolutions, which are not read (a TPU compile shows none).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (\(?[a-z][a-z0-9]*\[[0-9,]*\])", re.M)
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+ = ([^=\n]*?) "
                    r"(dot|custom-call)\(([^)]*)\)(.*)$", re.M)
_CUBLAS = ('"__cublas$gemm"', '"__cublas$lt$matmul"')
_CUDNN_ATTENTION = '"__cudnn$fmha'


@dataclasses.dataclass
class GemmSummary:
    """FLOPs of the compiled step's matrix products."""

    by_dtype: dict[str, float]  # "bf16xbf16->bf16" -> FLOPs
    largest_other: list[tuple[str, str, float]]  # (dtypes, op name, FLOPs), not bf16 x bf16
    fused_attention_calls: int

    @property
    def total(self) -> float:
        return sum(self.by_dtype.values())

    def share(self, operand_dtype: str = "bf16") -> float:
        """Fraction of the FLOPs whose two operands are `operand_dtype`."""
        prefix = f"{operand_dtype}x{operand_dtype}->"
        counted = sum(f for k, f in self.by_dtype.items() if k.startswith(prefix))
        return counted / self.total if self.total else float("nan")


def _dtype_and_shape(type_text: str) -> tuple[str, list[int]]:
    match = _SHAPE.search(type_text)
    return match.group(1), [int(d) for d in match.group(2).split(",") if d]


def _contracting(attrs: str, custom_call: bool) -> list[int]:
    if custom_call:
        config = json.loads(re.search(r"backend_config=(\{.*\})\s*$", attrs).group(1))
        numbers = config["gemm_backend_config"]["dot_dimension_numbers"]
        return [int(d) for d in numbers["lhs_contracting_dimensions"]]
    match = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def summarize(hlo_text: str, keep: int = 5) -> GemmSummary:
    """Matrix-product FLOPs of an optimised HLO module, by operand and output dtype.

    Args:
      hlo_text: `compiled.as_text()`.
      keep: how many of the largest non-bf16 products to list.

    Returns:
      A GemmSummary. Loop bodies count once (as XLA prints them).
    """
    types = {m.group(1): m.group(2) for m in _DEF.finditer(hlo_text)}
    by_dtype: collections.Counter = collections.Counter()
    others: collections.Counter = collections.Counter()
    attention = 0
    for match in _INSTR.finditer(hlo_text):
        out_type, kind, operands, attrs = match.groups()
        custom = kind == "custom-call"
        if custom:
            if _CUDNN_ATTENTION in attrs:
                attention += 1
            if not any(target in attrs for target in _CUBLAS):
                continue
        names = [o.strip().lstrip("%") for o in operands.split(",")]
        if len(names) < 2 or names[0] not in types or names[1] not in types:
            continue
        lhs_dtype, lhs_shape = _dtype_and_shape(types[names[0]])
        rhs_dtype, _ = _dtype_and_shape(types[names[1]])
        out_dtype, out_shape = _dtype_and_shape(out_type)
        contracted = math.prod(lhs_shape[d] for d in _contracting(attrs, custom))
        flops = 2.0 * math.prod(out_shape) * contracted
        key = f"{lhs_dtype}x{rhs_dtype}->{out_dtype}"
        by_dtype[key] += flops
        if not (lhs_dtype == rhs_dtype == "bf16"):
            op = re.search(r'op_name="([^"]*)"', attrs)
            others[(key, op.group(1) if op else "?")] += flops
    largest = [(k, name, f) for (k, name), f in others.most_common(keep)]
    return GemmSummary(dict(by_dtype), largest, attention)

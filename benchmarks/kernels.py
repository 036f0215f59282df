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
- "pallas": Pallas kernels lowered through Triton (`model.fused_norm`),
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

`by_group` adds the bytes up by where in the model the kernels come from, and the
command line prints that for one compiled step, or what changed between two (save
them with `aot_compile.py --dump-hlo DIR`):

    python benchmarks/kernels.py DIR/mae.hlo.txt
    python benchmarks/kernels.py BEFORE/mae.hlo.txt AFTER/mae.hlo.txt --depth 5
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import re
import sys

if __name__ == "__main__":  # run from a checkout: make the sibling modules importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.collectives import type_bytes  # noqa: E402

_LINE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*?)\)(, .*)?$")
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast")
CATEGORIES = ("product", "attention", "pallas", "fusion", "copy", "collective", "other")


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
        if "__gpu$xla.gpu.triton" in attrs:
            return "pallas"
        return "other"
    if op == "fusion":
        # Triton GEMM fusions: "__triton_gemm" (older XLA), "__triton_nested_gemm_fusion".
        if re.search(r'"kind":\s*"__triton\w*gemm', attrs) or '"kind":"__cublas' in attrs:
            return "product"
        return "fusion"
    if op in ("copy", "transpose", "copy-start"):
        return "copy"
    base = op[:-6] if op.endswith("-start") else op
    if base in _COLLECTIVES:
        return "collective"
    return "other"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel (or library call) of the entry computation."""

    category: str
    bytes: int  # operands (each once) + results
    op_name: str  # the JAX op that made it (metadata), else "opcode result-type"


def kernels(hlo_text: str) -> list[Kernel]:
    """Every kernel of a compiled step's entry computation, in program order."""
    sizes: dict[str, int] = {}
    out = []
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
        op_name = re.search(r'op_name="([^"]*)"', attrs)
        # Unnamed kernels (copies XLA adds itself) go by opcode and result type.
        unnamed = f"{op} {re.sub(r'{[^}]*}', '', out_type)}"
        out.append(Kernel(category(op, attrs), read + sizes[name],
                          op_name.group(1) if op_name else unnamed))
    return out


def summarize(hlo_text: str, keep: int = 10) -> KernelSummary:
    """Reads a compiled step's entry computation (see the module docstring).

    Args:
      hlo_text: `compiled.as_text()`.
      keep: how many of the largest non-product kernels to list.

    Returns:
      A KernelSummary.
    """
    counts: collections.Counter = collections.Counter()
    moved: collections.Counter = collections.Counter()
    largest = []
    for kernel in kernels(hlo_text):
        counts[kernel.category] += 1
        moved[kernel.category] += kernel.bytes
        if kernel.category not in ("product", "attention"):
            largest.append((float(kernel.bytes), kernel.category, kernel.op_name))
    largest.sort(key=lambda item: -item[0])
    return KernelSummary({k: counts[k] for k in CATEGORIES if counts[k]},
                         {k: float(moved[k]) for k in CATEGORIES if counts[k]},
                         largest[:keep])


def op_group(op_name: str, depth: int = 4) -> str:
    """A kernel's op name shortened to its place in the model.

    The jit wrapper is dropped, the backward pass (``transpose(jvp(...))``) and the
    forward pass (``jvp(...)``) become ``bwd/`` and ``fwd/``, layer indices become
    ``block_N``, and `depth` path components are kept:
    ``jit(constrained)/transpose(jvp(MAE))/decoder/block_3/mlp/wi/reduce_sum`` ->
    ``bwd/decoder/block_N/mlp`` at depth 4.
    """
    name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    name = re.sub(r"^transpose\(jvp\([^)]*\)\)", "bwd", name)
    name = re.sub(r"^jvp\([^)]*\)", "fwd", name)
    name = re.sub(r"block_\d+", "block_N", name)
    return "/".join(name.split("/")[:depth])


def by_group(hlo_text: str, depth: int = 4,
             skip: tuple[str, ...] = ("product", "attention")) -> dict[str, tuple[int, float]]:
    """(kernel count, bytes) per "category op-group" (see `op_group`), largest first."""
    groups: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for kernel in kernels(hlo_text):
        if kernel.category in skip:
            continue
        group = groups[f"{kernel.category} {op_group(kernel.op_name, depth)}"]
        group[0] += 1
        group[1] += kernel.bytes
    return {k: (n, b) for k, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])}


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


def _totals(label: str, summary: KernelSummary) -> str:
    counts = ", ".join(f"{k} {n}" for k, n in summary.counts.items())
    return (f"{label}: {summary.kernels} kernels ({counts}); "
            f"{summary.bytes.get('product', 0.0) / 1e9:.1f} GB in products, "
            f"{summary.non_product_bytes() / 1e9:.1f} GB elsewhere")


def main(argv: list[str] | None = None) -> list[tuple[str, int, float]]:
    """Prints the groups of one compiled step, or the changes between two.

    Args:
      argv: command-line arguments (without the program name); None = sys.argv.

    Returns:
      The printed rows: (group, kernels, bytes), or their differences for two files.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hlo", nargs="+", help="one or two compiled.as_text() files")
    p.add_argument("--depth", type=int, default=4, help="op-name components per group")
    p.add_argument("--top", type=int, default=25, help="rows to print")
    args = p.parse_args(argv)
    if len(args.hlo) > 2:
        raise ValueError("give one compiled step, or two to compare")
    texts = []
    for path in args.hlo:
        try:
            texts.append(pathlib.Path(path).read_text())
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror}") from error
    for path, text in zip(args.hlo, texts, strict=True):
        print(_totals(path, summarize(text)))
    groups = [by_group(text, args.depth) for text in texts]
    if len(groups) == 1:
        rows = [(k, n, b) for k, (n, b) in groups[0].items()]
        print("kernels outside products and attention, by group:")
    else:
        before, after = groups
        keys = set(before) | set(after)
        rows = [(k, after.get(k, (0, 0.0))[0] - before.get(k, (0, 0.0))[0],
                 after.get(k, (0, 0.0))[1] - before.get(k, (0, 0.0))[1]) for k in keys]
        rows.sort(key=lambda r: (-abs(r[2]), -abs(r[1]), r[0]))
        rows = [r for r in rows if r[1] or r[2]]
        print("changes, second minus first, by group:")
    rows = rows[:args.top]
    for group, count, moved in rows:
        print(f"  {moved / 1e9:+9.2f} GB {count:+6d} kernels  {group}" if len(groups) == 2
              else f"  {moved / 1e9:9.2f} GB {count:6d} kernels  {group}")
    return rows


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")

"""Where a step's device time goes, read from a JAX profiler trace.

Reads the newest `*.xplane.pb` under a trace folder (what `jax.profiler.trace`,
`train_step.py --profile` and the training loop's `train.profile_steps` write) and
sorts the device's time into categories: matrix products (cuBLAS / cuBLASLt / Triton
GEMM kernels, XLA dots), fused attention (cuDNN), convolutions, collectives, copies,
and everything else XLA fused (elementwise work, reductions, norms, the optimiser).

Usage:

    python benchmarks/profile_summary.py WORKDIR/profile --steps 5
    python benchmarks/profile_summary.py TRACE_DIR --steps 3 --model-gflop 85170 --json rows.jsonl

Which events count:
- GPU: the kernels and copies on the device planes' "Stream ..." lines (the "XLA Ops"
  and "XLA Modules" lines repeat the same time and are skipped);
- TPU: the device planes' "XLA Ops" line;
- CPU (no device plane): the host threads' events that ran an XLA operation (those
  carrying an `hlo_op` statistic).

The summary is meant for GPU (and TPU) profiles. On CPU the names do not tell the
matrix products apart: XLA:CPU runs most of them inside YNNPACK fusions
(`ynn_fusion.N`), as it runs many reductions. Given the compiled step's HLO text
(`--hlo`; `train_step.py --profile` passes its own), every operation whose fused
computation holds a dot or a convolution is sorted as a product. Without it a CPU
trace's fusions stay "fusion/other", the products' rate is left out (it would
divide the model FLOPs by the few unfused dots' time), and the summary says so.

Only device 0 is read (the first device plane with events; on CPU, the events whose
`device_ordinal` is 0): every device of an SPMD step runs the same program.

`busy` is the union of those events' intervals, so kernels overlapping on two streams
count once; `span` runs from the first event to the last. With `--model-gflop` (the
step's model FLOPs on one device), the summary adds the rate the matrix products and
attention kernels ran at while they ran: if that is near the chip's matmul rate and
MFU is still low, the time goes to the other categories.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import re
import sys
from collections.abc import Iterable

# Name fragments (lower case) of each category, tested in this order against the
# kernel name and the HLO op name; the first match wins.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("fmha", "sdpa", "flash_attention", "dot_product_attention")),
    ("collective", ("nccl", "all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                    "collective-permute", "allreduce", "allgather", "reducescatter")),
    ("convolution", ("convolution", "cudnn-conv", "fprop", "dgrad", "wgrad")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "wgmma", "cublas", "matmul", "dot.",
                "dot_")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
)
OTHER = "fusion/other"


def category(kernel: str, hlo_op: str = "", products: dict[str, str] | None = None) -> str:
    """The category of one event from its kernel name and HLO op name.

    `products` (from `product_ops`) sorts the operations whose names do not say that
    they hold a matrix product or convolution (XLA:CPU's `ynn_fusion.N`).
    """
    names = (kernel.lower(), hlo_op.lower())
    for label, fragments in CATEGORIES:
        if any(f in name for name in names for f in fragments):
            if label == "copy" and products and hlo_op in products:
                return products[hlo_op]
            return label
    if products and hlo_op in products:
        return products[hlo_op]
    return OTHER


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) \(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\(")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)")
_PRODUCT_OPCODES = {"dot": "matmul", "convolution": "convolution"}


def product_ops(hlo_text: str) -> dict[str, str]:
    """Operation name -> "matmul" or "convolution" for every instruction of an
    optimised HLO module (`compiled.as_text()`) that is, or calls a computation that
    holds, a dot or a convolution: e.g. XLA:CPU's `ynn_fusion.N` around a product."""
    holds: dict[str, set[str]] = collections.defaultdict(set)  # computation -> opcodes
    callees: dict[str, list[str]] = collections.defaultdict(list)  # computation -> called
    instructions: list[tuple[str, str, list[str]]] = []
    computation = ""
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            computation = match.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if match and computation:
            called = _CALLED.findall(line)
            holds[computation].add(match.group(2))
            callees[computation] += called
            instructions.append((match.group(1), match.group(2), called))
    memo: dict[str, str] = {}

    def kind(computation: str, seen: frozenset = frozenset()) -> str:
        if computation not in memo:
            found = next((_PRODUCT_OPCODES[o] for o in _PRODUCT_OPCODES
                          if o in holds[computation]), "")
            for called in callees[computation]:
                if found or called in seen:
                    break
                found = kind(called, seen | {computation})
            memo[computation] = found
        return memo[computation]

    out = {}
    for name, opcode, called in instructions:
        found = _PRODUCT_OPCODES.get(opcode) or next(filter(None, map(kind, called)), "")
        if found:
            out[name] = found
    return out


@dataclasses.dataclass
class Event:
    name: str  # the kernel (GPU) or op (TPU, CPU) name
    hlo_op: str
    start_ns: float
    duration_ns: float


def newest_trace(path: pathlib.Path) -> pathlib.Path:
    """`path` itself if it is a trace file, else the newest `*.xplane.pb` under it."""
    if path.is_file():
        return path
    traces = sorted(path.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *.xplane.pb trace under {path}; write one with "
                                "--config.train.profile_steps=N or train_step.py --profile")
    return traces[-1]


def _device_index(name: str) -> tuple[int, str]:
    tail = name.rsplit(":", 1)[-1]
    return (int(tail) if tail.isdigit() else 1 << 30, name)


def device_events(profile) -> tuple[list[Event], str]:
    """(the events that are device work, where they came from) of a ProfileData.

    Only the first device with events is read: in an SPMD step every device runs the
    same program, and their times must not be added up.
    """
    planes = sorted((p for p in profile.planes
                     if p.name.startswith("/device:") and "CUSTOM" not in p.name),
                    key=lambda p: _device_index(p.name))
    for plane in planes:
        lines = list(plane.lines)
        chosen = [line for line in lines if line.name.startswith("Stream")]
        if not chosen:
            chosen = [line for line in lines if line.name == "XLA Ops"]
        events = [Event(e.name, str(dict(e.stats).get("hlo_op", "")), e.start_ns,
                        e.duration_ns) for line in chosen for e in line.events]
        if events:
            return events, (f"{plane.name}: "
                            + ", ".join(sorted({line.name for line in chosen})))
    events = []
    for plane in profile.planes:  # CPU: XLA's thunks run on host threads
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                # Simulated CPU devices share the threads: keep device 0's ops.
                if "hlo_op" in stats and int(stats.get("device_ordinal", 0)) == 0:
                    events.append(Event(e.name, str(stats["hlo_op"]), e.start_ns,
                                        e.duration_ns))
    return events, "host threads running device 0's XLA ops" if events else "nothing"


def union_ns(events: Iterable[Event]) -> float:
    """Length of the union of the events' intervals."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e.start_ns):
        stop = e.start_ns + e.duration_ns
        if e.start_ns >= end:
            total += e.duration_ns
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def operation_name(event: Event) -> str:
    """The name an event is listed under: its HLO op, or its kernel when there is no op
    or the op is a CUDA-graph command buffer (XLA:GPU runs most of a step's kernels as
    one `command_buffer_N` op, which names none of them)."""
    if event.hlo_op and not event.hlo_op.startswith("command_buffer"):
        return event.hlo_op
    return event.name


def summarize(events: list[Event], steps: int = 1, model_gflop: float = 0.0,
              top: int = 15, products: dict[str, str] | None = None,
              host: bool = False) -> dict:
    """Per-step milliseconds by category and by operation, busy time and span.

    Args:
      events: device 0's events (`device_events`).
      steps: steps the trace holds.
      model_gflop: model GFLOP of one step on one device (adds the products' rate).
      top: operations listed.
      products: `product_ops` of the step's HLO, to sort operations whose names do
        not say what they hold.
      host: the events are a CPU's host threads (see the module docstring): without
        `products` the products' rate is left out and a note says why.
    """
    if not events:
        raise ValueError("the trace holds no device events (was the step run inside "
                         "the trace, and did the run reach the profiled steps?)")
    steps = max(1, steps)
    by_cat: dict[str, float] = collections.defaultdict(float)
    by_op: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        label = category(e.name, e.hlo_op, products)
        by_cat[label] += e.duration_ns
        entry = by_op[(label, operation_name(e))]
        entry[0] += e.duration_ns
        entry[1] += 1
    kernel_ns = sum(by_cat.values())
    busy = union_ns(events)
    span = max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)
    out = {
        "steps": steps, "events": len(events),
        "busy_ms_per_step": busy / 1e6 / steps, "span_ms_per_step": span / 1e6 / steps,
        "busy_fraction": busy / span if span else 1.0,
        "categories": {k: {"ms_per_step": v / 1e6 / steps, "share": v / kernel_ns}
                       for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"category": label, "op": op, "ms_per_step": ns / 1e6 / steps,
                     "calls_per_step": n / steps, "share": ns / kernel_ns}
                    for (label, op), (ns, n) in sorted(by_op.items(),
                                                       key=lambda kv: -kv[1][0])[:top]],
    }
    product_ns = by_cat.get("matmul", 0.0) + by_cat.get("attention", 0.0)
    if host:
        out["note"] = (
            "a CPU trace (host threads): XLA:CPU's fusions hold products and other work "
            "alike, " + ("sorted here by the step's HLO" if products is not None else
                         "and without the step's HLO (--hlo) they stay fusion/other, so "
                         "the products' rate is left out")
            + "; this summary is meant for GPU profiles")
    if model_gflop > 0 and product_ns > 0 and not (host and products is None):
        # Model FLOPs are (almost all) matrix products: their rate while they ran.
        out["product_tflops"] = model_gflop * steps / (product_ns / 1e9) / 1e3
    return out


def format_summary(summary: dict, source: str = "") -> str:
    lines = []
    if source:
        lines.append(f"device time from {source}")
    if "note" in summary:
        lines.append(f"note: {summary['note']}")
    lines.append(f"per step: busy {summary['busy_ms_per_step']:.2f} ms of a "
                 f"{summary['span_ms_per_step']:.2f} ms span "
                 f"({100 * summary['busy_fraction']:.1f} % busy), "
                 f"{summary['events'] / summary['steps']:.0f} events")
    lines.append(f"{'category':<14} {'ms/step':>9} {'share':>7}")
    for label, c in summary["categories"].items():
        lines.append(f"{label:<14} {c['ms_per_step']:9.2f} {100 * c['share']:6.1f}%")
    if "product_tflops" in summary:
        lines.append(f"matrix products + attention ran at {summary['product_tflops']:.3g} "
                     "model TFLOP/s while running")
    lines.append(f"{'top operations':<48} {'ms/step':>9} {'calls':>6} {'share':>7}")
    for op in summary["top_ops"]:
        name = f"{op['category']}: {op['op']}"
        lines.append(f"{name[:48]:<48} {op['ms_per_step']:9.3f} {op['calls_per_step']:6.1f} "
                     f"{100 * op['share']:6.1f}%")
    return "\n".join(lines)


def summarize_trace(path: str | pathlib.Path, steps: int = 1, model_gflop: float = 0.0,
                    top: int = 15, hlo_text: str = "") -> tuple[dict, str]:
    """(summary, text) of the newest trace under `path`; `hlo_text` is the traced
    step's optimised HLO, if known (see `product_ops`)."""
    from jax.profiler import ProfileData

    trace = newest_trace(pathlib.Path(path))
    events, source = device_events(ProfileData.from_file(str(trace)))
    summary = summarize(events, steps, model_gflop, top,
                        product_ops(hlo_text) if hlo_text else None,
                        host=source.startswith("host threads"))
    summary["trace"] = str(trace)
    return summary, format_summary(summary, source)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a trace folder (or an .xplane.pb file)")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds")
    p.add_argument("--model-gflop", type=float, default=0.0,
                   help="model GFLOP of one step on one device (adds the products' rate)")
    p.add_argument("--top", type=int, default=15, help="operations listed")
    p.add_argument("--hlo", default="",
                   help="the traced step's optimised HLO text (compiled.as_text(), "
                        "aot_compile.py --dump-hlo): sorts CPU fusions holding products")
    p.add_argument("--json", default="", help="append the summary to this JSON-lines file")
    args = p.parse_args(argv)
    hlo_text = pathlib.Path(args.hlo).read_text() if args.hlo else ""
    summary, text = summarize_trace(args.trace, args.steps, args.model_gflop, args.top,
                                    hlo_text)
    print(text)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"profile": summary}) + "\n")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")

"""Bytes moved by the collectives of a compiled program, read from its HLO text.

For each kind of collective the report gives the size of the whole buffer it works
on, per device and per step: the gathered result of an all-gather, the unscattered
input of a reduce-scatter (result x group size), the buffer of an all-reduce, and
the operand of an all-to-all or collective-permute. A ring implementation moves
about (n - 1) / n of that for an all-gather, reduce-scatter or all-to-all over n
devices, and twice that for an all-reduce.

Synchronous ops and asynchronous pairs (``*-start`` / ``*-done``, the GPU form) are
both read; a collective inside a loop body (a scanned layer stack) is counted once,
so read unscanned programs.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
          "c64": 8, "c128": 16}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s+"
                 r"(?P<kind>" + "|".join(KINDS) + r")(?P<phase>-start|-done)?\((?P<args>[^)]*)\)")
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type: one array or a (nested) tuple of arrays (layouts ignored)."""
    total = 0
    for dtype, dims in _ARRAY.findall(hlo_type):
        total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def group_size(line: str) -> int | None:
    """Devices per replica group of a collective's HLO line (None if not given)."""
    match = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if match:  # mesh['a'=2,'b'=4][, device_ids=(...)] {'b'}: the named axes' product
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", match.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", match.group(2)))
    match = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if match:  # iota form [groups, size]<=[n]
        return int(match.group(1).split(",")[-1])
    match = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if match:  # explicit {{0,1,2,3},{4,5,6,7}}
        return len(match.group(1).split(","))
    return None


def summarize(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per kind present: {"count": ops, "bytes": whole-buffer bytes per device}.

    A reduce-scatter whose replica groups cannot be read is counted but its bytes
    are left out, and the kind gets an "unread" count.
    """
    groups: dict[str, int | None] = {}
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
    for line in hlo_text.splitlines():
        op = _OP.match(line)
        if op is None:
            continue
        kind, phase = op["kind"], op["phase"]
        if phase == "-start":
            groups[op["name"]] = group_size(line)
            continue
        if phase == "-done":
            group = groups.get(op["args"].strip().lstrip("%").split(",")[0].strip())
        else:
            group = group_size(line)
        size = type_bytes(op["type"])
        out[kind]["count"] += 1
        if kind == "reduce-scatter":
            if group is None:  # a replica-group format this reader does not know
                out[kind]["unread"] = out[kind].get("unread", 0) + 1
                continue
            size *= group
        out[kind]["bytes"] += size
    return dict(out)

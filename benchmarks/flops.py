"""Model FLOPs of a step, counted from its jaxpr: backend-independent MFU numerators.

XLA's cost analysis is a poor numerator for model-FLOPs utilisation: it counts a loop
body once (a scanned block stack), counts remat recomputation as work, knows nothing
of custom calls (cuDNN fused attention counts zero), differs between backends (XLA:TPU
reports about 23 % fewer FLOPs than XLA:CPU for the same base step) and is missing
entirely when XLA:GPU compiles without a device. The count here walks the traced
program instead and adds up the multiply-adds of every matrix product and
convolution (2 FLOPs each), the convention of model-FLOPs utilisation: elementwise
work (norms, softmax, the optimiser update) is not counted.

Loops multiply their body by the trip count (`scan`, and `lax.map` through it),
`cond` counts its most expensive branch, and a `while` loop, whose trip count is
unknown at trace time, counts its body once and is reported, so that a caller can
refuse the number. Trace the step without rematerialisation (`remat="none"`) to
count model FLOPs only: with remat the backward pass's recomputation is in the
program and is counted too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jax_core


@dataclasses.dataclass
class FlopCount:
    """Matrix-product FLOPs of a program, and anything that makes them uncertain."""

    flops: float = 0.0
    while_loops: int = 0  # while loops whose body was counted once


def dot_general_flops(eqn: Any) -> float:
    """2 x output elements x contracted length of one `dot_general`."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def conv_flops(eqn: Any) -> float:
    """2 x output elements x (input features per group x kernel window) of a convolution."""
    dims = eqn.params["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    # The kernel's input-feature dimension already holds in_features / feature_groups.
    in_per_group = rhs_shape[dims.rhs_spec[1]]
    window = math.prod(rhs_shape[d] for d in dims.rhs_spec[2:])
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * in_per_group * window


def _count(jaxpr: Any, total: FlopCount, scale: float) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total.flops += scale * dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total.flops += scale * conv_flops(eqn)
        elif name == "scan":
            _count(eqn.params["jaxpr"].jaxpr, total, scale * eqn.params["length"])
        elif name == "cond":
            branches = []
            for branch in eqn.params["branches"]:
                counted = FlopCount()
                _count(branch.jaxpr, counted, scale)
                branches.append(counted)
            worst = max(branches, key=lambda c: c.flops)
            total.flops += worst.flops
            total.while_loops += worst.while_loops
        else:
            if name == "while":
                total.while_loops += 1
            for sub in jax_core.jaxprs_in_params(eqn.params):
                _count(sub, total, scale)


def count(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """Traces `fn(*args, **kwargs)` (arrays or ShapeDtypeStructs) and counts its FLOPs.

    The count is of the whole traced program: for a jitted SPMD step, the global
    step over the global batch (divide by the device count for one device's share).
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    total = FlopCount()
    _count(closed.jaxpr, total, 1.0)
    return total

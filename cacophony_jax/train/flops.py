"""Model FLOPs of a step, counted from its jaxpr, and the peaks MFU is measured against.

The training loop logs model TFLOP/s per device and MFU from these
(`perf/model_tflops_per_device`, `perf/mfu`); benchmarks/train_step.py and
benchmarks/aot_compile.py use the same count.

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
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from jax.extend import core as jax_core

from cacophony_jax import tasks
from cacophony_jax.data import spec
from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.parallel import partition
from cacophony_jax.train import step as step_lib

# Dense bf16 peak TFLOP/s per chip, matched against `device.device_kind` in this order
# (first substring wins). Sources: NVIDIA H100 datasheet (SXM 1,979 TFLOP/s with 2:4
# sparsity = 989 dense; PCIe 1,513 = 756 dense; NVL 1,671 = 835 dense); NVIDIA H200
# datasheet (SXM as H100 SXM: 989; NVL 1,671 = 835); NVIDIA A100 datasheet (312);
# Google Cloud TPU system architecture pages, bf16 per chip: v4 275, v5e 197, v5p 459,
# v6e (Trillium) 918.
# JAX names v5e "TPU v5 lite" and v6e "TPU v6 lite".
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
)


def datasheet_peak(device_kind: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, table key) of a device named `device_kind`, or None."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops * 1e12, key
    return None


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


def step_model_flops(config: ml_collections.ConfigDict, tokenizer: Any, tx: Any,
                     schedule: Any, plan: Any, mesh: jax.sharding.Mesh,
                     batch_shapes: dict[str, tuple[int, ...]]) -> float:
    """Model FLOPs of one training step on the global batch, as `train.loop` builds it.

    The step is traced (not compiled) with `config`'s shapes but without remat and with
    XLA attention, so recomputation is not counted and attention's matrix products are
    visible whatever kernel the real step uses.

    Args:
      config: the training config.
      tokenizer: the task's tokenizer (its vocabulary sizes the output layer), or None.
      tx, schedule: the optimiser and its schedule.
      plan: the state plan (`train.state.plan_state`); its abstract state is traced.
      mesh: the device mesh.
      batch_shapes: key -> global shape of the training batch.

    Returns:
      FLOPs of the whole step (all devices together).

    Raises:
      ValueError: when the step has a while loop, whose trip count is unknown.
    """
    reference = ml_collections.ConfigDict(config.to_dict())
    reference.model.remat, reference.model.attention = "none", "xla"
    task = tasks.build(reference, tokenizer)
    rules = partition.rules_from_config(reference.sharding_rules)
    step = step_lib.with_rules(functools.partial(step_lib.train_step, task=task, tx=tx,
                                                 schedule=schedule), mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(s, spec.TRAIN_KEYS[k],
                                     sharding=mesh_lib.batch_sharding(mesh, len(s)))
             for k, s in batch_shapes.items()}
    counted = count(jax.jit(step), plan.abstract, batch)
    if counted.while_loops:
        raise ValueError(f"the step has {counted.while_loops} while loop(s) whose trip count "
                         "is unknown: its FLOPs cannot be counted")
    return counted.flops


def flops_and_peak(config: ml_collections.ConfigDict, tokenizer: Any, tx: Any,
                   schedule: Any, plan: Any, mesh: jax.sharding.Mesh,
                   shapes: dict[str, tuple[int, ...]]) -> tuple[float | None, float | None]:
    """(model FLOPs of one step per device, the device's peak FLOP/s) for MFU logging,
    the count and the peak's source logged.

    Args:
      config, tokenizer, tx, schedule, plan, mesh: as for `step_model_flops`.
      shapes: the global batch's array shapes.

    Returns:
      The pair; either is None when unknown (counting never stops training).
    """
    try:
        step_flops = step_model_flops(config, tokenizer, tx, schedule, plan, mesh,
                                      shapes) / mesh.devices.size
    except Exception as error:  # noqa: BLE001 - a diagnostic, not worth a failed run
        logging.warning("model FLOPs not counted (%s): TFLOP/s and MFU are not logged",
                        error)
        return None, None
    device = mesh.devices.flat[0]
    peak, source = None, (f"no datasheet peak for {device.device_kind}, so no MFU is "
                          "logged; train.peak_tflops gives one")
    if config.train.peak_tflops > 0:
        peak, source = config.train.peak_tflops * 1e12, "train.peak_tflops"
    elif (known := datasheet_peak(device.device_kind)) is not None:
        peak, source = known[0], f"{known[1]} dense bf16 datasheet"
    logging.info("model FLOPs: %.4g GFLOP per example; peak %s (%s)",
                 step_flops * mesh.devices.size / config.data.global_batch_size / 1e9,
                 f"{peak / 1e12:g} TFLOP/s per device" if peak else "unknown", source)
    return step_flops, peak

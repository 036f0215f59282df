"""Times the SiLU MLP of the `base` towers and its matrix products, one call at a time.

RESULTS.md sections 13 and 15 estimate, from bytes, what fusing the MLP's SiLU into its
products could save on an H100: 28-37 GB per step, about 12-16 ms. This script
measures the two numbers that estimate rests on, for one MLP at the MAE decoder's
and stage 2 audio encoder's shape ([batch x positions, width] -> hidden -> width,
bf16 activations and weights):

  xla-mlp      the MLP's forward and backward pass as training runs it (XLA: cuBLAS
               products with the bias in their epilogue, SiLU and its gradient as
               separate fusions)
  xla-linear   the same pass without the activation: the products, bias adds and
               bias gradients alone. xla-mlp minus xla-linear is what the SiLU costs
               where it stands, the most a fused kernel could win per MLP
  mgpu         each forward-shaped product ([M, K] x [K, N]) through JAX's Pallas
               Mosaic GPU Hopper matmul (`jax.experimental.pallas.ops.gpu.
               hopper_matmul_mgpu`), beside the same product from XLA (`xla-dot`),
               for a few tilings: how close a hand-written Hopper product gets to
               cuBLAS, the precondition for writing one with a SiLU epilogue

TFLOP/s count the products' FLOPs only (forward 2 x 2MDH, backward 4 x 2MDH). Rows
the backend cannot run (mgpu anywhere but an NVIDIA Hopper GPU) are reported as
skipped.

Usage:

    python benchmarks/mlp_kernels.py                                 # base shape, GPU
    python benchmarks/mlp_kernels.py --batch 2 --positions 16 --repeats 3     # CPU
    python benchmarks/mlp_kernels.py --kernels mgpu --json rows.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import kernel_timing  # noqa: E402

KERNELS = ("xla-mlp", "xla-linear", "mgpu")
# tile_m, tile_n, wg_dimension, grid_minor_dim, grid_tile_width (tile_k 64, 4 stages).
MGPU_TILINGS = tuple(itertools.product((128,), (128, 64), ("N", "M"), ("N", "M"), (8,)))


def mlp_grads(activation):
    """jit(grad) of sum(MLP(x) * ct) in x and the four parameters, as training takes it."""

    def loss(x, w1, b1, w2, b2, ct):
        h = activation(jnp.dot(x, w1) + b1)
        y = jnp.dot(h, w2) + b2
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def hopper_reason() -> str:
    """Why the Mosaic GPU rows cannot run here, or "" when they can."""
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    if device.platform != "gpu" or not capability.startswith("9"):
        return f"needs an NVIDIA Hopper GPU (compute capability 9.x); this is {device.device_kind}"
    return ""


def mlp_rows(kernel: str, m: int, width: int, hidden: int, dtype, repeats: int,
             warmup: int) -> dict:
    rng = np.random.default_rng(0)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    args = (normal(m, width), normal(width, hidden, scale=width ** -0.5), normal(hidden),
            normal(hidden, width, scale=hidden ** -0.5), normal(width), normal(m, width))
    activation = jax.nn.silu if kernel == "xla-mlp" else (lambda h: h)
    flops = 6 * 2.0 * m * width * hidden
    row = dict(kernel=kernel, m=m, width=width, hidden=hidden, dtype=jnp.dtype(dtype).name,
               flops=flops)
    return kernel_timing.time_call(mlp_grads(activation), args, repeats, warmup, row, flops)


def product_rows(m: int, k: int, n: int, dtype, repeats: int, warmup: int) -> list[dict]:
    """XLA's product and each Mosaic GPU tiling of one [m, k] x [k, n] product."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((k, n)) * k ** -0.5, dtype)
    base = dict(m=m, k=k, n=n, dtype=jnp.dtype(dtype).name, flops=2.0 * m * k * n)
    rows = [kernel_timing.time_call(jax.jit(jnp.dot), (a, b), repeats, warmup,
                                    dict(base, kernel="xla-dot"), base["flops"])]
    reason = hopper_reason()
    if reason:
        return rows + [dict(base, kernel="mgpu", skipped=reason)]
    try:
        from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hopper
    except Exception as err:  # noqa: BLE001
        return rows + [dict(base, kernel="mgpu", skipped=f"{type(err).__name__}: {err}")]
    reference = np.asarray(jnp.dot(a, b), np.float32)
    for tile_m, tile_n, wg, minor, width in MGPU_TILINGS:
        tiling = f"{tile_m}x{tile_n} wg={wg} minor={minor} w={width}"
        try:  # the module is experimental: its settings may differ in other jax versions
            config = hopper.TuningConfig(
                tile_m=tile_m, tile_n=tile_n, tile_k=64, max_concurrent_steps=4,
                epi_tile_m=64, epi_tile_n=64, grid_minor_dim=hopper.MatmulDimension[minor],
                grid_tile_width=width, wg_dimension=hopper.MatmulDimension[wg])
        except Exception as err:  # noqa: BLE001
            rows.append(dict(base, kernel="mgpu", tiling=tiling,
                             skipped=f"{type(err).__name__}: {err}"))
            continue
        call = jax.jit(lambda a, b, config=config: hopper.matmul(a, b, None, config))
        row = kernel_timing.time_call(call, (a, b), repeats, warmup,
                                      dict(base, kernel="mgpu", tiling=tiling), base["flops"])
        if "skipped" not in row:  # a fast wrong product is not a result
            got = np.asarray(call(a, b), np.float32)
            row["max_rel_err"] = float(np.abs(got - reference).max() / np.abs(reference).max())
        rows.append(row)
    return rows


def _print(row: dict) -> None:
    shape = (f"{row['m']}x{row['width']}->{row['hidden']}" if "width" in row
             else f"{row['m']}x{row['k']} . {row['k']}x{row['n']}")
    name = row["kernel"] + (f" ({row['tiling']})" if "tiling" in row else "")
    if "skipped" in row:
        print(f"| {shape} | {name} | skipped: {row['skipped']} | | |", flush=True)
        return
    extra = f" (max rel err {row['max_rel_err']:.2g})" if "max_rel_err" in row else ""
    print(f"| {shape} | {name}{extra} | {row['ms']:.3f} | {row['tflops']:.4g} | "
          f"{row['compile_s']:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--positions", type=int, default=496, help="tokens per example")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--hidden", type=int, default=3072)
    kernel_timing.add_arguments(p, KERNELS)
    args = p.parse_args(argv)
    kernels = kernel_timing.chosen_kernels(args, KERNELS)
    m, dtype = args.batch * args.positions, jnp.dtype(args.dtype)
    print(f"# backend {jax.default_backend()}: {jax.devices()[0].device_kind}; "
          f"jax {jax.__version__}; M = {args.batch} x {args.positions} = {m}, {args.dtype}")
    print("| shape | kernel | ms | TFLOP/s | compile s |")
    print("|---|---|---|---|---|", flush=True)
    rows = []

    def emit(row: dict) -> None:  # printed and saved as it comes: a crash keeps the rows so far
        _print(row)
        rows.append(row)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    for kernel in ("xla-mlp", "xla-linear"):
        if kernel in kernels:
            emit(mlp_rows(kernel, m, args.width, args.hidden, dtype, args.repeats, args.warmup))
    if "mgpu" in kernels:
        for k, n in ((args.width, args.hidden), (args.hidden, args.width)):
            for row in product_rows(m, k, n, dtype, args.repeats, args.warmup):
                emit(row)
    timed = {r["kernel"]: r for r in rows if "ms" in r and "width" in r}
    if {"xla-mlp", "xla-linear"} <= timed.keys():
        saved = timed["xla-mlp"]["ms"] - timed["xla-linear"]["ms"]
        print(f"# the activation costs {saved:.3f} ms per MLP here "
              f"({timed['xla-mlp']['ms']:.3f} - {timed['xla-linear']['ms']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Times the LayerNorm kernels of `model.fused_norm` against XLA's LayerNorm.

One pre-LN block's norm at the `base` shapes, forward and gradient, the way the
training step uses it: the loss reads the normalised output and the residual branch
(`sum(y * a) + sum(skip * b)`), so the gradient carries both cotangents. XLA's version
is Flax's `nn.LayerNorm` (via `models/layers.layer_norm`), the kernels' version
`models/fused_norm.norm_with_skip`; each is jitted alone, so this isolates the kernels
from the rest of the step. `--rows` and `--warps` sweep the kernels' launch settings
(the forward and backward use the same values here).

Usage (GPU; on CPU the kernels are interpreted, so only a tiny shape makes sense):

    python benchmarks/norm_kernels.py --tokens 126976 --width 768
    python benchmarks/norm_kernels.py --tokens 126976 --rows 1,2,4,8 --warps 2,4,8
    python benchmarks/norm_kernels.py --tokens 64 --width 48 --iters 2   # CPU smoke run

Prints ms per forward and per forward + gradient, and the GB/s those imply for the
bytes the kernels must move (forward: read x, write y; gradient: read x, dy, dskip,
write dx), so 3,350 (H100) or 4,800 (H200) GB/s is the roofline. Each row also checks
the gradients against XLA's: the largest difference per gradient array over that
array's largest entry (bf16 rounding gives about 1e-2; a wrong kernel, order 1).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import report  # noqa: E402
from cacophony_jax.models import fused_norm  # noqa: E402
from cacophony_jax.models.layers import layer_norm  # noqa: E402

EPS = 1e-6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256 * 496,
                   help="rows: batch x sequence (MAE decoder at batch 256: 126976)")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default=str(fused_norm.ROWS),
                   help="comma list of rows per kernel program")
    p.add_argument("--warps", default=str(fused_norm.NUM_WARPS),
                   help="comma list of warps per kernel program")
    p.add_argument("--iters", type=int, default=20, help="timed calls per row")
    p.add_argument("--json", default="", help="append the rows to this JSON-lines file")
    return p.parse_args(argv)


def _time(fn, args, iters: int) -> float:
    """Seconds per call after a compiling call and one warm-up."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def _norm_fns(kind: str, dtype, rows: int, warps: int):
    """(forward, forward + gradient) jitted functions of (params, x, a, b)."""
    if kind == "xla":
        module = layer_norm(EPS, dtype=dtype)

        def apply(params, x):
            return x, module.apply(params, x)
    else:
        def apply(params, x):
            skip, y = fused_norm.norm_with_skip(x[None], params["params"]["scale"],
                                                params["params"]["bias"], EPS, dtype,
                                                rows=rows, num_warps=warps)
            return skip[0], y[0]

    def loss(params, x, a, b):
        skip, y = apply(params, x)
        return (y.astype(jnp.float32) * a).sum() + (skip.astype(jnp.float32) * b).sum()

    forward = jax.jit(lambda params, x, a, b: apply(params, x)[1])
    return forward, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv: list[str] | None = None) -> list[dict]:
    """Times XLA's LayerNorm and each kernel setting; returns the rows."""
    args = parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    shape = (args.tokens, args.width)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    a, b = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
    params = {"params": {"scale": jnp.ones(args.width, jnp.float32),
                         "bias": jnp.zeros(args.width, jnp.float32)}}
    item = dtype.itemsize * args.tokens * args.width
    device = jax.devices()[0]
    settings = [("xla", 0, 0)] + [("kernels", int(r), int(w))
                                  for r in args.rows.split(",") if r
                                  for w in args.warps.split(",") if w]
    rows, reference = [], None
    for kind, r, w in settings:
        forward, grad = _norm_fns(kind, dtype, r, w)
        forward_s = _time(forward, (params, x, a, b), args.iters)
        grad_s = _time(grad, (params, x, a, b), args.iters)
        value, grads = grad(params, x, a, b)
        if reference is None:
            reference = (value, grads)
        # Per gradient array (x, scale, bias): the largest difference from XLA's,
        # relative to the largest entry of XLA's; the worst array counts.
        error = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - h.astype(jnp.float32)))
                          / jnp.max(jnp.abs(h.astype(jnp.float32))))
                    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1]),
                                    strict=True))
        row = {"norm": kind, "device": device.device_kind,
               "rows": r, "warps": w, "tokens": args.tokens, "width": args.width,
               "dtype": str(dtype), "forward_ms": 1e3 * forward_s, "grad_ms": 1e3 * grad_s,
               # the kernels' minimum traffic: x and y forward; x, dy, dskip, dx back
               "forward_gb_per_s": 2 * item / forward_s / 1e9,
               "grad_gb_per_s": 6 * item / grad_s / 1e9,
               "max_grad_rel": error}
        label = "XLA LayerNorm" if kind == "xla" else f"kernels rows={r} warps={w}"
        rows.append(row)
        report.emit(row, f"{label:26s} forward {row['forward_ms']:8.3f} ms "
                         f"({row['forward_gb_per_s']:7.1f} GB/s)  forward+gradient "
                         f"{row['grad_ms']:8.3f} ms ({row['grad_gb_per_s']:7.1f} GB/s)  "
                         f"gradients vs XLA's: {error:.1e} (max relative)", args.json)
    return rows


if __name__ == "__main__":
    report.run(functools.partial(main, None))

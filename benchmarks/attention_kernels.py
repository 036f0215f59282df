"""Times one attention call, forward and backward, at the `base` models' shapes.

The towers' attention runs at a fraction of the products' rate on a GPU (RESULTS.md
section 12: about 240 TFLOP/s against 700). This script isolates it: for each shape
it jits the gradient of sum(attention(q, k, v) * cotangent) with respect to q, k and v
(one forward and one backward pass, as in training) and times it, for these kernels:

  xla         XLA's attention (a masked softmax between two batched products)
  cudnn       cuDNN's flash attention as `attention_ops.attend` calls it (key lengths)
  cudnn-pad   the same with the head dimension zero-padded to --pad-to inside the
              jitted call (scale kept at 1/sqrt(real head dim); output sliced back),
              pads and slices included in the time: what padding in `attend` would cost
  cudnn-wide  cuDNN on inputs already --pad-to wide, output and cotangent as wide: the
              wider kernel alone, with no pads or slices

TFLOP/s always count the real head dimension's FLOPs (forward 4, backward 8 x
B x H x Q x S x D; half for causal shapes), so rows of one shape compare as times.
Kernels the backend lacks (cuDNN on a CPU) are reported as skipped.

Usage:

    python benchmarks/attention_kernels.py                      # the base shapes
    python benchmarks/attention_kernels.py --batch 8 --kernels xla --repeats 3   # CPU
    python benchmarks/attention_kernels.py --shape mae-decoder:496:496:8:96 --pad-to 128
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import kernel_timing  # noqa: E402

KERNELS = ("xla", "cudnn", "cudnn-pad", "cudnn-wide")
# name: query length, key length, heads, head dim, causal (the `base` configs' calls).
BASE_SHAPES = (
    "mae-encoder:100:100:8:96",        # 99 visible patches, padded to even
    "audio-encoder:496:496:8:96",      # stage 2 and the MAE decoder: every patch
    "text:64:64:12:64:causal",         # RoBERTa-shaped text tower, causal
)


def parse_shape(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (5, 6) or (len(parts) == 6 and parts[5] != "causal"):
        raise SystemExit(f"--shape {text!r}: expected NAME:Q:S:HEADS:HEAD_DIM[:causal]")
    name, q, s, h, d = parts[0], *map(int, parts[1:5])
    return dict(name=name, q=q, s=s, heads=h, head_dim=d, causal=len(parts) == 6)


def attention_fn(kernel: str, head_dim: int, pad_to: int, causal: bool):
    """The attention call of one kernel, on [B, Q|S, H, D] inputs and lengths [B]."""
    scale = 1.0 / math.sqrt(head_dim)

    def call(q, k, v, lengths):
        if kernel == "xla":
            mask = jnp.arange(k.shape[1])[None, None, None, :] < lengths[:, None, None, None]
            if causal:
                mask = mask & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                                implementation="xla")
        extra = pad_to - q.shape[-1] if kernel == "cudnn-pad" else 0
        if extra > 0:
            widths = ((0, 0), (0, 0), (0, 0), (0, extra))
            q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                           key_value_seq_lengths=lengths,
                                           implementation="cudnn")
        return out[..., :head_dim] if extra > 0 else out

    return call


def time_case(shape: dict, kernel: str, batch: int, pad_to: int, dtype, repeats: int,
              warmup: int) -> dict:
    d_in = pad_to if kernel == "cudnn-wide" else shape["head_dim"]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, shape["q"], shape["heads"], d_in)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, shape["s"], shape["heads"], d_in)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, shape["s"], shape["heads"], d_in)), dtype)
    # Most examples use every key; every fourth ends 10 % early, as short clips do.
    lengths = np.full((batch,), shape["s"], np.int32)
    lengths[::4] = max(1, int(shape["s"] * 0.9))
    lengths = jnp.asarray(lengths)
    call = attention_fn(kernel, shape["head_dim"], pad_to, shape["causal"])
    ct = jnp.asarray(rng.standard_normal(q.shape), dtype)  # the output's shape

    @jax.jit
    def step(q, k, v, lengths, ct):  # every array an argument: none is folded as a constant
        def loss(q, k, v):
            return jnp.sum(call(q, k, v, lengths).astype(jnp.float32) * ct.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    row = dict(shape=shape["name"], kernel=kernel, batch=batch, q=shape["q"], s=shape["s"],
               heads=shape["heads"], head_dim=shape["head_dim"], causal=shape["causal"],
               dtype=jnp.dtype(dtype).name)
    if kernel.startswith("cudnn"):
        row["pad_to"] = pad_to if kernel != "cudnn" else shape["head_dim"]
    flops = 12.0 * batch * shape["heads"] * shape["q"] * shape["s"] * shape["head_dim"]
    if shape["causal"]:
        flops /= 2
    return kernel_timing.time_call(step, (q, k, v, lengths, ct), repeats, warmup, row, flops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", default=[],
                   help="NAME:Q:S:HEADS:HEAD_DIM[:causal] (repeatable; default: base shapes)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--pad-to", type=int, default=128, help="head dim of cudnn-pad/-wide")
    kernel_timing.add_arguments(p, KERNELS)
    args = p.parse_args(argv)
    kernels = kernel_timing.chosen_kernels(args, KERNELS)
    shapes = [parse_shape(s) for s in (args.shape or BASE_SHAPES)]
    print(f"# backend {jax.default_backend()}: {jax.devices()[0].device_kind}; "
          f"jax {jax.__version__}; batch {args.batch}, {args.dtype}", flush=True)
    print("| shape | kernel | head dim | ms (fwd+bwd) | TFLOP/s | compile s |")
    print("|---|---|---|---|---|---|", flush=True)
    for shape in shapes:
        for kernel in kernels:
            if kernel in ("cudnn-pad", "cudnn-wide") and shape["head_dim"] >= args.pad_to:
                continue
            row = time_case(shape, kernel, args.batch, args.pad_to, jnp.dtype(args.dtype),
                            args.repeats, args.warmup)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
            dim = row.get("pad_to", row["head_dim"])
            if "skipped" in row:
                print(f"| {row['shape']} | {kernel} | {dim} | skipped: {row['skipped']} | | |")
            else:
                print(f"| {row['shape']} | {kernel} | {dim} | {row['ms']:.3f} | "
                      f"{row['tflops']:.4g} | {row['compile_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

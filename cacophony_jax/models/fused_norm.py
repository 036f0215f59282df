"""LayerNorm of a pre-LN residual block as one GPU kernel per pass (Pallas, Triton).

XLA:GPU splits a LayerNorm into a statistics pass and a normalising pass, and its
gradient into two or three passes over the [tokens, width] arrays; the residual
stream's own gradient is added in one of them (benchmarks/RESULTS.md section 8).
`NormWithSkip` returns the block input twice, once as the residual ("skip") branch and
once normalised, so that its gradient sees both branches' cotangents and can finish in
one pass:

    forward:   read x, write y (and two floats per row)
    backward:  read x, dy, dskip, write dx (and small per-program sums for the
               scale and bias gradients)

Parameters are exactly ``nn.LayerNorm``'s (``scale``, ``bias``, float32 [width]);
statistics are float32 and the variance is computed from centred values. Multi-device
meshes run the kernels per device under ``jax.shard_map`` (tokens are split by batch,
the width is whole). The kernels run inside the training step (see `NormWithSkip`)
and are compiled for CUDA GPUs; on other platforms Pallas interprets them (correct but
slow: this is how they are tested without a GPU). `model.fused_norm` turns them on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jax.sharding import PartitionSpec as P

from cacophony_jax.models import axes
from cacophony_jax.models.layers import Dtype, partitioned

ROWS = 4  # rows per forward program, and per step of a backward program's loop
BACKWARD_PROGRAMS = 528  # 4 per streaming multiprocessor of an H100 SXM
NUM_WARPS = 4


def _block_width(width: int) -> int:
    """Triton's values need power-of-two extents: the width rounded up, masked."""
    return 1 << (width - 1).bit_length()


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *,
                    rows: int, n_rows: int, width: int, eps: float):
    block = _block_width(width)
    row = pl.program_id(0) * rows + jnp.arange(rows)
    col_ok = jnp.arange(block) < width
    ok = (row < n_rows)[:, None] & col_ok[None, :]
    x = plt.load(x_ref, mask=ok, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / width
    centred = jnp.where(ok, x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1) / width + eps)
    scale = plt.load(scale_ref, mask=col_ok, other=0.0)
    bias = plt.load(bias_ref, mask=col_ok, other=0.0)
    y = centred * rstd[:, None] * scale[None, :] + bias[None, :]
    plt.store(y_ref, y.astype(y_ref.dtype), mask=ok)
    plt.store(mean_ref, mean, mask=row < n_rows)
    plt.store(rstd_ref, rstd, mask=row < n_rows)


def _backward_kernel(x_ref, dy_ref, dskip_ref, scale_ref, mean_ref, rstd_ref,
                     dx_ref, dscale_ref, dbias_ref, *, rows: int, n_rows: int, width: int,
                     steps: int):
    block = _block_width(width)
    col_ok = jnp.arange(block) < width
    scale = plt.load(scale_ref, mask=col_ok, other=0.0)
    first = pl.program_id(0) * steps * rows

    def step(i, sums):
        dscale, dbias = sums
        start = first + i * rows
        row = start + jnp.arange(rows)
        row_ok = row < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        view = (pl.ds(start, rows), slice(None))
        x = plt.load(x_ref.at[view], mask=ok, other=0.0).astype(jnp.float32)
        dy = plt.load(dy_ref.at[view], mask=ok, other=0.0).astype(jnp.float32)
        dskip = plt.load(dskip_ref.at[view], mask=ok, other=0.0).astype(jnp.float32)
        mean = plt.load(mean_ref.at[pl.ds(start, rows)], mask=row_ok, other=0.0)
        rstd = plt.load(rstd_ref.at[pl.ds(start, rows)], mask=row_ok, other=0.0)
        xhat = jnp.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * scale[None, :]
        c1 = jnp.sum(g * xhat, axis=1) / width
        c2 = jnp.sum(g, axis=1) / width
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None] + dskip
        plt.store(dx_ref.at[view], dx.astype(dx_ref.dtype), mask=ok)
        return dscale + jnp.sum(dy * xhat, axis=0), dbias + jnp.sum(dy, axis=0)

    zeros = jnp.zeros((block,), jnp.float32)
    dscale, dbias = jax.lax.fori_loop(0, steps, step, (zeros, zeros))
    dscale_ref[...] = dscale[None, :]
    dbias_ref[...] = dbias[None, :]


def _on_gpu_or_interpreted(call: Callable[[bool], Callable], *args):
    """``call(interpret)(*args)``: the compiled kernel on CUDA GPUs, else interpreted."""
    return jax.lax.platform_dependent(*args, cuda=call(False), default=call(True))


def forward(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype: Dtype, *,
            rows: int = ROWS, num_warps: int = NUM_WARPS
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward kernel on one device's [N, D] rows.

    Args:
      x: [N, D] input rows.
      scale, bias: float32 [D].
      eps: variance epsilon.
      dtype: the output's dtype.
      rows: rows per program (a power of two).
      num_warps: warps per program.

    Returns:
      (y [N, D] in ``dtype``, mean [N], rstd [N]), the statistics in float32.
    """
    n_rows, width = x.shape
    block = _block_width(width)
    kernel = functools.partial(_forward_kernel, rows=rows, n_rows=n_rows, width=width, eps=eps)
    call = lambda interpret: pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, dtype),
                   jax.ShapeDtypeStruct((n_rows,), jnp.float32),
                   jax.ShapeDtypeStruct((n_rows,), jnp.float32)),
        grid=(pl.cdiv(n_rows, rows),),
        in_specs=[pl.BlockSpec((rows, block), lambda i: (i, 0)),
                  pl.BlockSpec((block,), lambda i: (0,)),
                  pl.BlockSpec((block,), lambda i: (0,))],
        out_specs=(pl.BlockSpec((rows, block), lambda i: (i, 0)),
                   pl.BlockSpec((rows,), lambda i: (i,)),
                   pl.BlockSpec((rows,), lambda i: (i,))),
        compiler_params=plt.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="layer_norm_fwd",
    )
    return _on_gpu_or_interpreted(call, x, scale, bias)


def backward(x: jax.Array, dy: jax.Array, dskip: jax.Array, scale: jax.Array,
             mean: jax.Array, rstd: jax.Array, *, rows: int = ROWS,
             programs: int | None = None, num_warps: int = NUM_WARPS
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward kernel on one device's [N, D] rows.

    Args:
      x, dy, dskip: [N, D] input, output gradient and residual-branch gradient, in x's
        dtype.
      scale: float32 [D].
      mean, rstd: float32 [N] from `forward`.
      rows: rows per loop step (a power of two).
      programs: programs in the grid (default BACKWARD_PROGRAMS), each looping over
        its share of the rows and keeping its own scale and bias sums.
      num_warps: warps per program.

    Returns:
      (dx [N, D] including dskip, dscale [D], dbias [D]).
    """
    n_rows, width = x.shape
    block = _block_width(width)
    programs = min(programs or BACKWARD_PROGRAMS, pl.cdiv(n_rows, rows))
    steps = pl.cdiv(pl.cdiv(n_rows, rows), programs)
    kernel = functools.partial(_backward_kernel, rows=rows, n_rows=n_rows, width=width,
                               steps=steps)
    whole = pl.BlockSpec((n_rows, block), lambda i: (0, 0))
    vector = pl.BlockSpec((block,), lambda i: (0,))
    per_row = pl.BlockSpec((n_rows,), lambda i: (0,))
    partial = pl.BlockSpec((1, block), lambda i: (i, 0))
    call = lambda interpret: pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((programs, block), jnp.float32),
                   jax.ShapeDtypeStruct((programs, block), jnp.float32)),
        grid=(programs,),
        in_specs=[whole, whole, whole, vector, per_row, per_row],
        out_specs=(whole, partial, partial),
        compiler_params=plt.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="layer_norm_bwd",
    )
    dx, dscale, dbias = _on_gpu_or_interpreted(call, x, dy, dskip, scale, mean, rstd)
    return dx, dscale.sum(axis=0)[:width], dbias.sum(axis=0)[:width]


def _layout() -> tuple | None:
    """(abstract mesh, [B, L, D] spec, batch mesh axes) under activation rules on a
    multi-device mesh, else None (one device, or XLA places everything)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = axes.current_activation_rules()
    if mesh.empty or mesh.size == 1 or not rules:
        return None
    spec = nn.logical_to_mesh_axes(axes.BLE, rules)
    if spec[1] is not None or spec[2] is not None:
        raise ValueError(f"model.fused_norm needs activations split by batch only, got "
                         f"{spec}; turn it off for this mesh")
    batch = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
    return mesh, P(spec[0], None, None), batch


def _per_device(fn: Callable, layout: tuple | None, in_specs: tuple, out_specs) -> Callable:
    """``fn`` on each device's examples under ``layout``, or as is without one."""
    if layout is None:
        return fn
    # Pallas calls carry no record of how their outputs vary across the mesh, which
    # shard_map's check needs; the specs here say it instead.
    return jax.shard_map(fn, mesh=layout[0], in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def _specs(layout: tuple | None) -> tuple[P | None, P | None]:
    """([B, L, D] spec, [B, L] spec) of a layout (None, None without one)."""
    if layout is None:
        return None, None
    return layout[1], P(layout[1][0], None)


# `layout` is decided while the forward is traced (inside the activation rules) and
# passed on, because the backward is traced later, outside them. `launch` is
# (rows, num_warps) of both kernels.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _norm_with_skip(x, scale, bias, eps, dtype, layout, launch):
    skip, y, _ = _norm_with_skip_fwd(x, scale, bias, eps, dtype, layout, launch)
    return skip, y


def _norm_with_skip_fwd(x, scale, bias, eps, dtype, layout, launch):
    rows, num_warps = launch

    def local(x, scale, bias):
        b, length, width = x.shape
        y, mean, rstd = forward(x.reshape(b * length, width), scale, bias, eps, dtype,
                                rows=rows, num_warps=num_warps)
        return y.reshape(x.shape), mean.reshape(b, length), rstd.reshape(b, length)

    spec, per_row = _specs(layout)
    y, mean, rstd = _per_device(local, layout, (spec, P(), P()), (spec, per_row, per_row))(
        x, scale, bias)
    return x, y, (x, scale, mean, rstd)


def _norm_with_skip_vjp_fwd(x, scale, bias, eps, dtype, layout, launch):
    skip, y, residuals = _norm_with_skip_fwd(x, scale, bias, eps, dtype, layout, launch)
    return (skip, y), residuals


def _norm_with_skip_vjp_bwd(eps, dtype, layout, launch, residuals, cotangents):
    del eps, dtype
    rows, num_warps = launch
    x, scale, mean, rstd = residuals
    dskip, dy = cotangents
    batch = layout[2] if layout is not None else ()

    def local(x, dy, dskip, scale, mean, rstd):
        b, length, width = x.shape
        flat = lambda a: a.reshape(b * length, width)
        dx, dscale, dbias = backward(flat(x), flat(dy), flat(dskip), scale, mean.reshape(-1),
                                     rstd.reshape(-1), rows=rows, num_warps=num_warps)
        if batch:
            dscale, dbias = jax.lax.psum((dscale, dbias), batch)
        return dx.reshape(x.shape), dscale, dbias

    spec, per_row = _specs(layout)
    dx, dscale, dbias = _per_device(
        local, layout, (spec, spec, spec, P(), per_row, per_row), (spec, P(), P()))(
        x, dy.astype(x.dtype), dskip.astype(x.dtype), scale, mean, rstd)
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_norm_with_skip.defvjp(_norm_with_skip_vjp_fwd, _norm_with_skip_vjp_bwd)


def norm_with_skip(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
                   dtype: Dtype, *, rows: int = ROWS, num_warps: int = NUM_WARPS
                   ) -> tuple[jax.Array, jax.Array]:
    """(x, LayerNorm(x) in ``dtype``) of [B, L, D] through the kernels, differentiable.

    Under activation rules on a multi-device mesh the kernels run per device.

    Args:
      x: [B, L, D] block input.
      scale, bias: float32 [D].
      eps: variance epsilon.
      dtype: the normalised output's dtype.
      rows, num_warps: the kernels' launch settings.

    Returns:
      (x, normalised x); use the first for the residual sum (see `NormWithSkip`).
    """
    return _norm_with_skip(x, scale, bias, eps, jnp.dtype(dtype), _layout(),
                           (rows, num_warps))


def _xla_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
                    dtype: Dtype) -> jax.Array:
    """``nn.LayerNorm``'s computation, step for step (float32 statistics)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    mul = jax.lax.rsqrt(var + eps) * scale
    return ((x32 - mean) * mul + bias).astype(dtype)


class NormWithSkip(nn.Module):
    """(x, LayerNorm(x)) for a pre-LN block, with nn.LayerNorm's parameters.

    Returns the input unchanged as the first output: use it, not the input, for the
    residual sum, so that the backward kernel adds that branch's gradient.

    The kernels run where the model is traced under activation rules
    (`parallel.partition.activation_rules`), which is inside the training step; there
    they also know the mesh to run per device on. Elsewhere (evaluation, inference,
    a bare ``apply``) the same parameters go through XLA's LayerNorm, so a forward
    pass never needs the kernels' mesh or, off a GPU, their interpreter.
    """

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, L, D] -> (x, normalised x in ``dtype``)."""
        width = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, (axes.EMBED,)),
                           (width,), jnp.float32)
        bias = self.param("bias", partitioned(nn.initializers.zeros, (axes.EMBED,)),
                          (width,), jnp.float32)
        if axes.current_activation_rules() is None:
            return x, _xla_layer_norm(x, scale, bias, self.eps, self.dtype)
        return norm_with_skip(x, scale, bias, self.eps, self.dtype)

"""Building blocks shared by the towers: dense, norm, attention, MLP, drop-path.

Every parameter is created with logical axis names (``models/axes.py``); compute
runs in the module's ``dtype`` while parameters stay float32. All attention goes
through ``models/attention_ops.attend`` (boolean masks or key lengths, XLA or cuDNN).
Stacks of blocks (scanned or unrolled, with remat) are in ``models/stack.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cacophony_jax.models import axes
from cacophony_jax.models.attention_ops import attend

Dtype = Any
Initializer = Callable[..., jax.Array]

# Audio towers follow ViT/MAE practice, text towers BERT practice.
XAVIER = nn.initializers.xavier_uniform()
BERT_NORMAL = nn.initializers.normal(stddev=0.02)

def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
    """Wraps an initializer so the created parameter carries logical axis names.

    Args:
      init: a Flax initializer.
      names: one logical axis name (or None) per parameter dimension.

    Returns:
      The boxed initializer.
    """
    return nn.with_logical_partitioning(init, tuple(names))


def dense(
    features: int,
    names: tuple[str | None, str | None],
    *,
    dtype: Dtype,
    kernel_init: Initializer = XAVIER,
    name: str | None = None,
) -> nn.Dense:
    """A Dense layer whose kernel and bias carry logical axis names.

    Args:
      features: output width.
      names: logical names of the kernel's (input, output) dimensions.
      dtype: compute dtype.
      kernel_init: kernel initializer.
      name: submodule name.

    Returns:
      The (unbound) Dense module.
    """
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(kernel_init, names),
        bias_init=partitioned(nn.initializers.zeros, (names[1],)),
        name=name,
    )


def layer_norm(eps: float, *, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """A LayerNorm whose scale and bias carry the "embed" axis name.

    Args:
      eps: variance epsilon.
      dtype: compute dtype (statistics are computed in float32 by Flax).
      name: submodule name.

    Returns:
      The (unbound) LayerNorm module.
    """
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(nn.initializers.ones, (axes.EMBED,)),
        bias_init=partitioned(nn.initializers.zeros, (axes.EMBED,)),
        name=name,
    )


class HeadProjection(nn.Module):
    """Parameters of one per-head projection: kernel [D, heads, head_dim], bias [heads, head_dim].

    They are named, shaped and initialised exactly as ``nn.DenseGeneral((heads,
    head_dim))`` would make them (its initializer sees the flat [D, heads * head_dim]
    kernel), so checkpoints and converters see the same tree; the product itself is
    left to ``project_heads``.
    """

    num_heads: int
    head_dim: int
    kernel_init: Initializer = XAVIER

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        """Returns (kernel, bias) in float32, created on first use."""
        flat = (in_features, self.num_heads * self.head_dim)
        shape = (in_features, self.num_heads, self.head_dim)

        def kernel_init(rng: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32):
            return jnp.reshape(self.kernel_init(rng, flat, dtype), shape)

        kernel = self.param("kernel", partitioned(kernel_init, (axes.EMBED, axes.HEADS, axes.KV)),
                            shape, jnp.float32)
        bias = self.param("bias", partitioned(nn.initializers.zeros, (axes.HEADS, axes.KV)),
                          shape[1:], jnp.float32)
        return kernel, bias


def project_heads(
    x: jax.Array, params: Sequence[tuple[jax.Array, jax.Array]], dtype: Dtype
) -> list[jax.Array]:
    """Applies per-head projections of the same input in one matrix product.

    The product is written as [..., D] x [D, sum of heads * head_dim] plus a flat
    bias, so that XLA:GPU adds the bias in cuBLAS's epilogue; with a [heads,
    head_dim] bias it materialises the bias broadcast to the whole [B, S, heads,
    head_dim] output and feeds it to the product, a write and a read of the output's
    size per projection. Several projections (query, key and value of a
    self-attention) become one wider product whose output is split afterwards.

    Args:
      x: [..., D] input.
      params: (kernel [D, heads, head_dim], bias [heads, head_dim]) per projection.
      dtype: compute dtype.

    Returns:
      One [..., heads, head_dim] array per projection, in ``dtype``.
    """
    kernels = [k.reshape(k.shape[0], -1) for k, _ in params]
    biases = [b.reshape(-1) for _, b in params]
    kernel = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=1)
    bias = biases[0] if len(biases) == 1 else jnp.concatenate(biases)
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    y = y + bias.astype(dtype)
    outs, start = [], 0
    for k, _ in params:
        width = k.shape[1] * k.shape[2]
        outs.append(y[..., start:start + width].reshape(y.shape[:-1] + k.shape[1:]))
        start += width
    return outs


class Attention(nn.Module):
    """Multi-head attention with per-head projections and an optional KV cache.

    In ``decode`` mode, self-attention keeps keys/values of past positions in the
    'cache' collection (created at full length by a first call, then filled one
    chunk per call), and cross-attention computes its keys/values from the
    memory once and reuses them on later calls.

    With ``fuse_qkv`` the projections that share an input run as one matrix product:
    query, key and value of a self-attention (called with ``memory is x``), key and
    value otherwise. Parameters and results are the same either way.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "xla"
    kernel_init: Initializer = XAVIER
    cross: bool = False
    decode: bool = False
    fuse_qkv: bool = False
    causal: bool = False  # a lengths mask is causal too (`attend`); boolean masks say it

    @nn.compact
    def __call__(self, x: jax.Array, memory: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Attends from ``x`` [B, Q, D] to ``memory`` [B, S, Dm] (``x`` for self-attention).

        Args:
          x: queries' input.
          memory: keys'/values' input.
          mask: boolean, broadcastable to [B, heads, Q, S], or int32 key lengths [B]
            (see `attend`); ignored for cached self-attention steps, which build
            their own boolean mask from the cache index.

        Returns:
          [B, Q, D].
        """
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
        head_dim = width // self.num_heads

        def project(inputs: jax.Array, names: tuple[str, ...]) -> list[jax.Array]:
            params = [HeadProjection(self.num_heads, head_dim, self.kernel_init, name=n)(
                inputs.shape[-1]) for n in names]
            if self.fuse_qkv:
                return project_heads(inputs, params, self.dtype)
            return [project_heads(inputs, [p], self.dtype)[0] for p in params]

        if not self.decode and memory is x:
            query, key, value = project(x, ("query", "key", "value"))
        else:
            (query,) = project(x, ("query",))
            if self.cross and self.decode and self.has_variable("cache", "cross_key"):
                key = self.get_variable("cache", "cross_key")
                value = self.get_variable("cache", "cross_value")
            else:
                key, value = project(memory, ("key", "value"))
                if self.cross and self.decode:
                    self.put_variable("cache", "cross_key", key)
                    self.put_variable("cache", "cross_value", value)
        if self.decode and not self.cross:
            key, value, mask = self._update_cache(key, value, mask)

        causal = (self.causal and mask is not None
                  and jnp.issubdtype(mask.dtype, jnp.integer))
        out = attend(query, key, value, mask, self.implementation, causal)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=partitioned(self.kernel_init, (axes.HEADS, axes.KV, axes.EMBED)),
            bias_init=partitioned(nn.initializers.zeros, (axes.EMBED,)),
            name="out",
        )(out)

    def _update_cache(
        self, key: jax.Array, value: jax.Array, mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        # The first call only sizes the cache (its input has the full decode length).
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:
            return key, value, mask
        start = index.value
        chunk = key.shape[1]
        key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, start, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, start, 0, 0))
        cached_key.value, cached_value.value = key, value
        index.value = start + chunk
        # Causal over the cache: query i (absolute start + i) sees keys 0..start + i.
        query_pos = start + jnp.arange(chunk)
        visible = jnp.arange(key.shape[1])[None, :] <= query_pos[:, None]
        return key, value, visible[None, None]


class MLP(nn.Module):
    """Dense -> activation -> Dense."""

    hidden: int
    activation: Callable[[jax.Array], jax.Array]
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = XAVIER

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the MLP to [..., D] and returns [..., D]."""
        width = x.shape[-1]
        h = dense(self.hidden, (axes.EMBED, axes.MLP), dtype=self.dtype,
                  kernel_init=self.kernel_init, name="wi")(x)
        h = self.activation(h)
        return dense(width, (axes.MLP, axes.EMBED), dtype=self.dtype,
                     kernel_init=self.kernel_init, name="wo")(h)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per example with probability ``rate``."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """Returns ``x`` [B, ...] with whole examples zeroed and the rest rescaled."""
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(kept, x / keep, jnp.zeros_like(x))

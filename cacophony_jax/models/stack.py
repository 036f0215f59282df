"""Stacks of blocks: scanned or unrolled, with an optional remat policy.

Scanned parameters (and caches) carry a leading "layers" axis under one child named
``blocks``; unrolled ones live under ``block_0`` ... ``block_{n-1}``.
``stack_layers``/``unstack_layers`` convert between the two layouts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cacophony_jax.models import axes

REMAT_OPTIONS = ("none", "full", "dots", "minimal")


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The jax.checkpoint policy of a ``remat`` option (see REMAT_OPTIONS).

    "full" saves nothing and recomputes the whole block; "dots" saves matmuls
    against weights (no batch dimensions) and recomputes attention; "minimal"
    saves every matmul, attention scores included, recomputing only elementwise ops.

    Args:
      name: "full", "dots" or "minimal".

    Returns:
      The policy (None means save nothing).
    """
    policies = {
        "full": None,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "minimal": jax.checkpoint_policies.dots_saveable,
    }
    if name not in policies:
        raise ValueError(f"remat={name!r} is not supported; use one of {REMAT_OPTIONS}")
    return policies[name]


STACK_NAME = "blocks"  # scanned stack; unrolled blocks are "block_0", "block_1", ...


def apply_stack(
    block: type[nn.Module],
    fields: dict[str, Any],
    x: jax.Array,
    *args: Any,
    num_layers: int,
    scan: bool,
    remat: str,
) -> jax.Array:
    """Runs ``num_layers`` blocks over ``x``, scanned or unrolled, with optional remat.

    Must be called inside a parent's compact method. A block is built as
    ``block(**fields, scanned=..., name=...)`` and called as ``block(x, *args)``;
    when scanned it must return ``(x, None)``. Scanned parameters (and caches) get
    a leading "layers" axis under one child named ``blocks``; unrolled ones live
    under ``block_0`` ... ``block_{n-1}`` (see ``stack_layers``/``unstack_layers``).

    Args:
      block: the block's module class.
      fields: its dataclass fields except ``scanned`` and ``name``.
      x: the carried activation.
      *args: arrays (or None) shared by every layer.
      num_layers: depth.
      scan: use nn.scan over the stack.
      remat: one of REMAT_OPTIONS.

    Returns:
      The activation after the last block.
    """
    if remat not in REMAT_OPTIONS:
        raise ValueError(f"remat={remat!r} is not supported; use one of {REMAT_OPTIONS}")
    if remat != "none":
        # Under scan the loop already stops CSE across layers, so prevent_cse is not needed.
        block = nn.remat(block, policy=remat_policy(remat), prevent_cse=not scan)
    if not scan:
        for i in range(num_layers):
            x = block(**fields, scanned=False, name=f"block_{i}")(x, *args)
        return x
    stacked = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: axes.LAYERS},
    )
    x, _ = stacked(**fields, scanned=True, name=STACK_NAME)(x, *args)
    return x


def stack_layers(tree: dict[str, Any]) -> dict[str, Any]:
    """Turns unrolled ``block_i`` subtrees (at any depth) into one scanned ``blocks``.

    Args:
      tree: a parameter (or cache) tree of plain arrays.

    Returns:
      The same tree with each run of ``block_0..block_{n-1}`` stacked on a new
      leading axis.
    """
    if not isinstance(tree, dict):
        return tree
    blocks = sorted((k for k in tree if k.startswith("block_")), key=lambda k: int(k[6:]))
    out = {k: stack_layers(v) for k, v in tree.items() if k not in blocks}
    if blocks:
        layers = [stack_layers(tree[k]) for k in blocks]
        out[STACK_NAME] = jax.tree.map(_stack, *layers)
    return out


def _stack(*xs: Any) -> Any:
    # Host arrays stay on the host (converters build big trees there).
    return np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)


def unstack_layers(tree: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``stack_layers``: splits each scanned ``blocks`` into ``block_i``.

    Args:
      tree: a parameter tree of plain arrays.

    Returns:
      The same tree with every ``blocks`` subtree split along its leading axis.
    """
    if not isinstance(tree, dict):
        return tree
    out = {k: unstack_layers(v) for k, v in tree.items() if k != STACK_NAME}
    if STACK_NAME in tree:
        stacked = tree[STACK_NAME]
        depth = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(depth):
            out[f"block_{i}"] = unstack_layers(jax.tree.map(lambda a, i=i: a[i], stacked))
    return out

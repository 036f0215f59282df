"""Logical axis names of parameters and activations.

Model code names what each array dimension *is*; the config maps these names to
mesh axes (``parallel/partition.py``), so no mesh axis appears in model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from flax import linen as nn

# Parameter dimensions.
EMBED = "embed"  # model width (hidden size of a tower)
MLP = "mlp"  # MLP hidden width
HEADS = "heads"  # attention heads
KV = "kv"  # per-head width of queries, keys and values
VOCAB = "vocab"  # token vocabulary
LAYERS = "layers"  # leading axis of a scanned block stack

PARAM_AXES = (EMBED, MLP, HEADS, KV, VOCAB, LAYERS)

# Activation dimensions (used with nn.with_logical_constraint; no-ops without rules).
# The width of an activation has its own name: FSDP shards the parameters' 'embed'
# dimension, while activations keep their width whole and split the batch instead.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"

ACTIVATION_AXES = (BATCH, LENGTH, ACT_EMBED)

# The usual constraint on a [batch, length, width] activation.
BLE = (BATCH, LENGTH, ACT_EMBED)


# Rules for activation constraints only. Flax's own rules context would also
# constrain every parameter inside `apply` (and trip over DenseGeneral's flattened
# kernel initialisers), so activations use this separate switch.
_ACTIVATION_RULES: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Within this context `constrain` maps logical activation names by `rules`."""
    token = _ACTIVATION_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def current_activation_rules() -> tuple[tuple[str, Any], ...] | None:
    """The rules `activation_rules` set, or None outside it."""
    return _ACTIVATION_RULES.get()


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation by logical names (no-op without rules)."""
    rules = _ACTIVATION_RULES.get()
    if not rules:
        return x
    return nn.with_logical_constraint(x, names, rules=rules)


def _mesh_axes(rules: Sequence[tuple[str, Any]], name: str) -> tuple[str, ...]:
    for logical, target in rules:
        if logical == name:
            return () if target is None else (target,) if isinstance(target, str) else tuple(
                target)
    return ()


def constrain_lookup(x: jax.Array) -> jax.Array:
    """Lays out an embedding lookup's output [batch, length, width] as the gather from
    a table whose width is split by the EMBED rule makes it without moving data: the
    width split as the table's, the batch over the batch axes the width does not use
    (no-op without rules). The usual BLE constraint after it is then one all-to-all,
    and so is its transpose for the table's gradient; without it XLA gathers the whole
    activation on every device on meshes that split both (data x fsdp)."""
    rules = _ACTIVATION_RULES.get()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    width = _mesh_axes(rules, EMBED)
    batch = tuple(a for a in _mesh_axes(rules, BATCH) if a not in width)

    def fits(size: int, names: tuple[str, ...]) -> bool:
        return size % math.prod(mesh.shape[a] for a in names) == 0

    if mesh.empty or not width or not fits(x.shape[-1], width):
        return x
    if not fits(x.shape[0], batch):
        batch = ()
    spec = jax.sharding.PartitionSpec(batch or None, *([None] * (x.ndim - 2)), width)
    return jax.lax.with_sharding_constraint(x, spec)

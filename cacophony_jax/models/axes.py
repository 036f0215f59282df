"""Logical axis names of parameters and activations.

Model code names what each array dimension *is*; the config maps these names to
mesh axes (``parallel/partition.py``), so no mesh axis appears in model code.
"""

from __future__ import annotations

import contextlib
import contextvars
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

"""Logical axis names of parameters and activations.

Model code names what each array dimension *is*; the config maps these names to
mesh axes (``parallel/partition.py``), so no mesh axis appears in model code.
"""

# Parameter dimensions.
EMBED = "embed"  # model width (hidden size of a tower)
MLP = "mlp"  # MLP hidden width
HEADS = "heads"  # attention heads
KV = "kv"  # per-head width of queries, keys and values
VOCAB = "vocab"  # token vocabulary
LAYERS = "layers"  # leading axis of a scanned block stack

PARAM_AXES = (EMBED, MLP, HEADS, KV, VOCAB, LAYERS)

# Activation dimensions (used with nn.with_logical_constraint; no-ops without rules).
BATCH = "batch"
LENGTH = "length"

ACTIVATION_AXES = (BATCH, LENGTH, EMBED)

# The usual constraint on a [batch, length, width] activation.
BLE = (BATCH, LENGTH, EMBED)

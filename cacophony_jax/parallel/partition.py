"""Logical axis names -> mesh shardings, for parameters and optimizer state.

Models name every parameter dimension logically ('embed', 'mlp', 'heads', ...);
`config.sharding_rules` maps those names to mesh axes. Nothing else in the code
base mentions a mesh axis for a parameter.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cacophony_jax.models import axes

Rules = tuple[tuple[str, Any], ...]


def rules_from_config(rules: Sequence[Sequence[Any]]) -> Rules:
    """Normalises `config.sharding_rules` (lists from the command line) to tuples."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(
                f"config.sharding_rules entry {rule!r} must be (logical_name, mesh_axes)"
            )
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


def _mesh_axes_for(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise ValueError(
        f"logical axis {name!r} has no entry in config.sharding_rules; add "
        f"('{name}', None) to replicate it or map it to a mesh axis"
    )


def spec_for(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh,
             rules: Rules) -> PartitionSpec:
    """Mesh PartitionSpec of one array from its logical dimension names.

    A dimension whose size the mapped mesh axes do not divide, or whose mesh axis an
    earlier dimension already uses, stays replicated (no uneven shards).

    Args:
      shape: array shape.
      names: one logical name (or None) per dimension.
      mesh: the device mesh.
      rules: logical -> mesh axis rules.

    Returns:
      A PartitionSpec over mesh axes.
    """
    used: set[str] = set()
    parts = []
    for size, name in zip(shape, names, strict=True):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            parts.append(axes[0] if len(axes) == 1 else axes)
        else:
            parts.append(None)
    return PartitionSpec(*parts)


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """Unboxes an abstract (eval_shape'd) parameter tree and derives its shardings.

    Args:
      boxed_abstract: `jax.eval_shape(model.init, ...)` output whose leaves are
        `nn.LogicallyPartitioned` boxes of ShapeDtypeStructs.
      mesh: the device mesh.
      rules: logical -> mesh axis rules.

    Returns:
      (abstract params without boxes, matching tree of NamedShardings).
    """
    logical = nn.get_partition_spec(boxed_abstract)
    abstract = nn.meta.unbox(boxed_abstract)

    def one(leaf, spec):
        names = tuple(spec) + (None,) * (len(leaf.shape) - len(tuple(spec)))
        return NamedSharding(mesh, spec_for(leaf.shape, names, mesh, rules))

    shardings = jax.tree.map(one, abstract, logical)
    return abstract, shardings


def unsplit_share(abstract: Any, shardings: Any, axis: str) -> tuple[float, list[str]]:
    """How much of a parameter tree a mesh axis leaves whole on every device.

    Args:
      abstract: parameter ShapeDtypeStructs.
      shardings: their NamedShardings.
      axis: a mesh axis name, e.g. "fsdp".

    Returns:
      (share of the parameters, by element count, not split over `axis`; the paths of
      the largest such arrays, up to 3).
    """
    whole, total = [], 0
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                      jax.tree.leaves(shardings), strict=True):
        size = math.prod(leaf.shape)
        total += size
        used = {a for part in sharding.spec if part
                for a in (part if isinstance(part, tuple) else (part,))}
        if axis not in used:
            whole.append((size, "/".join(_dict_path(path))))
    whole.sort(reverse=True)
    return sum(n for n, _ in whole) / max(total, 1), [name for _, name in whole[:3]]


def _dict_path(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, shardings: Any,
                        mesh: Mesh) -> Any:
    """Shardings for any optax state, matched to parameters by path and shape.

    optax wraps parameter-shaped trees in NamedTuples, masks and multi-step
    accumulators; their leaves end with the parameter's dict path. A leaf whose
    trailing dict path names a parameter of the same shape takes that parameter's
    sharding (moments live where their parameter lives); any other leaf (counts,
    scalars) is replicated.

    Args:
      abstract_opt_state: `jax.eval_shape(tx.init, abstract_params)`.
      abstract_params: the unboxed abstract parameters.
      shardings: the parameters' NamedShardings.
      mesh: the device mesh.

    Returns:
      A tree of NamedShardings with the structure of `abstract_opt_state`.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_shard = jax.tree.leaves(shardings)
    for (path, leaf), sharding in zip(flat_params, flat_shard, strict=True):
        by_path[_dict_path(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, PartitionSpec())
    unmatched = []

    def one(path, leaf):
        keys = _dict_path(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        if len(getattr(leaf, "shape", ())) > 0:
            unmatched.append(jax.tree_util.keystr(path))
        return replicated

    out = jax.tree_util.tree_map_with_path(one, abstract_opt_state)
    if unmatched:
        logging.info("optimizer state kept replicated: %s", ", ".join(unmatched[:8]))
    return out


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Inside a traced function: models' `axes.constrain` calls map their activation
    names ('batch', 'length', 'act_embed') onto `mesh` by `rules`.

    Without it those calls are no-ops and XLA alone decides activation layouts,
    which on mixed data x fsdp meshes can mean needless re-layouts.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), axes.activation_rules(rules):
        yield


def describe(abstract: Any, shardings: Any, limit: int = 400) -> str:
    """A table of every leaf with its shape and PartitionSpec (for logs)."""
    rows = []
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
        rows.append(f"{jax.tree_util.keystr(path):<90} {str(tuple(leaf.shape)):<22} "
                    f"{sharding.spec}")
    if len(rows) > limit:
        rows = rows[:limit] + [f"... {len(rows) - limit} more"]
    return "\n".join(rows)

"""The training state and its abstract-first creation with explicit shardings."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cacophony_jax.parallel import partition


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a plain pytree that Orbax saves whole.

    Attributes:
      step: optimiser steps taken (int32 scalar).
      params: model parameters (float32).
      opt_state: optax state.
      rng: base PRNG key data (uint32[2]); a step folds in its step number.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass
class StatePlan:
    """The abstract state and where every leaf lives."""

    abstract: TrainState  # ShapeDtypeStructs with shardings attached
    shardings: TrainState  # NamedShardings


def plan_state(init_params_fn, tx: optax.GradientTransformation, mesh: Mesh,
               rules: partition.Rules) -> StatePlan:
    """Derives the state's shapes and shardings without allocating anything.

    Args:
      init_params_fn: rng -> boxed parameter tree (`model.init(...)['params']`).
      tx: the optimiser.
      mesh: the device mesh.
      rules: logical -> mesh axis rules.

    Returns:
      A StatePlan.
    """
    boxed = jax.eval_shape(init_params_fn, jax.random.PRNGKey(0))
    abstract_params, param_shardings = partition.param_shardings(boxed, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = partition.opt_state_shardings(abstract_opt, abstract_params,
                                                  param_shardings, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_shardings,
                           rng=rep)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StatePlan(abstract=abstract, shardings=shardings)


def create_state(init_params_fn, tx: optax.GradientTransformation, plan: StatePlan,
                 seed: int, params: Any = None) -> TrainState:
    """Creates the state directly in its shardings (one jit, no host copy).

    Args:
      init_params_fn: rng -> boxed parameter tree.
      tx: the optimiser.
      plan: from `plan_state`.
      seed: initialisation and training seed.
      params: optional parameters to start from (already placed); the optimiser
        state is still initialised fresh.

    Returns:
      The sharded TrainState at step 0.
    """
    def init(key, given):
        init_key, train_key = jax.random.split(key)
        if given is None:
            given = flax.linen.meta.unbox(init_params_fn(init_key))
        return TrainState(step=jnp.zeros((), jnp.int32), params=given,
                          opt_state=tx.init(given), rng=train_key)

    key = jax.random.PRNGKey(seed)
    with _threefry_kernels():
        if params is None:
            return jax.jit(lambda k: init(k, None), out_shardings=plan.shardings)(key)
        return jax.jit(init, out_shardings=plan.shardings)(key, params)


@contextlib.contextmanager
def _threefry_kernels():
    """Random numbers from JAX's threefry GPU kernel while the state is initialised.

    Unrolled into XLA fusions, the threefry hash of every parameter's initialiser took
    XLA:GPU 41 s (MAE `base`) and 78 s (Cacophony `base`) to compile; as kernel calls,
    2 s and 5 s (benchmarks/RESULTS.md section 6). The numbers are the same function
    of the key either way. The setting is part of jit's cache key and only changes
    how GPUs lower the hash; other backends ignore it. The kernel call is not split
    by the partitioner: with FSDP each GPU draws a parameter's full random bits and
    keeps its shard (Cacophony `base` on 1 x 8 H100s: 0.86 GiB of temporaries per
    device instead of none, for a 9 s compile instead of 79 s).
    """
    before = jax.config.jax_threefry_gpu_kernel_lowering
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    try:
        yield
    finally:
        jax.config.update("jax_threefry_gpu_kernel_lowering", before)

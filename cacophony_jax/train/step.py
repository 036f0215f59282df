"""The jitted, sharded, donated train step shared by every task."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.parallel import partition
from cacophony_jax.train.state import StatePlan, TrainState


def step_loss_fn(task: Any, batch: dict[str, jax.Array], rng: jax.Array):
    """The step's loss as a function of the parameters: params -> (loss, metrics).

    The front end (log-mel, patches, masks) runs once here, from the first half of
    `rng`, outside the differentiated function; the model's randomness is the second.
    """
    feature_rng, model_rng = jax.random.split(rng)
    features = task.features(batch, feature_rng, train=True)
    return lambda params: task.loss(params, features, batch, model_rng)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, task: Any,
               tx: optax.GradientTransformationExtraArgs, schedule: optax.Schedule,
               update_norm: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update on the global batch.

    The front end (log-mel, patches, masks) runs first, outside the differentiated
    function; `grad_fn` lets SAM (when configured) take its second gradient on the
    same batch and randomness, so enabling SAM is purely a config change.

    The metrics hold the global norm of the first gradient (with SAM, the one at the
    current parameters, not the perturbed point's that clipping sees) but
    not the new parameters' norm (`param_norm`, which the loop computes at log steps)
    and, unless asked, not the update's: reductions over the new parameters and the
    update inside the step made XLA:GPU copy 890 parameter-sized arrays into their
    donated output buffers, 1,220 more kernels in the MAE `base` step (the update's
    norm alone adds about 300; benchmarks/RESULTS.md section 7).

    Args:
      state: the current state (donated by the jitted wrapper).
      batch: the global batch (data/spec.py).
      task: an object with `features(batch, rng, train)` and
        `loss(params, features, batch, rng) -> (loss, metrics)`.
      tx: the optimiser chain.
      schedule: learning-rate schedule, for logging.
      update_norm: also report the update's global norm (`update_norm`).

    Returns:
      (new state, metrics of this step as scalars).
    """
    loss_fn = step_loss_fn(task, batch, jax.random.fold_in(state.rng, state.step))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

    def grad_fn(params):
        return jax.grad(lambda p: loss_fn(p)[0])(params)

    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
    )
    if update_norm:
        metrics["update_norm"] = optax.tree.norm(updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def with_rules(fn, mesh: Mesh, rules: partition.Rules | None):
    """`fn` traced under the logical activation rules (unchanged when `rules` is None)."""
    if rules is None:
        return fn

    @functools.wraps(fn)
    def constrained(*args, **kwargs):
        with partition.activation_rules(mesh, rules):
            return fn(*args, **kwargs)
    return constrained


def jit_train_step(task: Any, tx: optax.GradientTransformationExtraArgs,
                   schedule: optax.Schedule, plan: StatePlan, mesh: Mesh,
                   batch_shapes: dict[str, tuple[int, ...]],
                   rules: partition.Rules | None = None, update_norm: bool = False):
    """Compiles-on-first-call the step with explicit shardings and a donated state.

    Args:
      task, tx, schedule: see `train_step`.
      plan: the state's shardings.
      mesh: the device mesh.
      batch_shapes: key -> global shape, to derive the batch shardings.
      rules: logical axis rules for activation constraints inside the step (None:
        let XLA choose activation layouts).
      update_norm: see `train_step`.

    Returns:
      A jitted `(state, batch) -> (state, metrics)`.
    """
    batch_shardings = {k: mesh_lib.batch_sharding(mesh, len(s))
                       for k, s in batch_shapes.items()}
    return jax.jit(
        with_rules(functools.partial(train_step, task=task, tx=tx, schedule=schedule,
                                     update_norm=update_norm), mesh, rules),
        in_shardings=(plan.shardings, batch_shardings),
        out_shardings=(plan.shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )

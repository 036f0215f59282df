"""Sharpness-aware minimisation (SAM, Foret et al. 2021; ASAM, Kwon et al. 2021).

`sam()` is an optax transformation meant to sit FIRST in an `optax.chain`:

    tx = optax.chain(sam(rho=0.05), optax.clip_by_global_norm(1.0), optax.adamw(...))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

Given the gradient g at the parameters w it builds the adversarial step
e = rho * g / ||g|| (adaptive: e = rho * w^2 * g / ||w * g||), evaluates
`grad_fn(w + e)` once and hands that gradient down the chain. Clipping, AdamW,
the schedule and the weight-decay mask therefore all act on the SAM gradient,
and one call is one real update costing two gradient evaluations (the train
step's own and `grad_fn`'s).

Why not `optax.contrib.sam(..., opaque_mode=True)`: that wrapper owns the outer
optimiser (it takes it as an argument and runs it inside its own loop), so the
optimiser state nests inside SAM's, changes shape when SAM is switched on and
cannot be placed in a chain behind it. Here SAM is a stateless-in-practice
gradient rewrite, the rest of the chain is unchanged, and switching SAM on or
off is one config flag. `optax.chain` forwards the `grad_fn` keyword to the
transformations that accept extra arguments and drops it for the others
(`optax.with_extra_args_support`), so plain transformations behind SAM are
unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SAMState(NamedTuple):
    """State of `sam()`.

    Attributes:
      count: int32 scalar, number of SAM updates done (for logging; the
        perturbation itself needs no memory between steps).
    """

    count: jax.Array


def _global_norm(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def sam_perturbation(
    grads: Any, params: Any, rho: float, adaptive: bool = False, eps: float = 1e-12
) -> Any:
    """The adversarial step e added to the parameters before the second gradient.

    Args:
      grads: gradient pytree g at `params`.
      params: parameter pytree w (same structure).
      rho: radius of the neighbourhood.
      adaptive: ASAM: scale the step by w^2 and measure ||w * g||.
      eps: added to the norm so a zero gradient gives a zero step, not NaN.

    Returns:
      Pytree e (float32 leaves) of the structure of `grads`.
    """
    if adaptive:
        scaled = jax.tree.map(lambda g, w: g.astype(jnp.float32) * w, grads, params)
        factor = rho / (_global_norm(scaled) + eps)
        return jax.tree.map(
            lambda g, w: factor * jnp.square(w.astype(jnp.float32)) * g, grads, params
        )
    factor = rho / (_global_norm(grads) + eps)
    return jax.tree.map(lambda g: factor * g.astype(jnp.float32), grads)


def sam(
    rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12
) -> optax.GradientTransformationExtraArgs:
    """SAM as the first link of an optax chain.

    Args:
      rho: neighbourhood radius (0.05 in Foret et al.; ASAM uses larger values).
      adaptive: use ASAM's scale-invariant perturbation.
      eps: numerical floor of the gradient norm.

    Returns:
      A `GradientTransformationExtraArgs` whose `update(updates, state, params, *,
      grad_fn)` returns `grad_fn(params + e)` as the updates. `grad_fn(params) ->
      grads` must evaluate the same loss on the same batch as the incoming
      gradient. `params` is required.
    """
    if rho < 0:
        raise ValueError(f"SAM rho must be >= 0, got {rho}")

    def init_fn(params: Any) -> SAMState:
        del params
        return SAMState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: Any,
        state: SAMState,
        params: Any = None,
        *,
        grad_fn: Callable[[Any], Any] | None = None,
        **extra_args: Any,
    ) -> tuple[Any, SAMState]:
        del extra_args  # Meant for other links of the chain.
        if grad_fn is None:
            raise ValueError(
                "SAM needs the gradient function: call tx.update(grads, state, params, "
                "grad_fn=lambda p: jax.grad(loss_fn)(p, batch))"
            )
        if params is None:
            raise ValueError("SAM needs the current params: call tx.update(grads, state, params)")
        perturbation = sam_perturbation(updates, params, rho, adaptive, eps)
        perturbed = jax.tree.map(lambda w, e: (w + e).astype(w.dtype), params, perturbation)
        sam_grads = grad_fn(perturbed)
        if jax.tree.structure(sam_grads) != jax.tree.structure(updates):
            raise ValueError(
                "SAM grad_fn must return gradients with the structure of the params; got "
                f"{jax.tree.structure(sam_grads)}"
            )
        sam_grads = jax.tree.map(lambda s, g: s.astype(g.dtype), sam_grads, updates)
        return sam_grads, SAMState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

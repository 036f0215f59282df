"""SAM as the first link of an optax chain."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cacophony_jax.optim.sam import SAMState, sam


def regression_loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean(jnp.square(pred - batch["y"]))


def regression_problem(seed=0, size=16):
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.normal(size=(8, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
    }
    batch = {
        "x": rng.normal(size=(size, 8)).astype(np.float32),
        "y": rng.normal(size=(size, 4)).astype(np.float32),
    }
    return params, batch


def test_perturbed_gradient_by_hand():
    # f(w) = (w1^2 + 4 w2^2) / 2 at w = (1, 1): g = (1, 4), ||g|| = sqrt(17).
    f = lambda w: 0.5 * (w[0] ** 2 + 4.0 * w[1] ** 2)
    w = jnp.array([1.0, 1.0])
    tx = sam(rho=0.1)
    updates, state = tx.update(jax.grad(f)(w), tx.init(w), w, grad_fn=jax.grad(f))
    e = 0.1 * np.array([1.0, 4.0]) / math.sqrt(17.0)
    np.testing.assert_allclose(updates, [1.0 + e[0], 4.0 * (1.0 + e[1])], rtol=1e-6)
    assert isinstance(state, SAMState) and int(state.count) == 1


@pytest.mark.parametrize("adaptive", [False, True])
def test_chain_step_equals_hand_written_sam(adaptive):
    params, batch = regression_problem()
    rho, lr = 0.05, 0.1
    grad_fn = lambda p: jax.grad(regression_loss)(p, batch)

    g = grad_fn(params)
    if adaptive:
        norm = np.sqrt(sum(np.sum((params[k] * g[k]) ** 2) for k in params))
        e = {k: rho * params[k] ** 2 * g[k] / norm for k in params}
    else:
        norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in params))
        e = {k: rho * g[k] / norm for k in params}
    g_sam = grad_fn({k: params[k] + e[k] for k in params})
    expected = {k: params[k] - lr * g_sam[k] for k in params}

    tx = optax.chain(sam(rho, adaptive=adaptive), optax.sgd(lr))
    updates, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
    got = optax.apply_updates(params, updates)
    for k in params:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_agrees_with_optax_contrib_sam_opaque_mode():
    params, batch = regression_problem(seed=1)
    rho = 0.05
    grad_fn = lambda p: jax.grad(regression_loss)(p, batch)

    # contrib: one adversarial step of normalised SGD (sync_period 2), then AdamW.
    ref = optax.contrib.sam(
        optax.adamw(1e-2),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    ours = optax.chain(sam(rho), optax.adamw(1e-2))

    p_ref, s_ref = params, ref.init(params)
    p_ours, s_ours = params, ours.init(params)
    for _ in range(5):
        u, s_ref = ref.update(grad_fn(p_ref), s_ref, p_ref, grad_fn=lambda p, _: grad_fn(p))
        p_ref = optax.apply_updates(p_ref, u)
        u, s_ours = ours.update(grad_fn(p_ours), s_ours, p_ours, grad_fn=grad_fn)
        p_ours = optax.apply_updates(p_ours, u)
    for k in params:
        np.testing.assert_allclose(p_ours[k], p_ref[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(p_ours[k], params[k])


def test_converges_on_ill_conditioned_quadratic():
    curvature = jnp.array([1.0, 100.0])
    f = lambda w: 0.5 * jnp.sum(curvature * w**2)
    tx = optax.chain(sam(rho=0.01), optax.sgd(0.009))

    @jax.jit
    def step(w, state):
        updates, state = tx.update(jax.grad(f)(w), state, w, grad_fn=jax.grad(f))
        return optax.apply_updates(w, updates), state

    w = jnp.array([1.0, 1.0])
    state = tx.init(w)
    start = float(f(w))
    for _ in range(1000):
        w, state = step(w, state)
    # With a fixed rho SAM ends in a small orbit (radius below rho) around the
    # minimum rather than on it.
    assert float(jnp.linalg.norm(w)) < 0.01
    assert float(f(w)) < 1e-3 * start


def test_zero_gradient_gives_zero_step_not_nan():
    w = jnp.zeros(3)
    tx = sam(rho=0.05)
    seen = []
    grad_fn = lambda p: seen.append(p) or jnp.zeros(3)
    updates, _ = tx.update(jnp.zeros(3), tx.init(w), w, grad_fn=grad_fn)
    np.testing.assert_array_equal(seen[0], np.zeros(3))
    assert np.all(np.isfinite(updates))


def test_extra_args_reach_sam_and_plain_links_ignore_them():
    params, batch = regression_problem()
    grad_fn = lambda p: jax.grad(regression_loss)(p, batch)
    g = grad_fn(params)
    # Plain transforms accept (and drop) grad_fn inside a chain.
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    u_plain, _ = plain.update(g, plain.init(params), params, grad_fn=grad_fn)
    u_direct, _ = plain.update(g, plain.init(params), params)
    np.testing.assert_array_equal(u_plain["w"], u_direct["w"])

    tx = optax.chain(sam(0.05), optax.sgd(0.1))
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(g, tx.init(params), params)
    with pytest.raises(ValueError, match="params"):
        tx.update(g, tx.init(params), grad_fn=grad_fn)


def test_jitted_step_on_sharded_params_matches_unsharded():
    params, batch = regression_problem(seed=2)
    tx = optax.chain(sam(0.05), optax.clip_by_global_norm(1.0), optax.adamw(1e-2))

    def train_step(params, opt_state, batch):
        grads = jax.grad(regression_loss)(params, batch)
        grad_fn = lambda p: jax.grad(regression_loss)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    param_sh = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P())}
    batch_sh = {k: NamedSharding(mesh, P("data")) for k in batch}
    sharded_params = jax.device_put(params, param_sh)
    opt_state = jax.jit(tx.init)(sharded_params)
    step = jax.jit(train_step, out_shardings=(param_sh, None), donate_argnums=(0, 1))
    p_sharded, b_sharded = sharded_params, jax.device_put(batch, batch_sh)
    for _ in range(2):
        p_sharded, opt_state = step(p_sharded, opt_state, b_sharded)

    p_plain, s_plain = params, tx.init(params)
    for _ in range(2):
        p_plain, s_plain = jax.jit(train_step)(p_plain, s_plain, batch)
    assert p_sharded["w"].sharding.spec == P("fsdp", None)
    for k in params:
        np.testing.assert_allclose(p_sharded[k], p_plain[k], rtol=1e-5, atol=1e-6)

"""The config-built optimiser: schedules, decay mask, freezing, accumulation, SAM."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cacophony_jax.optim.optimizer import (
    OptimizerConfigError,
    learning_rate_at,
    make_optimizer,
    param_paths,
)


def make_cfg(**overrides):
    cfg = ml_collections.ConfigDict(
        {
            "learning_rate": 1.0,
            "warmup_steps": 10,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "b1": 0.9,
            "b2": 0.98,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "clip_norm": 0.0,
            "decay_exclude": r"(bias|scale)$",
            "freeze": "",
            "accum_steps": 1,
            "max_logit_scale": 0.0,
            "sam": {"enabled": False, "rho": 0.05, "adaptive": False},
        }
    )
    for key, value in overrides.items():
        if key.startswith("sam_"):
            cfg.sam[key[4:]] = value
        else:
            cfg[key] = value
    return cfg


def tiny_params():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "encoder": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)},
            "head": {
                "kernel": rng.normal(size=(2, 2)).astype(np.float32),
                "bias": np.zeros(2, np.float32),
            },
        }
    }


def tiny_loss(params, batch):
    p = params["params"]
    hidden = jnp.tanh(batch["x"] @ p["encoder"]["kernel"])
    pred = hidden @ p["head"]["kernel"] + p["head"]["bias"]
    return jnp.mean(jnp.square(pred - batch["y"]))


def tiny_batch(size=8, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(size, 3)).astype(np.float32),
        "y": 5.0 * rng.normal(size=(size, 2)).astype(np.float32),
    }


def run_steps(tx, params, batches):
    @jax.jit
    def step(params, state, batch):
        grad_fn = lambda p: jax.grad(tiny_loss)(p, batch)
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for batch in batches:
        params, state = step(params, state, batch)
    return params, state


def test_param_paths():
    paths = param_paths(tiny_params())
    assert paths["params"]["head"]["bias"] == "params/head/bias"


@pytest.mark.parametrize(
    "kind, expected",
    [
        # warmup 10 to peak 1, then decay to 0.1 at step 110; step 35 is 1/4 into it.
        (
            "cosine",
            {
                0: 0.0,
                5: 0.5,
                10: 1.0,
                35: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)),
                60: 0.55,
                110: 0.1,
                500: 0.1,
            },
        ),
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.775, 60: 0.55, 110: 0.1, 500: 0.1}),
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 35: 1.0, 500: 1.0}),
    ],
)
def test_schedule_values(kind, expected):
    _, schedule = make_optimizer(make_cfg(schedule=kind), total_steps=110)
    for step, value in expected.items():
        assert learning_rate_at(schedule, step) == pytest.approx(value, abs=1e-6), step


def test_schedule_with_accumulation_holds_per_update():
    _, schedule = make_optimizer(make_cfg(schedule="linear", accum_steps=4), total_steps=112)
    # Train steps 4..7 feed the update that uses the value at step 4: 0.4.
    assert [learning_rate_at(schedule, s) for s in (3, 4, 7, 8)] == pytest.approx(
        [0.0, 0.4, 0.4, 0.8]
    )
    with pytest.raises(ValueError, match="steps=110 is not a multiple of .*accum_steps=4"):
        make_optimizer(make_cfg(schedule="linear", accum_steps=4), total_steps=110)


def test_applied_learning_rate_follows_schedule():
    # Adam's first update is -lr * sign(g) (up to eps); warmup 2 -> lr 0, 0.5, 1.
    cfg = make_cfg(schedule="constant", warmup_steps=2, learning_rate=1.0)
    tx, _ = make_optimizer(cfg, total_steps=10)
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    steps = []
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones(1)}, state, params, grad_fn=None)
        steps.append(float(updates["w"][0]))
    assert steps == pytest.approx([0.0, -0.5, -1.0], abs=1e-6)


def test_decay_mask_spares_bias_and_decays_kernel():
    # Zero gradients: Adam's step is 0, so the update is pure decay -lr * wd * w.
    cfg = make_cfg(schedule="constant", warmup_steps=0, learning_rate=0.1, weight_decay=0.5)
    tx, _ = make_optimizer(cfg, total_steps=10)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params, grad_fn=None)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.05 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros(2))


@pytest.mark.parametrize("sam_enabled, accum_steps", [(False, 1), (True, 1), (True, 2)])
def test_frozen_params_do_not_move(sam_enabled, accum_steps):
    cfg = make_cfg(
        freeze="encoder",
        weight_decay=0.1,
        clip_norm=1.0,
        warmup_steps=0,
        learning_rate=0.01,
        sam_enabled=sam_enabled,
        accum_steps=accum_steps,
    )
    tx, _ = make_optimizer(cfg, total_steps=10)
    params = tiny_params()
    new, state = run_steps(tx, params, [tiny_batch(seed=s) for s in range(3)])
    np.testing.assert_array_equal(
        new["params"]["encoder"]["kernel"], params["params"]["encoder"]["kernel"]
    )
    assert not np.allclose(new["params"]["head"]["kernel"], params["params"]["head"]["kernel"])
    # AdamW (and the accumulator) keep nothing for frozen parameters.
    moment_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert any("head" in p for p in moment_paths)
    assert not any("encoder" in p for p in moment_paths)


def test_sam_perturbs_only_trainable_params_when_freezing():
    cfg = make_cfg(freeze="encoder", warmup_steps=0, sam_enabled=True, sam_rho=0.5)
    tx, _ = make_optimizer(cfg, total_steps=10)
    params, batch = tiny_params(), tiny_batch()
    seen = []

    def grad_fn(p):
        seen.append(p)
        return jax.grad(tiny_loss)(p, batch)

    grads = jax.grad(tiny_loss)(params, batch)
    tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    (perturbed,) = seen
    np.testing.assert_array_equal(
        perturbed["params"]["encoder"]["kernel"], params["params"]["encoder"]["kernel"]
    )
    head = grads["params"]["head"]
    norm = np.sqrt(np.sum(head["kernel"] ** 2) + np.sum(head["bias"] ** 2))
    np.testing.assert_allclose(
        perturbed["params"]["head"]["kernel"],
        params["params"]["head"]["kernel"] + 0.5 * head["kernel"] / norm,
        rtol=1e-5,
    )


def test_accumulation_equals_one_big_batch_step():
    # Clipping is active (targets are large), so it must apply to the mean gradient.
    common = {"clip_norm": 0.5, "weight_decay": 0.1, "warmup_steps": 0, "learning_rate": 0.05}
    big = tiny_batch(size=8)
    halves = [jax.tree.map(lambda x, i=i: x[4 * i : 4 * i + 4], big) for i in range(2)]
    params = tiny_params()
    assert float(optax.tree.norm(jax.grad(tiny_loss)(params, big))) > 0.5

    tx1, _ = make_optimizer(make_cfg(**common, accum_steps=1), total_steps=20)
    tx2, _ = make_optimizer(make_cfg(**common, accum_steps=2), total_steps=40)
    one, _ = run_steps(tx1, params, [big, big])
    mid, _ = run_steps(tx2, params, halves[:1])
    two, _ = run_steps(tx2, params, halves + halves)
    jax.tree.map(np.testing.assert_array_equal, mid, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), two, one)


def test_sam_switch_in_config():
    params = {"w": jnp.array([1.0, -2.0])}
    g_step, g_sam = {"w": jnp.array([3.0, 0.5])}, {"w": jnp.array([-1.0, 2.0])}
    base = {"warmup_steps": 0, "schedule": "constant", "clip_norm": 1.0}
    tx_on, _ = make_optimizer(make_cfg(**base, sam_enabled=True), total_steps=5)
    tx_off, _ = make_optimizer(make_cfg(**base), total_steps=5)

    on, _ = tx_on.update(g_step, tx_on.init(params), params, grad_fn=lambda p: g_sam)
    off_sam, _ = tx_off.update(g_sam, tx_off.init(params), params)
    off, _ = tx_off.update(g_step, tx_off.init(params), params, grad_fn=lambda p: g_sam)
    off_plain, _ = tx_off.update(g_step, tx_off.init(params), params)
    # On: the update is built from grad_fn's gradient; off: grad_fn is ignored.
    np.testing.assert_allclose(on["w"], off_sam["w"], rtol=1e-6)
    np.testing.assert_allclose(off["w"], off_plain["w"], rtol=1e-6)
    assert not np.allclose(on["w"], off["w"])
    with pytest.raises(ValueError, match="grad_fn"):
        tx_on.update(g_step, tx_on.init(params), params)


def test_config_errors_are_clear():
    with pytest.raises(OptimizerConfigError, match="schedule='cosin'"):
        make_optimizer(make_cfg(schedule="cosin"), total_steps=100)
    with pytest.raises(OptimizerConfigError, match="freeze='enc\\('"):
        make_optimizer(make_cfg(freeze="enc("), total_steps=100)
    with pytest.raises(OptimizerConfigError, match="decay_exclude"):
        make_optimizer(make_cfg(decay_exclude="[bias"), total_steps=100)
    with pytest.raises(OptimizerConfigError, match="exceed"):
        make_optimizer(make_cfg(warmup_steps=100), total_steps=100)
    tx, _ = make_optimizer(make_cfg(freeze="encodr"), total_steps=100)
    with pytest.raises(OptimizerConfigError, match="matches no parameter.*params/encoder"):
        tx.init(tiny_params())
    tx, _ = make_optimizer(make_cfg(freeze=".*"), total_steps=100)
    with pytest.raises(OptimizerConfigError, match="matches every parameter, so nothing"):
        tx.init(tiny_params())


def test_logit_scale_stops_at_its_ceiling():
    # Gradients that always push the logit scale up: it climbs to ln 100 and stays.
    cfg = make_cfg(schedule="constant", warmup_steps=0, learning_rate=0.5,
                   max_logit_scale=4.6052)
    tx, _ = make_optimizer(cfg, total_steps=20)
    params = {"logit_scale": jnp.asarray(2.0), "head": {"logit_scale_net": jnp.ones(2)}}
    state = tx.init(params)
    seen = []
    for _ in range(20):
        grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)
        updates, state = tx.update(grads, state, params, grad_fn=None)
        params = optax.apply_updates(params, updates)
        seen.append(float(params["logit_scale"]))
    assert seen[0] < 4.6 and max(seen) == pytest.approx(4.6052) and seen[-1] == seen[-2]
    assert float(params["head"]["logit_scale_net"][0]) > 5  # only that parameter
    # The ceiling keeps the optimiser state as it is: checkpoints are unchanged.
    free, _ = make_optimizer(make_cfg(schedule="constant", warmup_steps=0,
                                      learning_rate=0.5), total_steps=20)
    assert jax.tree.structure(free.init(params)) == jax.tree.structure(tx.init(params))

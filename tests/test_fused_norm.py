"""The Pallas LayerNorm kernels (interpreted here) against Flax's LayerNorm."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cacophony_jax.models import fused_norm
from cacophony_jax.models.fused_norm import NormWithSkip
from cacophony_jax.models.layers import layer_norm
from cacophony_jax.models.mae import MAE, mae_init_inputs
from cacophony_jax.models.variants import mae_config
from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.parallel import partition

RULES = (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None),
         ("embed", "fsdp"))


def _in_step():
    """The context the training step traces under (one device here)."""
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                              jax.devices()[:1])
    return partition.activation_rules(mesh, RULES)


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape) * 3.0 + 1.0, jnp.float32)
    w_norm, w_skip = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
    params = {"params": {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=shape[-1]), jnp.float32),
                         "bias": jnp.asarray(0.1 * rng.normal(size=shape[-1]), jnp.float32)}}
    return x, w_norm, w_skip, params


def _losses(dtype):
    """The same scalar through Flax's LayerNorm and through NormWithSkip, whose skip
    output replaces the input in a second (nonlinear) branch."""
    flax_norm = layer_norm(1e-6, dtype=dtype)
    fused = NormWithSkip(1e-6, dtype=dtype)

    def reference(params, x, w_norm, w_skip):
        y = flax_norm.apply(params, x).astype(jnp.float32)
        return (y * w_norm).sum() + (jnp.sin(x) * w_skip).sum()

    def kernel(params, x, w_norm, w_skip):
        with _in_step():
            skip, y = fused.apply(params, x)
        return (y.astype(jnp.float32) * w_norm).sum() + (jnp.sin(skip) * w_skip).sum()

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    return grad(reference), grad(kernel)


def _assert_close(got, want, rtol, atol):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol),
                 got, want)


@pytest.mark.parametrize("shape,programs", [((2, 13, 48), 528), ((3, 7, 20), 2)])
def test_values_and_gradients_equal_flax_layer_norm(shape, programs, monkeypatch):
    """Odd row counts and widths (masked rows and columns), and backward programs that
    loop over several row blocks (programs=2)."""
    monkeypatch.setattr(fused_norm, "BACKWARD_PROGRAMS", programs)
    x, w_norm, w_skip, params = _inputs(shape)
    reference, kernel = _losses(jnp.float32)
    (want, want_grads), (got, got_grads) = (f(params, x, w_norm, w_skip)
                                            for f in (reference, kernel))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    _assert_close(got_grads, want_grads, rtol=1e-4, atol=1e-4)


def test_bfloat16_output_and_input_dtype_kept():
    x, w_norm, w_skip, params = _inputs((2, 9, 32))
    x = x.astype(jnp.bfloat16)
    with _in_step():
        skip, y = NormWithSkip(1e-6, dtype=jnp.bfloat16).apply(params, x)
    assert skip.dtype == jnp.bfloat16 and y.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(skip), np.asarray(x))
    want = layer_norm(1e-6, dtype=jnp.float32).apply(params, x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05)
    reference, kernel = _losses(jnp.bfloat16)
    (want, want_grads), (got, got_grads) = (f(params, x, w_norm, w_skip)
                                            for f in (reference, kernel))
    assert got_grads[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(got, want, rtol=2e-2)
    _assert_close(jax.tree.map(lambda a: a.astype(jnp.float32), got_grads),
                  jax.tree.map(lambda a: a.astype(jnp.float32), want_grads),
                  rtol=5e-2, atol=5e-2)


def test_parameters_are_flax_layer_norms():
    x = jnp.zeros((1, 3, 16))
    ours = jax.eval_shape(NormWithSkip(1e-6).init, jax.random.key(0), x)
    theirs = jax.eval_shape(layer_norm(1e-6, dtype=jnp.float32).init, jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
        lambda a: (a.shape, a.dtype), theirs)
    assert nn.get_partition_spec(ours) == nn.get_partition_spec(theirs)
    made = NormWithSkip(1e-6).init(jax.random.key(0), x)["params"]
    assert np.array_equal(made["scale"].value, np.ones(16))
    assert np.array_equal(made["bias"].value, np.zeros(16))


def test_mae_with_fused_norm_trains_like_without():
    config = mae_config("tiny")
    inputs = mae_init_inputs(config, batch=2, visible=7, masked=9)
    rng = np.random.default_rng(1)
    inputs = (rng.normal(size=inputs[0].shape).astype(np.float32), *inputs[1:])
    params = jax.jit(MAE(config).init)(jax.random.key(0), *inputs)["params"]
    weights = rng.normal(size=(2, 16, config.encoder.patch_dim)).astype(np.float32)

    def loss(params, model):
        with _in_step():
            return (model.apply({"params": params}, *inputs) * weights).sum()

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    want, want_grads = grad(params, MAE(config))
    fused = MAE(config, fused_norm=True)
    assert jax.tree.structure(jax.eval_shape(fused.init, jax.random.key(0), *inputs)) == \
        jax.tree.structure(jax.eval_shape(MAE(config).init, jax.random.key(0), *inputs))
    got, got_grads = grad(params, fused)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    _assert_close(got_grads, want_grads, rtol=1e-3, atol=1e-4)


def test_on_a_mesh_each_device_normalises_its_own_examples():
    """Under the activation rules of a 2 x 4 mesh the kernels run per device
    (shard_map over the batch); the scale and bias gradients are summed across it."""
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
    x, w_norm, w_skip, params = _inputs((8, 5, 24))
    reference, _ = _losses(jnp.float32)
    want, want_grads = reference(params, x, w_norm, w_skip)
    module = NormWithSkip(1e-6)

    def kernel(params, x, w_norm, w_skip):
        with partition.activation_rules(mesh, RULES):
            skip, y = module.apply(params, x)
        return (y * w_norm).sum() + (jnp.sin(skip) * w_skip).sum()

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    step = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1)),
                   in_shardings=(NamedSharding(mesh, P()), batch, batch, batch))
    got, got_grads = step(params, x, w_norm, w_skip)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    _assert_close(got_grads, want_grads, rtol=1e-4, atol=1e-4)
    text = step.lower(params, x, w_norm, w_skip).as_text()
    assert "shard_map" in text or "manual" in text


def test_outside_the_training_step_it_is_xla_layer_norm():
    """Evaluation and inference trace without activation rules: XLA's LayerNorm, the
    same numbers as nn.LayerNorm, no kernel; inside the rules, the kernels."""
    x, _, _, params = _inputs((2, 5, 16))
    module = NormWithSkip(1e-6)
    skip, y = module.apply(params, x)
    np.testing.assert_allclose(y, layer_norm(1e-6, dtype=jnp.float32).apply(params, x),
                               rtol=1e-6, atol=1e-6)
    assert skip is x
    assert "pallas_call" not in str(jax.make_jaxpr(module.apply)(params, x))

    def in_step(params, x):
        with _in_step():
            return module.apply(params, x)

    assert "pallas_call" in str(jax.make_jaxpr(in_step)(params, x))


@pytest.mark.slow
def test_train_step_on_a_2x4_mesh_matches_the_plain_one():
    """The real MAE step (scanned, fully rematerialised) on 8 devices, data 2 x fsdp 4:
    the same loss and parameters with the kernels as without."""
    from benchmarks import train_step
    from cacophony_jax.data import to_global
    from cacophony_jax.train import state as state_lib

    results = []
    for fused in (False, True):
        config = train_step.make_config("mae", "tiny", 8, fsdp=4, scan=True, remat="full",
                                        clip_seconds=1.0, fused_norm=fused)
        built = train_step.build_step(config)
        state = state_lib.create_state(built.task.init_params, built.tx, built.plan,
                                       config.seed)
        state, metrics = built.step(state, to_global.to_global(train_step.random_batch(built),
                                                               built.mesh))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert dict(built.mesh.shape) == {"data": 2, "fsdp": 4}
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    _assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)

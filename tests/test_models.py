"""Model shapes, parameter counts, masks, causality, scan/remat equivalence, axis names."""

import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors as flax_errors
from flax import linen as nn

from cacophony_jax.models import axes
from cacophony_jax.models.cacophony import Cacophony, cacophony_init_inputs
from cacophony_jax.models.layers import HeadProjection, project_heads
from cacophony_jax.models.mae import MAE, mae_init_inputs
from cacophony_jax.models.stack import stack_layers, unstack_layers
from cacophony_jax.models.variants import (
    AudioEncoderConfig,
    cacophony_config,
    mae_config,
)
from tests.helpers import cudnn_stand_in

TINY = cacophony_config("tiny")
B, N, T = 2, 12, 7


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(model, inputs):
    return nn.unbox(jax.eval_shape(model.init, {"params": jax.random.key(0)}, *inputs))["params"]


@functools.cache
def jitted(model: nn.Module):
    """model.apply, compiled once per model and method (eager Flax compiles op by op)."""
    return jax.jit(model.apply, static_argnames=("method", "deterministic"))


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    patches = rng.normal(size=(B, N, 256)).astype(np.float32)
    time_idx = np.tile(np.arange(N) // 8, (B, 1)).astype(np.int32)
    freq_idx = np.tile(np.arange(N) % 8, (B, 1)).astype(np.int32)
    mask = np.ones((B, N), np.int32)
    mask[1, 9:] = 0
    ids = rng.integers(3, TINY.text.vocab_size, size=(B, T)).astype(np.int32)
    ids[:, 0] = 0
    text_mask = np.ones((B, T), np.int32)
    ids[1, 5:], text_mask[1, 5:] = 1, 0
    return patches, time_idx, freq_idx, mask, ids, text_mask


@pytest.fixture(scope="module")
def tiny_params():
    model = Cacophony(TINY)
    return nn.unbox(jax.jit(model.init)({"params": jax.random.key(1)}, *batch()))["params"]


def test_variant_errors_and_overrides():
    with pytest.raises(ValueError, match="valid variants: \\['tiny', 'base'\\]"):
        cacophony_config("huge")
    with pytest.raises(ValueError, match="unknown CacophonyConfig field"):
        cacophony_config("tiny", projetcion=3)
    with pytest.raises(ValueError, match="MAEConfig.decoder field"):
        mae_config("tiny", decoder={"widht": 3})
    cfg = cacophony_config("tiny", projection=32, text={"layers": 3})
    assert (cfg.projection, cfg.text.layers, cfg.text.hidden) == (32, 3, 64)
    with pytest.raises(ValueError, match="multiple of heads"):
        AudioEncoderConfig(hidden=60, layers=1, heads=8, mlp=4)


@pytest.mark.parametrize("scan", [False, True])
def test_base_parameter_counts_match_release(scan):
    cfg = cacophony_config("base")
    params = abstract_params(Cacophony(cfg, scan=scan), cacophony_init_inputs(cfg))
    mae = mae_config("base")
    mae_params = abstract_params(MAE(mae, scan=scan), mae_init_inputs(mae))
    counts = {
        "audio encoder": (count(params["audio_encoder"]), 85.26e6),
        "MAE decoder": (count(mae_params["decoder"]), 85.85e6),
        "text encoder": (count(params["text_encoder"]) + count(params["text_pool"]), 125.23e6),
        "text decoder": (count(params["decoder"]), 76.46e6),
    }
    for name, (got, want) in counts.items():
        assert abs(got - want) / want < 1e-3, (name, got, want)
    assert count(mae_params["encoder"]) == count(params["audio_encoder"])


def test_base_output_shapes_abstract():
    cfg = cacophony_config("base")
    model = Cacophony(cfg)
    inputs = cacophony_init_inputs(cfg, batch=2, num_patches=496, text_len=16)
    variables = jax.eval_shape(model.init, {"params": jax.random.key(0)}, *inputs)
    out = jax.eval_shape(model.apply, variables, *inputs)
    assert out["audio_embedding"].shape == (2, 768)
    assert out["text_embedding"].shape == (2, 768)
    assert out["caption_logits"].shape == (2, 16, 50_265)
    assert out["caption_logits"].dtype == jnp.float32
    assert out["logit_scale"].shape == ()


def test_tiny_shapes_and_init_values(tiny_params):
    model = Cacophony(TINY)
    out = jitted(model)({"params": tiny_params}, *batch())
    assert out["audio_embedding"].shape == (B, 64)
    assert out["text_embedding"].shape == (B, 64)
    assert out["caption_logits"].shape == (B, T, 500)
    assert float(out["logit_scale"]) == 2.0
    states, _ = jitted(model)({"params": tiny_params}, *batch()[:4], method="encode_audio")
    assert states.shape == (B, N, 64)
    assert set(tiny_params) == {"audio_encoder", "audio_pool", "text_encoder", "text_pool",
                                "text_proj", "decoder", "logit_scale"}


def test_sigmoid_bias_param():
    cfg = dataclasses.replace(TINY, sigmoid_bias=True)
    params = abstract_params(Cacophony(cfg), cacophony_init_inputs(cfg))
    assert params["logit_bias"].shape == ()
    # setup() creates the scalars whichever entry point runs, so the audio one suffices.
    init = jax.jit(functools.partial(Cacophony(cfg).init, method="encode_audio"))
    variables = init({"params": jax.random.key(0)}, *batch()[:4])
    assert float(nn.unbox(variables["params"])["logit_bias"]) == -10.0


@pytest.mark.parametrize("scan", [False, True])
def test_mae_encoder_tree_equals_audio_encoder(scan):
    cfg = cacophony_config("tiny")
    mae = mae_config("tiny")
    stage2 = abstract_params(Cacophony(cfg, scan=scan), cacophony_init_inputs(cfg))
    stage1 = abstract_params(MAE(mae, scan=scan), mae_init_inputs(mae))
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
    assert shapes(stage1["encoder"]) == shapes(stage2["audio_encoder"])


def test_mae_output_shape():
    # Values (visible tokens first, then masked ones) are checked against the release
    # in test_official_parity.py.
    mae = mae_config("tiny")
    inputs = mae_init_inputs(mae, batch=2, visible=3, masked=5)
    out, _ = jax.eval_shape(MAE(mae).init_with_output, {"params": jax.random.key(0)}, *inputs)
    assert out.shape == (2, 8, 256) and out.dtype == jnp.float32


def test_padded_patches_and_tokens_change_nothing_valid(tiny_params):
    model = Cacophony(TINY)
    patches, t, f, mask, ids, text_mask = batch()
    base = jitted(model)({"params": tiny_params}, patches, t, f, mask, ids, text_mask)
    states = jitted(model)({"params": tiny_params}, patches, t, f, mask, method="encode_audio")[0]
    patches2, ids2 = patches.copy(), ids.copy()
    patches2[1, 9:] += 5.0
    ids2[1, 5:] = 7
    other = jitted(model)({"params": tiny_params}, patches2, t, f, mask, ids2, text_mask)
    states2 = jitted(model)({"params": tiny_params}, patches2, t, f, mask, method="encode_audio")[0]
    np.testing.assert_allclose(states2[1, :9], states[1, :9], atol=1e-5)
    assert not np.allclose(states2[1, 9:], states[1, 9:], atol=1e-3)  # padded queries differ
    for key in ("audio_embedding", "text_embedding"):
        np.testing.assert_allclose(other[key], base[key], atol=1e-5)
    np.testing.assert_allclose(other["caption_logits"][1, :5], base["caption_logits"][1, :5],
                               atol=1e-4)
    np.testing.assert_allclose(other["caption_logits"][0], base["caption_logits"][0], atol=1e-5)


def test_text_tower_and_decoder_are_causal(tiny_params):
    model = Cacophony(TINY)
    patches, t, f, mask, ids, _ = batch()
    ones = np.ones_like(ids)
    ids2 = ids.copy()
    ids2[:, 4] = 9
    outs = [jitted(model)({"params": tiny_params}, patches, t, f, mask, x, ones)
            for x in (ids, ids2)]
    states = [jitted(model)({"params": tiny_params}, x, ones, method="encode_text")[0]
              for x in (ids, ids2)]
    np.testing.assert_allclose(states[1][:, :4], states[0][:, :4], atol=1e-5)
    assert not np.allclose(states[1][:, 4:], states[0][:, 4:], atol=1e-3)
    np.testing.assert_allclose(outs[1]["caption_logits"][:, :4], outs[0]["caption_logits"][:, :4],
                               atol=1e-4)


def test_head_projections_match_dense_general_with_or_without_fusing():
    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    general = nn.DenseGeneral((3, 4), kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(1.0))
    reference, params = [], []
    for seed in range(3):
        variables = general.init(jax.random.key(seed), x)
        reference.append(general.apply(variables, x))
        params.append((variables["params"]["kernel"], variables["params"]["bias"]))
    # Same names, shapes and initial values as DenseGeneral's.
    made = HeadProjection(3, 4).init(jax.random.key(0), 12)["params"]
    assert jax.tree.map(np.shape, nn.unbox(made)) == {"kernel": (12, 3, 4), "bias": (3, 4)}
    np.testing.assert_array_equal(nn.unbox(made)["kernel"], params[0][0])
    fused = project_heads(x, params, jnp.float32)
    for out, ref, p in zip(fused, reference, params, strict=True):
        assert out.shape == (2, 5, 3, 4)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(project_heads(x, [p], jnp.float32)[0], ref,
                                   rtol=1e-5, atol=1e-5)
    # One matrix product for all three.
    jaxpr = jax.make_jaxpr(lambda x, p: project_heads(x, p, jnp.float32))(x, params)
    assert [e.primitive.name for e in jaxpr.eqns].count("dot_general") == 1


def test_fused_qkv_keeps_parameters_and_outputs(tiny_params):
    fused = Cacophony(TINY, fuse_qkv=True)
    made = nn.unbox(jax.jit(fused.init)({"params": jax.random.key(1)}, *batch()))["params"]
    assert jax.tree.all(jax.tree.map(np.array_equal, made, tiny_params))
    a = jitted(Cacophony(TINY))({"params": tiny_params}, *batch())
    b = jitted(fused)({"params": tiny_params}, *batch())
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
    mae_tiny = mae_config("tiny")
    mae_inputs = mae_init_inputs(mae_tiny, batch=2)
    plain, joined = MAE(mae_tiny), MAE(mae_tiny, fuse_qkv=True)
    variables = plain.init(jax.random.key(2), *mae_inputs)
    assert jax.tree.all(jax.tree.map(np.array_equal, variables,
                                     joined.init(jax.random.key(2), *mae_inputs)))
    np.testing.assert_allclose(plain.apply(variables, *mae_inputs),
                               joined.apply(variables, *mae_inputs), rtol=1e-5, atol=1e-5)


def test_scan_equals_unrolled(tiny_params):
    scanned = stack_layers(tiny_params)
    assert scanned["text_encoder"]["blocks"]["attn"]["query"]["kernel"].shape == (2, 64, 4, 16)
    a = jitted(Cacophony(TINY))({"params": tiny_params}, *batch())
    b = jitted(Cacophony(TINY, scan=True))({"params": scanned}, *batch())
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
    back = unstack_layers(scanned)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, tiny_params))


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axes(scan):
    model = Cacophony(TINY, scan=scan)
    boxed = jax.eval_shape(model.init, {"params": jax.random.key(0)}, *cacophony_init_inputs(TINY))
    specs = nn.get_partition_spec(boxed)["params"]
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    shapes = jax.tree.leaves(nn.unbox(boxed["params"]))
    assert len(flat) == len(shapes)
    for (path, spec), shape in zip(flat, shapes, strict=True):
        assert len(spec) == len(shape.shape), path
        assert set(spec) <= set(axes.PARAM_AXES) | {None}, (path, spec)
        if scan and "blocks" in jax.tree_util.keystr(path):
            assert spec[0] == axes.LAYERS, path
    assert tuple(specs["text_encoder"]["token_embed"]["embedding"]) == (axes.VOCAB, axes.EMBED)


def test_remat_options(tiny_params):
    # One layer per stack keeps compilation cheap; remat wraps every block alike.
    cfg = cacophony_config("tiny", audio={"layers": 1}, text={"layers": 1})
    params = {k: {n: v for n, v in sub.items() if n != "block_1"} if isinstance(sub, dict) else sub
              for k, sub in tiny_params.items()}
    inputs = batch()

    def loss(params, remat, scan):
        out = Cacophony(cfg, remat=remat, scan=scan).apply({"params": params}, *inputs)
        return jnp.sum(out["caption_logits"] ** 2) + jnp.sum(out["audio_embedding"] ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 grad(params, "full", False), grad(params, "none", False))
    # Every option traces, scanned too, and really inserts a checkpoint around the blocks.
    scanned = stack_layers(params)
    for remat in ("none", "full", "dots", "minimal"):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=(1, 2))(scanned, remat, True))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none"), remat
    with pytest.raises(ValueError, match="remat='some'"):
        jax.eval_shape(functools.partial(loss, remat="some", scan=False), params)


def test_drop_path_needs_rng_and_changes_training_output(tiny_params):
    model = Cacophony(TINY, drop_path=0.5)
    inputs = batch()[:4]
    variables = {"params": tiny_params}
    eval_out = jitted(model)(variables, *inputs, method="encode_audio")[1]
    plain = jitted(Cacophony(TINY))(variables, *inputs, method="encode_audio")[1]
    np.testing.assert_allclose(eval_out, plain, atol=1e-6)
    with pytest.raises(flax_errors.InvalidRngError):
        model.apply(variables, *inputs, deterministic=False, method="encode_audio")
    train = [jitted(model)(variables, *inputs, deterministic=False, method="encode_audio",
                         rngs={"dropout": jax.random.key(s)})[1] for s in (0, 1)]
    assert not np.allclose(train[0], train[1], atol=1e-4)


def test_bfloat16_compute_keeps_float32_params(tiny_params):
    model = Cacophony(TINY, dtype=jnp.bfloat16, attention="auto")
    out = jitted(model)({"params": tiny_params}, *batch())
    assert out["caption_logits"].dtype == jnp.float32
    ref = jitted(Cacophony(TINY))({"params": tiny_params}, *batch())
    err = np.linalg.norm(out["audio_embedding"] - ref["audio_embedding"])
    assert err / np.linalg.norm(ref["audio_embedding"]) < 0.05
    params = abstract_params(model, cacophony_init_inputs(TINY))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="attention='flash'"):
        jax.eval_shape(Cacophony(TINY, attention="flash").apply, {"params": tiny_params},
                       *batch())


def test_cudnn_attention_gets_masks_in_the_shape_cudnn_accepts(tiny_params, monkeypatch):
    """There is no cuDNN here: a stand-in checks cuDNN's rules on every call (encoder,
    text tower, decoder self/cross attention, pools) and computes with XLA, so the
    outputs must equal the XLA model's."""
    calls, kernels = [], []
    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_stand_in(calls, kernels))
    out = jax.jit(Cacophony(TINY, attention="cudnn").apply)({"params": tiny_params}, *batch())
    assert "cudnn" in calls and "xla" in calls  # the one-query pools stay on XLA
    # Every mask travels as lengths: no cuDNN call needs a bias tensor.
    assert set(kernels) == {"padding", "padding_causal"}
    monkeypatch.undo()
    ref = jitted(Cacophony(TINY))({"params": tiny_params}, *batch())
    for name in ("audio_embedding", "text_embedding", "caption_logits"):
        np.testing.assert_allclose(out[name], ref[name], atol=1e-5)


def count_primitive(jaxpr, name: str) -> int:
    """Occurrences of a primitive in a closed jaxpr, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += count_primitive(sub, name)
    return total


def test_cudnn_stacks_pad_an_odd_sequence_once(monkeypatch):
    """An odd-length stack (7 visible patches, 7 + 24 decoder tokens) is padded once
    per stack, not per attention call, and the real positions' outputs and
    gradients stay those of the XLA model."""
    config = mae_config("tiny")
    rng = np.random.default_rng(0)
    inputs = list(mae_init_inputs(config, batch=2, visible=7, masked=24))
    inputs[0] = rng.normal(size=inputs[0].shape).astype(np.float32)
    inputs[1] = rng.integers(0, 6, size=inputs[1].shape).astype(np.int32)
    inputs[3][1, 5:] = 0  # the second example has 5 real visible patches
    params = jax.jit(MAE(config).init)(jax.random.key(0), *inputs)["params"]
    weights = rng.normal(size=(2, 31, config.encoder.patch_dim)).astype(np.float32)

    def loss(params, model):
        return (model.apply({"params": params}, *inputs) * weights).sum()

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    want, want_grads = grad(params, MAE(config))
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_stand_in(calls))
    cudnn = MAE(config, attention="cudnn")
    got, got_grads = grad(params, cudnn)
    assert set(calls) == {"cudnn"}
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-4), got_grads, want_grads)
    # Encoder and decoder: one pad of the states and one of the mask each.
    jaxpr = jax.make_jaxpr(functools.partial(loss, model=cudnn))(params)
    assert count_primitive(jaxpr.jaxpr, "pad") == 4


@pytest.mark.parametrize("q_len,s_len", [(7, 7), (6, 9), (5, 4)])
def test_cudnn_attention_pads_odd_lengths_without_changing_values_or_gradients(
        q_len, s_len, monkeypatch):
    from cacophony_jax.models.attention_ops import attend

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, n, 2, 8)), jnp.float32)
               for n in (q_len, s_len, s_len))
    mask = jnp.asarray(rng.random((2, 1, 1, s_len)) < 0.7).at[:, :, :, 0].set(True)

    def loss(q, k, v, implementation):
        out = attend(q, k, v, mask, implementation)
        return (out * jnp.arange(out.size).reshape(out.shape)).sum(), out

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    want_grads, want = grad(q, k, v, "xla")
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_stand_in(calls))
    got_grads, got = grad(q, k, v, "cudnn")
    assert calls and set(calls) == {"cudnn"}
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)

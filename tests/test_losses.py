"""Losses against hand-worked numbers and small numpy re-implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cacophony_jax.losses import (
    cacophony_loss,
    caption_loss,
    contrastive_loss,
    masked_patch_mse,
)


def softplus(x):
    return np.log1p(np.exp(x))


def np_contrastive(a, t, logit_scale, valid, kind="softmax", bias=0.0):
    """Plain numpy reference: only the valid rows take part at all."""
    keep = valid > 0
    a, t = a[keep], t[keep]
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = np.exp(logit_scale) * a @ t.T
    n = len(a)
    if kind == "softmax":

        def xent(m):
            lse = np.log(np.sum(np.exp(m - m.max(1, keepdims=True)), 1)) + m.max(1)
            return np.mean(lse - np.diag(m))

        return 0.5 * (xent(logits) + xent(logits.T))
    z = 2 * np.eye(n) - 1
    return np.sum(softplus(-z * (logits + bias))) / n


def random_pairs(size=6, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size, dim)).astype(np.float32)
    t = (a + 0.7 * rng.normal(size=(size, dim))).astype(np.float32)
    return a, t


# ---- masked_patch_mse -------------------------------------------------------


def test_masked_patch_mse_by_hand():
    pred = np.zeros((1, 2, 2), np.float32)
    target = np.array([[[1.0, 3.0], [5.0, 5.0]]], np.float32)
    mask = np.array([[True, False]])
    # Only patch 0 is scored: (1^2 + 3^2) / 2.
    assert float(masked_patch_mse(pred, target, mask)) == pytest.approx(5.0)
    # Normalised: mean 2, unbiased variance 2 -> target (-1, 1) / sqrt(2 + 1e-6).
    got = masked_patch_mse(pred, target, mask, norm_target=True)
    assert float(got) == pytest.approx(1.0 / (2.0 + 1e-6), rel=1e-6)


def test_masked_patch_mse_matches_numpy_and_survives_empty_mask():
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(2, 5, 256)).astype(np.float32)
    target = rng.normal(size=(2, 5, 256)).astype(np.float32)
    mask = rng.random((2, 5)) < 0.5
    mask[0, 0] = True
    expected = np.sum(np.mean((pred - target) ** 2, -1) * mask) / mask.sum()
    np.testing.assert_allclose(masked_patch_mse(pred, target, mask), expected, rtol=1e-5)

    none = np.zeros((2, 5), bool)
    value, grad = jax.value_and_grad(masked_patch_mse)(pred, target, none)
    assert float(value) == 0.0
    assert np.all(np.isfinite(grad)) and not np.any(grad)


# ---- contrastive: hand-worked 2 x 2 ----------------------------------------


def test_softmax_contrastive_two_by_two_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 3.0]], np.float32)  # normalises to e1, e2
    t = np.array([[2.0, 0.0], [0.8, 0.6]], np.float32)
    # scale 2: logits = [[2, 1.6], [0, 1.2]]
    loss, m = contrastive_loss(a, t, math.log(2.0), None)
    a2t = 0.5 * (math.log1p(math.exp(-0.4)) + math.log1p(math.exp(-1.2)))
    t2a = 0.5 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.4)))
    assert float(m["a2t_loss"]) == pytest.approx(a2t, rel=1e-5)
    assert float(m["t2a_loss"]) == pytest.approx(t2a, rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * (a2t + t2a), rel=1e-5)
    # Column 1 ([1.6, 1.2]) prefers audio 0 over its own audio 1.
    assert float(m["a2t_accuracy"]) == 1.0
    assert float(m["t2a_accuracy"]) == 0.5
    assert float(m["scale"]) == pytest.approx(2.0)


def test_sigmoid_contrastive_two_by_two_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    t = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    # scale 2, bias -1: logits = [[1, 0.2], [-1, 0.6]]; label +1 on the diagonal.
    loss, m = contrastive_loss(a, t, math.log(2.0), None, kind="sigmoid", logit_bias=-1.0)
    expected = (softplus(-1.0) + softplus(0.2) + softplus(-1.0) + softplus(-0.6)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(m["bias"]) == -1.0


# ---- contrastive: numpy reference, masking, chunking ------------------------


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_contrastive_matches_numpy_and_ignores_invalid_rows(kind):
    a, t = random_pairs()
    valid = np.array([1, 1, 0, 1, 1, 0], np.float32)
    # Garbage in invalid rows must not matter at all.
    a[2], t[5] = 50.0, -30.0
    loss, _ = contrastive_loss(a, t, 1.5, valid, kind=kind, logit_bias=-2.0)
    expected = np_contrastive(a, t, 1.5, valid, kind, bias=-2.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("chunk", [2, 3])
def test_chunked_contrastive_equals_plain_with_gradients(kind, chunk):
    a, t = random_pairs()
    valid = np.array([1, 1, 0, 1, 1, 1], np.float32)

    def run(chunk_size):
        def f(a, t, s, b):
            return contrastive_loss(a, t, s, valid, kind, b, chunk_size)

        (loss, m), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(
            a, t, jnp.float32(1.2), jnp.float32(-1.0)
        )
        return loss, m, grads

    loss0, m0, g0 = run(0)
    loss1, m1, g1 = run(chunk)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for key in m0:
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-6)
    for x, y in zip(g1, g0, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert np.any(np.asarray(g0[2]))  # the scale receives a gradient


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_chunked_contrastive_never_builds_the_full_matrix(kind):
    emb = jnp.ones((64, 16))

    def compiled_text(chunk_size):
        loss = lambda a, t, s: contrastive_loss(a, t, s, None, kind, 0.0, chunk_size)[0]
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(emb, emb, jnp.float32(1.0)).compile().as_text()

    # Forward and backward: the plain loss holds a 64 x 64 logits buffer, the
    # blocked one only 8 x 64 blocks (the backward recomputes them).
    assert "f32[64,64]" in compiled_text(0)
    assert "f32[64,64]" not in compiled_text(8)


def test_chunked_contrastive_under_jit_with_sharded_batch():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    a, t = random_pairs(size=16, dim=4, seed=3)
    rows = NamedSharding(mesh, P("data"))
    loss_fn = jax.jit(lambda a, t: contrastive_loss(a, t, 0.5, None, chunk_size=4)[0])
    sharded = loss_fn(jax.device_put(a, rows), jax.device_put(t, rows))
    np.testing.assert_allclose(sharded, np_contrastive(a, t, 0.5, np.ones(16)), rtol=1e-5)


def test_contrastive_rejects_bad_arguments():
    a, t = random_pairs()
    with pytest.raises(ValueError, match="chunk_size=4"):
        contrastive_loss(a, t, 0.0, chunk_size=4)
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss(a, t, 0.0, kind="sigmoid")
    with pytest.raises(ValueError, match="unknown"):
        contrastive_loss(a, t, 0.0, kind="cosine")


# ---- caption ----------------------------------------------------------------


def test_caption_loss_by_hand():
    ids = np.array([[0, 2, 1]])
    mask = np.array([[1, 1, 0]])
    logits = np.zeros((1, 3, 3), np.float32)
    logits[0, 0] = [0.0, 0.0, math.log(3.0)]  # p(target 2) = 3 / 5
    logits[0, 1] = [100.0, -100.0, 0.0]  # predicts the pad: ignored
    loss, m = caption_loss(logits, ids, mask)
    assert float(loss) == pytest.approx(-math.log(0.6), rel=1e-6)
    assert float(m["token_accuracy"]) == 1.0


def test_caption_loss_matches_numpy_with_valid_rows():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(3, 5))
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    valid = np.array([1.0, 1.0, 0.0], np.float32)
    weight = mask[:, 1:] * valid[:, None]
    loss, m = caption_loss(jnp.asarray(logits, jnp.bfloat16), ids, mask, valid)
    # bfloat16 logits are accepted; the reference uses the same rounded values.
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    logp = rounded - np.log(np.exp(rounded).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), np.sum(nll * weight) / weight.sum(), rtol=1e-5)
    hits = (rounded[:, :-1].argmax(-1) == ids[:, 1:]) * weight
    np.testing.assert_allclose(float(m["token_accuracy"]), hits.sum() / weight.sum(), rtol=1e-6)


def test_caption_loss_gradient_has_no_scatter_and_is_softmax_minus_one_hot():
    """The target logit is selected, not gathered: a gather's gradient would be a
    scatter-add into a [B, T, V] buffer, the largest single kernel of the stage-2 step."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 4, 11)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 11, size=(2, 4)))
    mask = jnp.ones((2, 4), jnp.int32)
    grad_fn = jax.grad(lambda x: caption_loss(x, ids, mask)[0])
    from jax.extend import core as jax_core

    def primitives(jaxpr):  # with those of nested jaxprs (jit, custom_jvp ...)
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            for sub in jax_core.jaxprs_in_params(eqn.params):
                yield from primitives(sub)

    names = set(primitives(jax.make_jaxpr(grad_fn)(logits).jaxpr))
    assert "exp" in names  # the walk sees inside the nested jaxprs
    assert not any("scatter" in name or "gather" in name for name in names)
    soft = jax.nn.softmax(logits[:, :-1], axis=-1)
    expected = (soft - jax.nn.one_hot(ids[:, 1:], 11)) / 6.0  # 6 target tokens
    np.testing.assert_allclose(np.asarray(grad_fn(logits)[:, :-1]), expected, atol=1e-6)
    assert not np.any(np.asarray(grad_fn(logits)[:, -1]))  # the last position predicts nothing


# ---- combined -----------------------------------------------------------------


def test_cacophony_loss_is_the_weighted_sum():
    a, t = random_pairs(size=4)
    rng = np.random.default_rng(4)
    outputs = {
        "audio_embedding": a,
        "text_embedding": t,
        "caption_logits": rng.normal(size=(4, 5, 9)).astype(np.float32),
        "logit_scale": np.float32(2.0),
    }
    batch = {
        "text_ids": rng.integers(0, 9, size=(4, 5)).astype(np.int32),
        "text_mask": np.array([[1, 1, 1, 0, 0]] * 4, np.int32),
        "valid": np.array([1, 1, 1, 0], np.float32),
    }
    loss, m = cacophony_loss(
        outputs, batch, contrastive_weight=1.0, caption_weight=2.0, kind="softmax", chunk_size=2
    )
    con, _ = contrastive_loss(a, t, 2.0, batch["valid"])
    cap, _ = caption_loss(
        outputs["caption_logits"], batch["text_ids"], batch["text_mask"], batch["valid"]
    )
    np.testing.assert_allclose(float(m["contrastive_loss"]), float(con), rtol=1e-6)
    np.testing.assert_allclose(float(m["caption_loss"]), float(cap), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(con) + 2.0 * float(cap), rtol=1e-6)
    assert {"a2t_accuracy", "t2a_accuracy", "scale", "token_accuracy", "loss"} <= set(m)

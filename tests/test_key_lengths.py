"""Key-padding masks as lengths (cuDNN's padding kernel) and the valid-first reordering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacophony_jax.models import key_lengths
from cacophony_jax.models.attention_ops import attend
from tests.helpers import cudnn_stand_in


def test_valid_first_order_is_stable_and_its_inverse_undoes_it():
    mask = jnp.asarray([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
    order = key_lengths.valid_first_order(mask)
    np.testing.assert_array_equal(order, [[0, 2, 3, 5, 1, 4], [2, 4, 5, 0, 1, 3],
                                          [0, 1, 2, 3, 4, 5]])
    x = jnp.arange(18.0).reshape(3, 6)
    moved = key_lengths.permute_rows(x, order)
    np.testing.assert_array_equal(jnp.take_along_axis(mask, order, axis=1),
                                  key_lengths.prefix_mask(key_lengths.valid_lengths(mask),
                                                          6)[:, 0, 0])
    back = key_lengths.permute_rows(moved, key_lengths.inverse_order(order))
    np.testing.assert_array_equal(back, x)
    # Any nonzero value marks a valid position, as in the boolean masks.
    np.testing.assert_array_equal(
        key_lengths.valid_lengths(jnp.asarray([[2, 2, 0], [0.5, 0, 0]])), [2, 1])


def test_permute_rows_gradient_is_the_inverse_gather():
    rng = np.random.default_rng(0)
    order = jnp.asarray(np.stack([rng.permutation(7) for _ in range(3)]), jnp.int32)
    x = jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)

    def loss(x, gather):
        return (gather(x, order) * weights).sum()

    want = jax.grad(loss)(x, lambda x, o: jnp.take_along_axis(x, o[..., None], axis=1))
    got = jax.grad(loss)(x, key_lengths.permute_rows)
    np.testing.assert_array_equal(got, want)
    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(x, key_lengths.permute_rows)
    assert "scatter" not in str(jaxpr)


@pytest.mark.parametrize("q_len,s_len,causal", [(6, 8, False), (5, 7, False),
                                                  (6, 6, True), (5, 5, True)])
def test_lengths_attend_like_the_equal_mask_on_xla_and_cudnn(q_len, s_len, causal,
                                                              monkeypatch):
    """Lengths mean "the first n keys" (and, causal, keys up to the query's own
    position): XLA gets the equal boolean mask, cuDNN (the stand-in: its rules, XLA's
    maths) the lengths. A length of 0 is raised to 1 for cuDNN only, so that row is
    left out of the comparison."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(3, n, 2, 8)), jnp.float32)
               for n in (q_len, s_len, s_len))
    lengths = jnp.asarray([s_len, 2, 0], jnp.int32)
    mask = key_lengths.prefix_mask(lengths, s_len)
    if causal:
        mask = mask & jnp.tril(jnp.ones((q_len, s_len), bool))

    def run(mask, implementation, causal=False):
        def loss(q, k, v):
            out = attend(q, k, v, mask, implementation, causal)[:2]
            return (out * jnp.arange(out.size).reshape(out.shape)).sum(), out
        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    want_grads, want = run(mask, "xla")
    got_grads, got = run(lengths, "xla", causal)
    np.testing.assert_array_equal(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_array_equal(g, w)
    calls, kernels = [], []
    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_stand_in(calls, kernels))
    cudnn_grads, cudnn = run(lengths, "cudnn", causal)
    assert calls == ["cudnn"]
    assert kernels == ["padding_causal" if causal else "padding"]
    np.testing.assert_allclose(cudnn, want, atol=1e-5)
    for g, w in zip(cudnn_grads, want_grads, strict=True):
        np.testing.assert_allclose(g[:2], w[:2], atol=1e-4)
    if causal:  # the causal mask matters: without it the outputs differ
        _, plain = run(lengths, "xla")
        assert not np.allclose(plain, want, atol=1e-3)


def test_causal_needs_lengths():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="causal=True takes the mask as int32 key lengths"):
        attend(q, q, q, jnp.ones((1, 1, 4, 4), bool), "xla", causal=True)

"""KV-cached decoding agrees with teacher forcing; greedy, sampling and beam search."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy.special import log_softmax

from cacophony_jax.models import decoding
from cacophony_jax.models.cacophony import Cacophony, cacophony_init_inputs
from cacophony_jax.models.stack import stack_layers
from cacophony_jax.models.variants import cacophony_config
from tests.helpers import cudnn_stand_in

CFG = cacophony_config("tiny")
MAX_LEN = 10
BOS, PAD = CFG.text.bos_id, CFG.text.pad_id


@pytest.fixture(scope="module")
def setup():
    model = Cacophony(CFG)
    params = nn.unbox(jax.jit(model.init)({"params": jax.random.key(0)},
                                          *cacophony_init_inputs(CFG)))["params"]
    # Louder cross-attention so that different audio gives different captions.
    out = params["decoder"]["block_0"]["cross_attn"]["out"]
    out["kernel"] = out["kernel"] * 30.0
    rng = np.random.default_rng(0)
    audio = (rng.normal(size=(3, 10, 64)) * 3).astype(np.float32)
    audio_mask = np.ones((3, 10), np.int32)
    audio_mask[2, 6:] = 0
    return model, params, audio, audio_mask


@functools.cache
def teacher_forced(model):
    """Full-sequence logits [B, T, V] for ids [B, T] (all tokens real)."""

    def run(params, ids, audio, audio_mask):
        ones = np.ones(ids.shape, np.int32)
        states, _ = model.apply({"params": params}, ids, ones, method="encode_text")
        return model.apply({"params": params}, states, ones, audio, audio_mask,
                           method="caption_logits")

    return jax.jit(run)


@pytest.mark.parametrize("scan,fuse_qkv", [(False, False), (True, False), (False, True)])
def test_cached_logits_equal_teacher_forced(setup, scan, fuse_qkv):
    model, params, audio, audio_mask = setup
    if scan:
        model, params = Cacophony(CFG, scan=True), stack_layers(params)
    if fuse_qkv:
        model = Cacophony(CFG, fuse_qkv=True)
    ids = np.random.default_rng(1).integers(3, CFG.text.vocab_size, (3, MAX_LEN)).astype(np.int32)
    ids[:, 0] = BOS
    full = teacher_forced(model)(params, ids, audio, audio_mask)
    step = jax.jit(functools.partial(decoding.decode_step, model))
    cache = decoding.init_cache(model, params, audio, audio_mask, MAX_LEN)
    # A 4-token prefill chunk, then one token at a time.
    chunks = [ids[:, :4]] + [ids[:, t : t + 1] for t in range(4, MAX_LEN)]
    pieces = []
    for chunk in chunks:
        logits, cache = step(params, cache, chunk, audio, audio_mask)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5, rtol=1e-5)


def test_cached_decoding_with_cudnn_attention(setup, monkeypatch):
    """Prefill chunks go to cuDNN with cache-length masks; one-token steps stay on XLA."""
    model, params, audio, audio_mask = setup
    ids = np.random.default_rng(2).integers(3, CFG.text.vocab_size, (3, MAX_LEN)).astype(np.int32)
    ids[:, 0] = BOS
    full = teacher_forced(model)(params, ids, audio, audio_mask)
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_stand_in(calls))
    fused = Cacophony(CFG, attention="cudnn")
    cache = decoding.init_cache(fused, params, audio, audio_mask, MAX_LEN)
    pieces = []
    for chunk in [ids[:, :5]] + [ids[:, t : t + 1] for t in range(5, MAX_LEN)]:
        logits, cache = decoding.decode_step(fused, params, cache, chunk, audio, audio_mask)
        pieces.append(logits)
    assert {"cudnn", "xla"} <= set(calls)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5, rtol=1e-5)


def allowed(logits, t, eos):
    """A caption never holds bos or pad, nor eos as its first token."""
    logits = np.array(logits, np.float64)
    logits[..., [BOS, PAD]] = -np.inf
    if t == 0:
        logits[..., eos] = -np.inf
    return logits


def reference_greedy(model, params, audio, audio_mask, eos):
    """Greedy decoding by re-running teacher forcing over the growing prefix."""
    ids = np.full((audio.shape[0], MAX_LEN), PAD, np.int32)
    ids[:, 0] = BOS
    done = np.zeros(audio.shape[0], bool)
    for t in range(MAX_LEN - 1):
        # Positions after t hold pad; causality keeps them out of position t.
        logits = teacher_forced(model)(params, ids, audio, audio_mask)
        token = np.where(done, PAD, np.argmax(allowed(logits[:, t], t, eos), axis=-1))
        ids[:, t + 1] = token
        done |= token == eos
    return ids


def test_greedy_equals_stepwise_argmax_of_teacher_forced(setup):
    model, params, audio, audio_mask = setup
    ids = decoding.generate(model, params, audio, audio_mask, method="greedy", max_len=MAX_LEN)
    assert ids.shape == (3, MAX_LEN) and ids.dtype == np.int32
    expected = reference_greedy(model, params, audio, audio_mask, CFG.text.eos_id)
    np.testing.assert_array_equal(ids, expected)
    assert len({tuple(row) for row in np.asarray(ids)}) == 3  # the audio matters


def test_eos_stops_a_row(setup):
    model, params, audio, audio_mask = setup
    greedy = np.asarray(decoding.generate(model, params, audio, audio_mask, method="greedy",
                                          max_len=MAX_LEN))
    # Declare row 0's third generated token to be eos: row 0 must stop right there.
    eos = int(greedy[0, 3])
    stopping = Cacophony(dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, eos_id=eos)))
    ids = np.asarray(decoding.generate(stopping, params, audio, audio_mask, method="greedy",
                                       max_len=MAX_LEN))
    expected = greedy.copy()
    for row in expected:
        hits = np.flatnonzero(row[1:] == eos)
        if hits.size:
            row[hits[0] + 2 :] = PAD
    np.testing.assert_array_equal(ids, expected)
    assert (ids[0, 4:] == PAD).all() and ids[0, 3] == eos
    np.testing.assert_array_equal(ids, reference_greedy(stopping, params, audio, audio_mask, eos))


def test_ids_a_tokenizer_cannot_decode_are_never_generated(setup):
    # A tokenizer smaller than the model's vocabulary (rows no text used), and <unk>,
    # <mask>: what greedy, beam and sampling pick first is ruled out, the rest unchanged.
    model, params, audio, audio_mask = setup
    kwargs = {"max_len": MAX_LEN, "rng": jax.random.key(1)}
    for method in ("greedy", "beam", "sample"):
        free = np.asarray(decoding.generate(model, params, audio, audio_mask, method=method,
                                            **kwargs))
        picked = sorted(set(free[:, 1:].ravel()) - {PAD, CFG.text.eos_id})
        limited = np.asarray(decoding.generate(
            model, params, audio, audio_mask, method=method, vocab_size=max(picked),
            banned=picked[:1], **kwargs))
        assert limited[:, 1:].max() < max(picked) and picked[0] not in limited[:, 1:]
    for size in (0, 3, CFG.text.vocab_size + 1):  # nothing left to say, or too many
        with pytest.raises(ValueError, match=f"vocab_size={size} must be at most"):
            decoding.generate(model, params, audio, audio_mask, method="greedy",
                              max_len=MAX_LEN, vocab_size=size)


def test_beam_of_one_and_cold_sampling_equal_greedy(setup):
    model, params, audio, audio_mask = setup
    run = functools.partial(decoding.generate, model, params, audio, audio_mask, max_len=MAX_LEN)
    greedy = run(method="greedy")
    np.testing.assert_array_equal(run(method="beam", beam_size=1), greedy)
    cold = run(method="sample", rng=jax.random.key(3), temperature=1e-6)
    np.testing.assert_array_equal(cold, greedy)
    warm = [run(method="sample", rng=jax.random.key(s), temperature=5.0) for s in (1, 2)]
    assert not np.array_equal(warm[0], warm[1])
    # A raw uint32 key is the same key; per-example keys make rows independent.
    np.testing.assert_array_equal(run(method="sample", rng=jax.random.PRNGKey(1),
                                      temperature=5.0), warm[0])
    rows = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(1), jnp.arange(3))
    np.testing.assert_array_equal(run(method="sample", rng=rows, temperature=5.0), warm[0])
    with pytest.raises(ValueError, match="one key or one per example"):
        run(method="sample", rng=rows[:2], temperature=5.0)


def test_beam_search_matches_exhaustive_two_step_search(setup):
    model, params, audio, audio_mask = setup
    beams, vocab = 4, CFG.text.vocab_size
    ids = decoding.generate(model, params, audio, audio_mask, method="beam", max_len=3,
                            beam_size=beams)
    # Score every [bos, v1] continuation at once: 3 clips x 500 first tokens.
    first = np.stack([np.full(vocab, BOS), np.arange(vocab)], axis=1).astype(np.int32)
    logits = teacher_forced(model)(params, np.tile(first, (3, 1)), np.repeat(audio, vocab, 0),
                                   np.repeat(audio_mask, vocab, 0))
    logits = np.asarray(logits, np.float64)
    logp = np.stack([log_softmax(allowed(logits[:, t], t, CFG.text.eos_id), axis=-1)
                     for t in (0, 1)], axis=1)
    for b in range(3):
        block = logp[b * vocab : (b + 1) * vocab]
        step1 = block[0, 0]  # the same for every row: the prefix is [bos]
        assert np.isneginf(step1[CFG.text.eos_id])  # no empty caption
        kept = np.argsort(-step1)[:beams]  # the first step keeps the best `beams` tokens
        best, best_seq = -np.inf, None
        for v1 in kept:
            if v1 == CFG.text.eos_id:  # a finished beam keeps its score
                cand, seq = step1[v1], (v1, PAD)
            else:
                v2 = int(np.argmax(block[v1, 1]))
                cand, seq = step1[v1] + block[v1, 1, v2], (v1, v2)
            if cand > best:
                best, best_seq = cand, seq
        np.testing.assert_array_equal(ids[b], [BOS, *best_seq])


def test_jit_once_per_shape_and_clear_errors(setup):
    model, params, audio, audio_mask = setup
    run = functools.partial(decoding.generate, model, params, audio, audio_mask, max_len=MAX_LEN)
    run(method="greedy")
    size = decoding._generate._cache_size()
    run(method="greedy")
    run(method="greedy", temperature=0.5)  # a traced argument: no new compilation
    assert decoding._generate._cache_size() == size
    with pytest.raises(ValueError, match="unknown decoding method 'nucleus'"):
        run(method="nucleus")
    with pytest.raises(ValueError, match="needs rng"):
        run(method="sample")
    with pytest.raises(ValueError, match="max_len=41"):
        decoding.generate(model, params, audio, audio_mask, method="greedy", max_len=41)
    with pytest.raises(ValueError, match="length_penalty must be between 0 .* got -0.5"):
        run(method="beam", length_penalty=-0.5)

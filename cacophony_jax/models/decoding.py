"""Autoregressive captioning with a KV cache: greedy, sampling and beam search.

The cache is Flax's 'cache' collection: per layer of the causal text tower and
of the decoder, the keys/values of past tokens plus a write index; the decoder's
cross-attention keeps the audio keys/values computed once by ``init_cache``.
Everything runs inside one jit per (model, batch, audio length, max_len, method,
beam size) with static shapes; a row that emits eos is padded from then on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Params = Any
Cache = Any
METHODS = ("greedy", "sample", "beam")


# How the command line names each decoding option (for `check_options`' messages).
FLAG_NAMES = {"method": "--method", "max_len": "--max-len", "beam_size": "--beam-size",
              "temperature": "--temperature", "length_penalty": "--length-penalty"}


def check_options(max_positions: int, method: str, max_len: int, temperature: float,
                  beam_size: int, names: dict[str, str] | None = None,
                  length_penalty: float = 0.0) -> None:
    """Raises ValueError for options `generate` cannot use, before any decoding.

    Args:
      max_positions: the text tower's position table (the longest caption).
      method, max_len, temperature, beam_size, length_penalty: as `generate` takes them.
      names: how the message names each option (e.g. {"max_len": "--max-len"}).
    """
    name = lambda key: (names or {}).get(key, key)
    if method not in METHODS:
        raise ValueError(f"unknown decoding {name('method')} {method!r}; use one of {METHODS}")
    if not 2 <= max_len <= max_positions:
        raise ValueError(f"{name('max_len')}={max_len} must be in [2, {max_positions}] "
                         "(the text tower's position table)")
    if method == "sample" and not 0 < temperature < math.inf:
        raise ValueError(f"{name('temperature')} must be a number > 0, got {temperature}")
    if method == "beam" and beam_size < 1:
        raise ValueError(f"{name('beam_size')} must be >= 1, got {beam_size}")
    if method == "beam" and not 0 <= length_penalty <= 10:
        raise ValueError(f"{name('length_penalty')} must be between 0 (rank beams by summed "
                         f"log-probability) and 10, got {length_penalty}; 1 ranks by the "
                         "mean per token, which favours longer captions")


def init_cache(
    model: nn.Module, params: Params, audio_states: jax.Array, audio_mask: jax.Array, max_len: int
) -> Cache:
    """Creates an empty cache for ``max_len`` tokens and stores the audio keys/values.

    Args:
      model: a ``Cacophony`` module.
      params: its parameters.
      audio_states: [B, N, D] from ``encode_audio``.
      audio_mask: [B, N].
      max_len: the most tokens that will be fed.

    Returns:
      The 'cache' collection.
    """
    ids = jnp.zeros((audio_states.shape[0], max_len), jnp.int32)
    _, variables = model.apply({"params": params}, ids, audio_states, audio_mask,
                               method="decode", mutable=["cache"])
    return variables["cache"]


def decode_step(
    model: nn.Module,
    params: Params,
    cache: Cache,
    ids: jax.Array,
    audio_states: jax.Array,
    audio_mask: jax.Array,
) -> tuple[jax.Array, Cache]:
    """Feeds the next chunk of tokens through the cached towers.

    Args:
      model: a ``Cacophony`` module.
      params: its parameters.
      cache: from ``init_cache`` or the previous step.
      ids: [B, C] next tokens (C = 1 when stepping).
      audio_states: [B, N, D]; audio_mask: [B, N].

    Returns:
      (logits [B, C, vocab] float32, updated cache).
    """
    logits, variables = model.apply({"params": params, "cache": cache}, ids, audio_states,
                                    audio_mask, method="decode", mutable=["cache"])
    return logits, variables["cache"]


def reorder_cache(cache: Cache, rows: jax.Array) -> Cache:
    """Gathers cache rows (beam reordering); write indices are shared and kept.

    Args:
      cache: the 'cache' collection; key/value leaves are [..., B, S, heads, head_dim]
        (a leading layer axis when scanned).
      rows: [B] int source row of each new row.

    Returns:
      The reordered cache.
    """
    def gather(leaf: jax.Array) -> jax.Array:
        if leaf.ndim < 4:
            return leaf
        return jnp.take(leaf, rows, axis=leaf.ndim - 4)

    return jax.tree.map(gather, cache)


def generate(
    model: nn.Module,
    params: Params,
    audio_states: jax.Array,
    audio_mask: jax.Array,
    *,
    method: str,
    max_len: int,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    beam_size: int = 4,
    length_penalty: float = 0.0,
    vocab_size: int | None = None,
    banned: Sequence[int] = (),
) -> jax.Array:
    """Generates captions for a batch of audio.

    Args:
      model: a ``Cacophony`` module.
      params: its parameters.
      audio_states: [B, N, D] from ``encode_audio``.
      audio_mask: [B, N].
      method: "greedy", "sample" (categorical at ``temperature``; needs ``rng``) or
        "beam" (``beam_size`` beams; ranking divides the summed log-probability by
        length ** ``length_penalty``, the length counting tokens up to eos).
      max_len: output length, bos included.
      rng: PRNG key for sampling: one key, or one per example ([B] keys) so that an
        example's draws do not depend on the others in its batch.
      temperature: sampling temperature (> 0).
      beam_size: beams per example.
      length_penalty: beam length-normalisation exponent (0 = plain log-probability).
      vocab_size: the tokenizer's size when it is smaller than the model's vocabulary:
        ids from it on (rows no text ever used) are never generated.
      banned: ids never generated either (`Tokenizer.never_generated`: <unk>, <mask>),
        as well as bos and pad anywhere and eos first.

    Returns:
      int32 [B, max_len]: bos, tokens, eos, then pad.
    """
    check_options(model.config.text.max_positions, method, max_len, temperature, beam_size,
                  length_penalty=length_penalty)
    if method == "sample" and rng is None:
        raise ValueError("method='sample' needs rng=jax.random.key(seed)")
    rng = jax.random.key(0) if rng is None else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # a raw uint32 key, e.g. jax.random.PRNGKey
    if rng.shape not in ((), (audio_states.shape[0],)):
        raise ValueError(f"rng must be one key or one per example ({audio_states.shape[0]}), "
                         f"got keys of shape {rng.shape}")
    text = model.config.text
    usable = text.vocab_size if vocab_size is None else int(vocab_size)
    never = {text.bos_id, text.pad_id, text.eos_id, *banned}
    if not usable <= text.vocab_size or usable <= sum(0 <= i < usable for i in never):
        raise ValueError(f"vocab_size={vocab_size} must be at most the model's "
                         f"{text.vocab_size} and leave a token that is not special or "
                         f"banned ({sorted(never)})")
    return _generate(model, params, audio_states, audio_mask, rng, jnp.float32(temperature),
                     jnp.float32(length_penalty), method=method, max_len=max_len,
                     beam_size=beam_size if method == "beam" else 1, usable=usable,
                     banned=tuple(sorted({int(i) for i in banned})))


def _allowed(logits: jax.Array, t: jax.Array, text: Any, usable: int,
             banned: tuple[int, ...]) -> jax.Array:
    """`logits` [..., vocab] of the token after position `t`, with the tokens a caption
    never holds there ruled out: bos and pad anywhere, eos first (an empty caption,
    which beam search, scoring plain log-probabilities, would otherwise often pick),
    ids from `usable` on and `banned` ones."""
    vocab = jnp.arange(logits.shape[-1])
    never = (vocab == text.bos_id) | (vocab == text.pad_id) | ((vocab == text.eos_id) & (t == 0))
    never |= vocab >= usable
    for token in banned:
        never |= vocab == token
    return jnp.where(never, -jnp.inf, logits)


@functools.partial(jax.jit, static_argnames=("model", "method", "max_len", "beam_size",
                                             "usable", "banned"))
def _generate(model, params, audio_states, audio_mask, rng, temperature, length_penalty, *,
              method, max_len, beam_size, usable, banned):
    if method == "beam":
        return _beam(model, params, audio_states, audio_mask, length_penalty, max_len, beam_size,
                     usable, banned)
    text = model.config.text
    batch = audio_states.shape[0]
    if rng.ndim == 0:  # one key: a key per row from it
        rng = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(batch))
    cache = init_cache(model, params, audio_states, audio_mask, max_len)
    ids = jnp.full((batch, max_len), text.pad_id, jnp.int32).at[:, 0].set(text.bos_id)
    done = jnp.zeros((batch,), bool)

    def draw(key, t, logits):
        return jax.random.categorical(jax.random.fold_in(key, t), logits / temperature)

    def cond(state):
        t, _, done, _ = state
        return (t < max_len - 1) & ~jnp.all(done)

    def body(state):
        t, ids, done, cache = state
        logits, cache = decode_step(model, params, cache, ids[:, t, None], audio_states,
                                    audio_mask)
        logits = _allowed(logits[:, 0], t, text, usable, banned)
        if method == "greedy":
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.vmap(draw, (0, None, 0))(rng, t, logits)
        token = jnp.where(done, text.pad_id, token).astype(jnp.int32)
        ids = jax.lax.dynamic_update_slice(ids, token[:, None], (0, t + 1))
        return t + 1, ids, done | (token == text.eos_id), cache

    _, ids, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), ids, done, cache))
    return ids


def _beam(model, params, audio_states, audio_mask, length_penalty, max_len, beams, usable,
          banned):
    text = model.config.text
    batch = audio_states.shape[0]
    flat_states = jnp.repeat(audio_states, beams, axis=0)  # row b * beams + k
    flat_mask = jnp.repeat(audio_mask, beams, axis=0)
    cache = init_cache(model, params, flat_states, flat_mask, max_len)
    seqs = jnp.full((batch, beams, max_len), text.pad_id, jnp.int32).at[:, :, 0].set(text.bos_id)
    # Only beam 0 is alive at first, so the first step does not pick duplicates.
    scores = jnp.full((batch, beams), -jnp.inf).at[:, 0].set(0.0)
    done = jnp.zeros((batch, beams), bool)
    lengths = jnp.zeros((batch, beams), jnp.int32)

    def norm(score, length):
        return score / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty

    def cond(state):
        t, _, _, done, _, _ = state
        return (t < max_len - 1) & ~jnp.all(done)

    def body(state):
        t, seqs, scores, done, lengths, cache = state
        logits, cache = decode_step(model, params, cache, seqs[:, :, t].reshape(-1, 1),
                                    flat_states, flat_mask)
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(_allowed(logits[:, 0], t, text, usable, banned)).reshape(
            batch, beams, vocab)
        # A finished beam only continues with pad, at no cost, so it keeps its score.
        pad_only = jnp.where(jnp.arange(vocab) == text.pad_id, 0.0, -jnp.inf)
        logp = jnp.where(done[..., None], pad_only, logp)
        candidates = scores[..., None] + logp
        cand_len = jnp.where(done, lengths, t + 1)[..., None]
        rank = norm(candidates, cand_len).reshape(batch, beams * vocab)
        _, best = jax.lax.top_k(rank, beams)
        src, token = best // vocab, (best % vocab).astype(jnp.int32)
        take = lambda a: jnp.take_along_axis(a, src, axis=1)
        scores = jnp.take_along_axis(candidates.reshape(batch, -1), best, axis=1)
        was_done = take(done)
        lengths = jnp.where(was_done, take(lengths), t + 1)
        done = was_done | (token == text.eos_id)
        seqs = jnp.take_along_axis(seqs, src[..., None], axis=1)
        seqs = jax.lax.dynamic_update_slice(seqs, token[..., None], (0, 0, t + 1))
        rows = (jnp.arange(batch)[:, None] * beams + src).reshape(-1)
        return t + 1, seqs, scores, done, lengths, reorder_cache(cache, rows)

    state = (jnp.int32(0), seqs, scores, done, lengths, cache)
    _, seqs, scores, _, lengths, _ = jax.lax.while_loop(cond, body, state)
    best = jnp.argmax(norm(scores, lengths), axis=1)
    return jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]

"""Hugging Face RoBERTa weights load into the text tower and compute what they dictate."""

import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from cacophony_jax.convert.roberta import RobertaCheckpointError, load_roberta_text_tower
from cacophony_jax.models.text import TextEncoder
from cacophony_jax.models.variants import TextConfig

CFG = TextConfig(vocab_size=50, hidden=16, layers=2, heads=2, mlp=32, max_positions=20)


def hf_weights(seed: int = 0, prefix: str = "roberta.") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, m = CFG.hidden, CFG.mlp
    w = lambda *shape: (rng.normal(size=shape) * 0.3).astype(np.float32)
    t = {
        "embeddings.word_embeddings.weight": w(CFG.vocab_size, h),
        "embeddings.position_embeddings.weight": w(CFG.max_positions, h),
        "embeddings.token_type_embeddings.weight": w(1, h),
        "embeddings.LayerNorm.weight": 1 + w(h), "embeddings.LayerNorm.bias": w(h),
        "pooler.dense.weight": w(h, h), "pooler.dense.bias": w(h),  # ignored
    }
    for i in range(CFG.layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            t[p + name + ".weight"], t[p + name + ".bias"] = w(h, h), w(h)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = w(m, h), w(m)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = w(h, m), w(h)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = 1 + w(h), w(h)
    out = {prefix + k: v for k, v in t.items()}
    out["lm_head.bias"] = w(CFG.vocab_size)  # ignored
    return out


def numpy_roberta(t: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Causal RoBERTa forward written from the torch-layout weights ([out, in])."""
    eps, heads = CFG.layer_norm_eps, CFG.heads

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

    def linear(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    e = "roberta.embeddings."
    x = (t[e + "word_embeddings.weight"][ids] + t[e + "position_embeddings.weight"][:ids.shape[1]]
         + t[e + "token_type_embeddings.weight"][0])
    x = ln(x.astype(np.float64), e + "LayerNorm")
    length = ids.shape[1]
    allowed = np.tril(np.ones((length, length), bool))[None] & (mask[:, None, :] > 0)
    for i in range(CFG.layers):
        p = f"roberta.encoder.layer.{i}."
        split = lambda y: y.reshape(*y.shape[:2], heads, -1)
        q, k, v = (split(linear(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(allowed[:, None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        a = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        x = ln(x + linear(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        hdn = linear(x, p + "intermediate.dense")
        hdn = 0.5 * hdn * (1 + erf(hdn / np.sqrt(2)))
        x = ln(x + linear(hdn, p + "output.dense"), p + "output.LayerNorm")
    return x


@pytest.mark.parametrize("scan", [False, True])
def test_loaded_tower_reproduces_the_checkpoint(tmp_path, scan):
    weights = hf_weights()
    save_file(weights, str(tmp_path / "model.safetensors"))
    tower = load_roberta_text_tower(tmp_path, CFG, scan=scan)
    np.testing.assert_array_equal(tower["token_embed"]["embedding"],
                                  weights["roberta.embeddings.word_embeddings.weight"])
    query = tower["blocks"]["attn"]["query"]["kernel"][1] if scan else \
        tower["block_1"]["attn"]["query"]["kernel"]
    np.testing.assert_array_equal(
        query.reshape(16, 16), weights["roberta.encoder.layer.1.attention.self.query.weight"].T)
    ids = np.array([[0, 5, 9, 33, 2, 1], [0, 7, 2, 1, 1, 1]], np.int32)
    mask = (ids != 1).astype(np.int32)
    states = TextEncoder(CFG, scan=scan).apply({"params": tower}, ids, mask)
    expected = numpy_roberta(weights, ids, mask)
    np.testing.assert_allclose(np.asarray(states), expected, atol=2e-5, rtol=2e-5)


def test_keys_without_model_prefix_load_the_same(tmp_path):
    save_file(hf_weights(), str(tmp_path / "a.safetensors"))
    save_file(hf_weights(prefix=""), str(tmp_path / "b.safetensors"))
    a = load_roberta_text_tower(tmp_path / "a.safetensors", CFG)
    b = load_roberta_text_tower(tmp_path / "b.safetensors", CFG)
    np.testing.assert_array_equal(a["block_0"]["mlp"]["wo"]["kernel"],
                                  b["block_0"]["mlp"]["wo"]["kernel"])


def test_missing_and_misshaped_keys_are_listed(tmp_path):
    weights = hf_weights()
    del weights["roberta.encoder.layer.1.output.dense.bias"]
    weights["roberta.embeddings.position_embeddings.weight"] = np.zeros((514, 16), np.float32)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(RobertaCheckpointError) as info:
        load_roberta_text_tower(tmp_path / "model.safetensors", CFG)
    message = str(info.value)
    assert "missing: ['roberta.encoder.layer.1.output.dense.bias']" in message
    assert "roberta.embeddings.position_embeddings.weight (514, 16) (expected (20, 16))" in message


def test_bad_paths_and_layer_counts(tmp_path):
    with pytest.raises(RobertaCheckpointError, match="does not exist"):
        load_roberta_text_tower(tmp_path / "missing.safetensors", CFG)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RobertaCheckpointError, match="not a readable safetensors file"):
        load_roberta_text_tower(tmp_path, CFG)
    save_file(hf_weights(), str(tmp_path / "two.safetensors"))
    one_layer = TextConfig(vocab_size=50, hidden=16, layers=1, heads=2, mlp=32, max_positions=20)
    with pytest.raises(RobertaCheckpointError, match="has 2 layers but text_config.layers=1"):
        load_roberta_text_tower(tmp_path / "two.safetensors", one_layer)

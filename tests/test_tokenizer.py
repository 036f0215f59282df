"""Tokenizer: training, save/load, RoBERTa files, fixed-length encoding, decoding."""

import json
import pickle

import numpy as np
import pytest

from cacophony_jax.data.tokenizer import Tokenizer, TokenizerError

CORPUS = [
    "a dog barks in the distance",
    "rain falls on a tin roof",
    "the dog is barking while cars pass by",
    "birds chirp and a man speaks",
    "water runs from a tap into a sink",
] * 4


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, vocab_size=320)


def _write_roberta_files(folder, vocab):
    # A hand-made vocabulary: "ab ab" -> ["ab", "Ġab"] with the two merges below.
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\na b\nĠ ab\n")


HAND_VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6,
              "Ġ": 7, "Ġab": 8}


def test_trained_special_ids(trained):
    backend = trained.backend
    assert [backend.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [
        0, 1, 2, 3, 4]
    assert (trained.bos_id, trained.pad_id, trained.eos_id) == (0, 1, 2)
    assert 261 <= trained.vocab_size <= 320


def test_encode_layout_and_roundtrip(trained):
    texts = ["a dog barks", "Rain, falls! Ünïcode 你好"]
    ids, mask = trained.encode(texts, 32)
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == mask.dtype == np.int32
    for row, m in zip(ids, mask, strict=True):
        n = int(m.sum())
        assert row[0] == 0 and row[n - 1] == 2
        assert np.all(row[n:] == 1) and np.all(m[:n] == 1) and np.all(m[n:] == 0)
        assert 2 not in row[1 : n - 1].tolist()
    assert trained.decode(ids) == texts


def test_what_is_not_text_is_named(trained):
    for bad, what in ((["ok", "a\udcffb"], "text 1 holds a lone surrogate"),
                      (["ok", 5], "text 1 is int 5, not a string")):
        with pytest.raises(TokenizerError, match=f"encode: {what}"):
            trained.encode(bad, 8)
        with pytest.raises(TokenizerError, match=f"token_counts: {what}"):
            trained.token_counts(bad)
        with pytest.raises(TokenizerError, match=f"train_bpe: {what}"):
            Tokenizer.train_bpe(bad, 300)
    assert trained.never_generated == (3, 4)  # <unk>, <mask>


def test_empty_and_truncation(trained):
    ids, mask = trained.encode(["", "the dog is barking while cars pass by " * 5], 8)
    assert ids[0].tolist() == [0, 2, 1, 1, 1, 1, 1, 1]
    assert mask[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert ids[1, 0] == 0 and ids[1, -1] == 2 and mask[1].sum() == 8
    full, _ = trained.encode(["the dog is barking while cars pass by " * 5], 200)
    assert ids[1, 1:7].tolist() == full[0, 1:7].tolist()
    # Training captions that are cut carry no eos: the row is bos and 7 tokens. Ones
    # that fit are encoded the same either way.
    cut, cut_mask = trained.encode(["a dog", "the dog is barking while cars pass by " * 5], 8,
                                   eos_when_cut=False)
    assert cut[1].tolist() == [0, *full[0, 1:8].tolist()] and cut_mask[1].sum() == 8
    assert 2 not in cut[1].tolist()
    fits, fits_mask = trained.encode(["a dog"], 8)
    assert cut[0].tolist() == fits[0].tolist() and cut_mask[0].tolist() == fits_mask[0].tolist()
    with pytest.raises(TokenizerError, match="at least 2"):
        trained.encode(["x"], 1)
    # token_counts says which texts a length cuts.
    counts = trained.token_counts(["", "a dog", "the dog is barking while cars pass by " * 5])
    assert counts[0] == 0 and counts[1] == int(fits_mask[0].sum()) - 2
    assert counts[2] == int((full[0] > 2).sum()) > 6
    # encode_with_counts: both from one tokenisation.
    texts = ["", "a dog", "the dog is barking while cars pass by " * 5]
    ids, mask, same = trained.encode_with_counts(texts, 8)
    assert same.tolist() == counts.tolist()
    assert mask.sum(1).tolist() == [min(n, 6) + 2 for n in counts]  # bos, tokens, eos


def test_decode_stops_at_first_eos(trained):
    ids, mask = trained.encode(["a dog", "rain"], 8)
    first = ids[0, : int(mask[0].sum())]  # bos, "a dog", eos
    rest = ids[1, 1 : int(mask[1].sum())]  # "rain", eos
    row = np.concatenate([first, rest, [1, 1]])
    assert trained.decode(row) == ["a dog"]
    other = np.ones_like(row)
    other[:8] = ids[1]
    assert trained.decode(np.stack([row, other])) == ["a dog", "rain"]


def test_literal_special_text_is_ordinary(trained):
    ids, mask = trained.encode(["a </s> b"], 40)
    n = int(mask.sum())
    assert 2 not in ids[0, 1 : n - 1].tolist()
    assert trained.decode(ids) == ["a </s> b"]


def test_save_load_roundtrip(trained, tmp_path):
    path = trained.save(tmp_path)
    assert path.endswith("tokenizer.json")
    for where in (tmp_path, tmp_path / "tokenizer.json"):
        again = Tokenizer.load(where)
        a, _ = trained.encode(CORPUS[:5], 16)
        b, _ = again.encode(CORPUS[:5], 16)
        np.testing.assert_array_equal(a, b)
        assert again.fingerprint == trained.fingerprint
    clone = pickle.loads(pickle.dumps(trained))
    np.testing.assert_array_equal(clone.encode(["a </s>"], 9)[0], trained.encode(["a </s>"], 9)[0])


def test_roberta_files(tmp_path):
    _write_roberta_files(tmp_path, HAND_VOCAB)
    tok = Tokenizer.load(tmp_path)
    ids, mask = tok.encode(["ab ab", "ab"], 6)
    assert ids.tolist() == [[0, 6, 8, 2, 1, 1], [0, 6, 2, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert tok.decode(ids) == ["ab ab", "ab"]
    assert tok.vocab_size == len(HAND_VOCAB)


def test_roberta_files_that_do_not_match(tmp_path):
    # A merge whose result this vocab.json lacks makes the Rust loader panic (a
    # BaseException, not an Exception): still one TokenizerError naming the files.
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match="cannot read RoBERTa files"):
        Tokenizer.load(tmp_path)


def test_fingerprint_tracks_vocabulary(tmp_path, trained):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _write_roberta_files(a, HAND_VOCAB)
    _write_roberta_files(b, {**HAND_VOCAB, "bb": 9})
    fa, fb = Tokenizer.load(a).fingerprint, Tokenizer.load(b).fingerprint
    assert len(fa) == 16 and fa != fb and fa != trained.fingerprint
    assert Tokenizer.load(a).fingerprint == fa


def test_wrong_special_ids(tmp_path):
    swapped = {**HAND_VOCAB, "<s>": 1, "<pad>": 0}
    _write_roberta_files(tmp_path, swapped)
    with pytest.raises(TokenizerError, match="<s>=0, <pad>=1, </s>=2"):
        Tokenizer.load(tmp_path)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match="neither tokenizer.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
        Tokenizer.load(bad)
    with pytest.raises(TokenizerError, match="at least 261"):
        Tokenizer.train_bpe(CORPUS, vocab_size=100)

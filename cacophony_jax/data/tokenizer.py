"""Byte-level BPE tokenizer with RoBERTa conventions (bos 0, pad 1, eos 2).

`Tokenizer` wraps a Rust `tokenizers.Tokenizer` and turns batches of captions into
the fixed-length `text_ids` / `text_mask` arrays of the batch contract:
``<s> tokens </s> <pad> ...``. It loads a `tokenizer.json` or RoBERTa's
`vocab.json` + `merges.txt`, can train a fresh vocabulary, and exposes a
`fingerprint` so a model bundle can detect that it is paired with the wrong
vocabulary.

Text that happens to contain a special token's spelling (``"</s>"``) is encoded as
ordinary characters: a caption can never smuggle an eos into the middle of a
sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from cacophony_jax.data.spec import BOS_ID, EOS_ID, PAD_ID

# Special tokens in id order; the first three ids are fixed by the batch contract.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
_REQUIRED = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID}
_JSON_NAME = "tokenizer.json"

# Control characters, line separators and the replacement character a byte-level
# tokenizer gives for a cut UTF-8 sequence: never wanted in a caption.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ufffd]+")


def printable(text: str) -> str:
    """A generated caption without control characters or U+FFFD, spaces collapsed."""
    return " ".join(_UNPRINTABLE.sub(" ", text).split())


def cut_caption(text: str) -> str:
    """A caption cut at its length limit, printable and ending at its last whole word:
    the last word goes (a cut may have split it, maybe into U+FFFD), unless nothing
    printable comes before it, as a one-word caption keeps its word."""
    words = text.rstrip().rsplit(None, 1)
    return (printable(words[0]) if len(words) == 2 else "") or printable(text)


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or has the wrong special ids."""


def _check_text(text: Any, where: str) -> str:
    """`text` if it is a string UTF-8 can hold, else TokenizerError naming it."""
    if not isinstance(text, str):
        raise TokenizerError(f"{where} is {type(text).__name__} {text!r:.60}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenizerError(f"{where} holds a lone surrogate ({ascii(text):.60}), which is "
                             "not text: decode the bytes it came from as UTF-8 (or replace "
                             "such characters) first") from None
    return text


class Tokenizer:
    """Captions <-> fixed-length id arrays (bos, tokens, eos, pad...)."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>"):
        """Wraps a `tokenizers.Tokenizer` after checking its special ids.

        Args:
          backend: a byte-level BPE `tokenizers.Tokenizer`.
          source: where it came from, used in error messages.
        """
        for token, want in _REQUIRED.items():
            got = backend.token_to_id(token)
            if got != want:
                raise TokenizerError(
                    f"tokenizer {source} maps {token!r} to {got}, but this project needs "
                    f"<s>=0, <pad>=1, </s>=2 (RoBERTa conventions); use a RoBERTa-style "
                    f"vocabulary or train one with Tokenizer.train_bpe"
                )
        # Why: captions are free text; a literal "</s>" must not become an eos id.
        backend.encode_special_tokens = True
        # Truncation and padding are done here, not by the backend.
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._fingerprint = _fingerprint(backend)

    # Why: the Rust object's own pickling drops `encode_special_tokens`, and pipeline
    # workers receive the tokenizer pickled.
    def __getstate__(self) -> dict:
        return {"json": self._backend.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), "<pickled>")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a tokenizer.json file, or a folder with tokenizer.json or vocab.json+merges.txt.

        Args:
          path: a `tokenizer.json` file, or a folder holding one, or a folder holding
            RoBERTa's `vocab.json` and `merges.txt`.

        Returns:
          The tokenizer.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            json_path = os.path.join(path, _JSON_NAME)
            vocab = os.path.join(path, "vocab.json")
            merges = os.path.join(path, "merges.txt")
            if os.path.isfile(json_path):
                return cls(_from_json(json_path), json_path)
            if os.path.isfile(vocab) and os.path.isfile(merges):
                return cls(_from_vocab_merges(vocab, merges), path)
            raise TokenizerError(
                f"tokenizer folder {path} holds neither {_JSON_NAME} nor vocab.json + "
                f"merges.txt; point at a folder with one of them (or train one with "
                f"Tokenizer.train_bpe and save it)"
            )
        if os.path.isfile(path):
            return cls(_from_json(path), path)
        raise TokenizerError(
            f"tokenizer path {path} does not exist; give a {_JSON_NAME} file or a folder "
            f"with {_JSON_NAME} or vocab.json + merges.txt"
        )

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Trains a byte-level BPE vocabulary with RoBERTa's special tokens.

        Args:
          texts: training text, one caption per item.
          vocab_size: the largest vocabulary size (specials and 256 bytes included);
            small corpora may stop short of it.

        Returns:
          A tokenizer with <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
        """
        smallest = len(SPECIAL_TOKENS) + 256
        if vocab_size < smallest:
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small for byte-level BPE; use at least "
                f"{smallest} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        backend = _empty_byte_level()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(
            (_check_text(text, f"train_bpe: text {index}")
             for index, text in enumerate(texts)), trainer)
        return cls(backend, "<trained>")

    def save(self, path: str | os.PathLike) -> str:
        """Writes tokenizer.json.

        Args:
          path: a file name, or an existing folder to write `tokenizer.json` into.

        Returns:
          The path of the written file.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, _JSON_NAME)
        tmp = f"{path}.tmp-{os.getpid()}"
        self._backend.save(tmp)
        os.replace(tmp, path)  # Why: a reader never sees a half-written file.
        return path

    def encode(self, texts: Sequence[str], length: int,
               eos_when_cut: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Encodes captions as bos, tokens, eos, pad... of a fixed length.

        Args:
          texts: B captions; an empty caption gives [bos, eos].
          length: T, the sequence length (>= 2); longer captions are cut so that the
            sequence still starts with bos and ends with eos.
          eos_when_cut: False: a caption that is cut fills the row with its tokens and
            has no eos. Training captions are encoded so, or the captioning decoder
            would learn to end a caption where it was cut, mid-phrase.

        Returns:
          ids int32 [B, T] and mask int32 [B, T] (1 on bos, tokens and eos).
        """
        ids, mask, _ = self.encode_with_counts(texts, length, eos_when_cut)
        return ids, mask

    def encode_with_counts(self, texts: Sequence[str], length: int, eos_when_cut: bool = True
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`encode`, plus each text's `token_counts` (from the same tokenisation)."""
        if length < 2:
            raise TokenizerError(f"encode length must be at least 2 (bos + eos), got {length}")
        if isinstance(texts, str):
            raise TokenizerError("encode takes a sequence of captions, not one string")
        texts = list(texts)
        ids = np.full((len(texts), length), PAD_ID, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        if not texts:
            return ids, mask, np.zeros((0,), np.int64)
        room = length - 2
        encodings = self._encode_batch(texts, "encode")
        counts = np.asarray([len(e.ids) for e in encodings], np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, 0] = BOS_ID
            mask[row] = 1
            if len(encoding.ids) > room and not eos_when_cut:
                ids[row, 1:] = encoding.ids[:length - 1]
                continue
            tokens = encoding.ids[:room]
            n = len(tokens)
            ids[row, 1 : n + 1] = tokens
            ids[row, n + 1] = EOS_ID
            mask[row, n + 2:] = 0
        return ids, mask, counts

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """How many tokens each text takes, bos and eos not counted: a text fits
        `encode(..., length)` uncut when its count is at most ``length - 2``.

        Args:
          texts: N texts.

        Returns:
          int64 [N].
        """
        if isinstance(texts, str):
            raise TokenizerError("token_counts takes a sequence of texts, not one string")
        encodings = self._encode_batch(list(texts), "token_counts")
        return np.asarray([len(e.ids) for e in encodings], np.int64)

    def _encode_batch(self, texts: list[str], what: str) -> list[Any]:
        try:
            return self._backend.encode_batch_fast(texts, add_special_tokens=False)
        except (TypeError, UnicodeEncodeError):
            for index, text in enumerate(texts):
                _check_text(text, f"{what}: text {index}")
            raise

    def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """Turns id rows back into text, stopping at the first eos and skipping specials.

        Args:
          ids: int [B, T] (a single row [T] is treated as a batch of one).

        Returns:
          B strings.
        """
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise TokenizerError(f"decode takes ids of shape [B, T], got {ids.shape}")
        rows = []
        for row in ids.tolist():
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            rows.append(row)
        return self._backend.decode_batch(rows, skip_special_tokens=True)

    def captions(self, ids: np.ndarray) -> list[str]:
        """Generated id rows [B, T] -> the captions as shown: decoded, `printable`, and a
        row that reached T without eos (cut, maybe inside a word) ends at its last whole
        word (`cut_caption`). Training's evaluation and `inference` both use this."""
        ids = np.asarray(ids)
        texts = self.decode(ids)
        cut = ~np.any(ids.reshape(len(texts), -1) == EOS_ID, axis=1)
        return [cut_caption(text) if was_cut else printable(text)
                for text, was_cut in zip(texts, cut, strict=True)]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def never_generated(self) -> tuple[int, ...]:
        """Ids of the special tokens no caption holds and decoding never emits (<unk>,
        <mask>: byte-level BPE never needs <unk>, and decoding skips both)."""
        ids = (self._backend.token_to_id(token) for token in ("<unk>", "<mask>"))
        return tuple(i for i in ids if i is not None)

    @property
    def bos_id(self) -> int:
        """Id of <s>."""
        return BOS_ID

    @property
    def pad_id(self) -> int:
        """Id of <pad>."""
        return PAD_ID

    @property
    def eos_id(self) -> int:
        """Id of </s>."""
        return EOS_ID

    @property
    def fingerprint(self) -> str:
        """Short stable hash of the vocabulary and merges (16 hex digits)."""
        return self._fingerprint

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped Rust tokenizer."""
        return self._backend


def _empty_byte_level(model: models.Model | None = None) -> tokenizers.Tokenizer:
    # RoBERTa conventions: no prefix space, GPT-2 byte alphabet, byte-level decoding.
    backend = tokenizers.Tokenizer(model if model is not None else models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _reraise_unless_rust(error: BaseException) -> None:
    """Re-raises `error` unless the Rust loader raised it: a plain Exception, or a
    pyo3 PanicException (a BaseException), as BPE.from_file gives for some merges.txt
    whose merged tokens vocab.json lacks."""
    if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
        raise error


def _from_json(path: str) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(path)
    except BaseException as error:
        _reraise_unless_rust(error)
        raise TokenizerError(
            f"cannot read tokenizer file {path} ({error}); it must be a tokenizer.json "
            f"written by the `tokenizers` library or by Tokenizer.save"
        ) from None


def _from_vocab_merges(vocab: str, merges: str) -> tokenizers.Tokenizer:
    try:
        backend = _empty_byte_level(models.BPE.from_file(vocab, merges))
    except BaseException as error:
        _reraise_unless_rust(error)
        raise TokenizerError(
            f"cannot read RoBERTa files {vocab} and {merges} ({error}); vocab.json must map "
            f"token -> id and merges.txt hold one 'a b' merge per line, whose tokens and "
            f"merged token vocab.json has (the two files of one model)"
        ) from None
    # Mark the specials the vocabulary already has (never add new ids to it).
    present = [token for token in SPECIAL_TOKENS if backend.token_to_id(token) is not None]
    backend.add_special_tokens(present)
    return backend


def _fingerprint(backend: tokenizers.Tokenizer) -> str:
    vocab = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    merges = json.loads(backend.to_str()).get("model", {}).get("merges", [])
    # Merges are "a b" strings in older files and [a, b] pairs in newer ones.
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    digest = hashlib.sha256(json.dumps([vocab, merges], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]

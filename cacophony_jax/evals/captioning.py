"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D (COCO caption evaluation); class mentions.

Numbers follow the formulas of the COCO caption evaluation code (the one DCASE and
AudioCaps papers report), re-implemented in numpy/Python:

* BLEU-n: corpus-level modified n-gram precision (candidate counts clipped by the
  largest count in any one reference), geometric mean over 1..n, brevity penalty
  exp(1 - r/c) when the total candidate length c is below the total reference length r,
  where each candidate takes the reference length closest to its own (ties: shorter).
* ROUGE-L: per candidate, LCS precision and recall against every reference, the
  maxima over references combined as F = (1 + b^2) P R / (R + b^2 P) with b = 1.2;
  averaged over candidates.
* CIDEr-D: n-grams 1..4 weighted by TF-IDF with document frequencies taken over the
  reference sets of the evaluated items; candidate TF-IDF values clipped by the
  reference's; cosine similarity per n times a Gaussian length penalty (sigma 6, length
  in bigrams as in COCO's code); mean over n, mean over references, x10; mean over items.

Tokenisation (`tokenize`) follows what the COCO code does with the Stanford PTB
tokenizer (lower-cased, then the punctuation tokens dropped), for the forms captions
hold: clitics split off ("dog's" -> dog 's, "don't" -> do n't, "can't" -> ca n't),
hyphenated words and numbers kept whole ("high-pitched", "3.5", "1,000"), every other
punctuation mark a token of its own, and the marks COCO drops (. , ; : ? ! - -- ...
quotes, brackets) dropped. Rarer PTB rules (abbreviations such as "a.m.", currency
and unit splitting) are not copied.

`class_mention_rate` measures how often captions name one of the clip's event classes:
a cheap check of a captioner on labelled held-out clips, with no reference captions.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

MAX_N = 4
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0
# Smoothing constants of the COCO BLEU scorer, kept so zero-match corpora score alike.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9

# Tokens the COCO evaluation removes after PTB tokenisation.
_DROPPED = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",",
            ":", "-", "--", "...", ";"}
_BRACKETS_QUOTES = {'"', "(", ")", "{", "}"}
# Curly quotes as straight ones; Unicode dashes and the ellipsis as PTB writes them.
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... "})
# A word (letters/digits, inner hyphens, inner periods/commas between digits), a clitic,
# or one punctuation mark.
_PTB = re.compile(r"""
    n't\b                                   # the clitic of don't, can't
  | '(?:s|re|ve|ll|d|m)\b                   # the clitics of dog's, they're ...
  | \d+(?:[.,]\d+)+                          # 3.5, 1,000
  | [^\W_]+(?:'(?!(?:s|re|ve|ll|d|m|t)\b)[^\W_]+)+  # o'clock (an inner apostrophe)
  | [^\W_]+(?:[-_][^\W_]+)*?(?=n't\b)         # "do" of don't (the clitic follows)
  | [^\W_]+(?:[-_][^\W_]+)*                  # words, high-pitched
  | \.\.\.|--                                 # ellipsis, dash
  | [^\w\s]                                   # any other single mark
""", re.VERBOSE)

# Words the PTB tokenizer writes as two tokens.
_PTB_SPLITS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
               "wanna": ("wan", "na"), "gimme": ("gim", "me"), "lemme": ("lem", "me")}

Ngram = tuple[str, ...]


class CaptionInputError(ValueError):
    """Predictions and references that cannot be scored together."""


def tokenize(text: str) -> list[str]:
    """PTB-style word tokens as the COCO evaluation scores them (module docstring).

    Args:
      text: a caption.

    Returns:
      Its tokens ("A dog's high-pitched bark, loud!" -> ["a", "dog", "'s",
      "high-pitched", "bark", "loud"]).
    """
    text = unicodedata.normalize("NFC", text.lower()).translate(_QUOTES)
    tokens = _PTB.findall(text.replace('"', ' " '))
    # PTB writes brackets as -LRB- ... (dropped by COCO) and quotes as `` '' (dropped).
    return [part for t in tokens if t not in _DROPPED and t not in _BRACKETS_QUOTES
            for part in _PTB_SPLITS.get(t, (t,))]


def ngram_counts(tokens: Sequence[str], max_n: int = MAX_N) -> Counter[Ngram]:
    """Counts of all n-grams of length 1..max_n.

    Args:
      tokens: a tokenised caption.
      max_n: longest n-gram.

    Returns:
      Counter from n-gram tuple to its number of occurrences.
    """
    counts: Counter[Ngram] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def bleu(
    candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> list[float]:
    """Corpus-level BLEU-1..BLEU-4 (see the module docstring).

    Args:
      candidates: tokenised candidates, one per item.
      references: per item, its tokenised references (at least one).

    Returns:
      [BLEU-1, ..., BLEU-4], each in [0, 1].
    """
    correct = np.zeros(MAX_N)
    guess = np.zeros(MAX_N)
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        max_ref: Counter[Ngram] = Counter()
        for ref in refs:
            max_ref |= ngram_counts(ref)  # `|` keeps the larger count per n-gram
        for ngram, count in ngram_counts(cand).items():
            correct[len(ngram) - 1] += min(count, max_ref[ngram])
        for k in range(MAX_N):
            guess[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        ref_len += min((abs(len(ref) - len(cand)), len(ref)) for ref in refs)[1]

    ratio = (cand_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    penalty = math.exp(1.0 - 1.0 / ratio) if ratio < 1.0 else 1.0
    scores, product = [], 1.0
    for k in range(MAX_N):
        product *= (correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)) * penalty)
    return scores


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Args:
      a: tokens.
      b: tokens.

    Returns:
      LCS length.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Sentence ROUGE-L F-measure (beta 1.2) with COCO's max-precision/max-recall rule.

    Args:
      candidate: tokenised candidate.
      references: its tokenised references.

    Returns:
      ROUGE-L in [0, 1] (0 for an empty candidate).
    """
    precision = recall = 0.0
    for ref in references:
        common = lcs_length(candidate, ref)
        if candidate:
            precision = max(precision, common / len(candidate))
        if ref:
            recall = max(recall, common / len(ref))
    if precision == 0.0 or recall == 0.0:
        return 0.0
    b2 = ROUGE_BETA**2
    return (1 + b2) * precision * recall / (recall + b2 * precision)


def _tfidf(counts: Counter[Ngram], doc_freq: Counter[Ngram], log_docs: float):
    """Per-n TF-IDF maps, their L2 norms and the length (bigram count) of one caption."""
    vectors: list[dict[Ngram, float]] = [{} for _ in range(MAX_N)]
    norms = np.zeros(MAX_N)
    for ngram, tf in counts.items():
        value = tf * (log_docs - math.log(max(1.0, doc_freq[ngram])))
        vectors[len(ngram) - 1][ngram] = value
        norms[len(ngram) - 1] += value**2
    # COCO's CIDEr-D measures length in bigrams; kept so the length penalty matches.
    length = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
    return vectors, np.sqrt(norms), length


def cider_d(
    candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> list[float]:
    """CIDEr-D of every item (see the module docstring); the corpus score is their mean.

    Args:
      candidates: tokenised candidates, one per item.
      references: per item, its tokenised references (at least one).

    Returns:
      Per-item CIDEr-D scores (x10 scale).
    """
    ref_counts = [[ngram_counts(ref) for ref in refs] for refs in references]
    doc_freq: Counter[Ngram] = Counter()
    for counts in ref_counts:
        doc_freq.update(set().union(*counts))
    log_docs = math.log(float(len(references)))

    scores = []
    for cand, counts in zip(candidates, ref_counts, strict=True):
        c_vec, c_norm, c_len = _tfidf(ngram_counts(cand), doc_freq, log_docs)
        total = np.zeros(MAX_N)
        for ref in counts:
            r_vec, r_norm, r_len = _tfidf(ref, doc_freq, log_docs)
            penalty = math.exp(-((c_len - r_len) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(MAX_N):
                dot = sum(
                    min(v, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, v in c_vec[n].items()
                )
                if c_norm[n] > 0 and r_norm[n] > 0:
                    total[n] += penalty * dot / (c_norm[n] * r_norm[n])
        scores.append(CIDER_SCALE * float(np.mean(total)) / len(counts))
    return scores


def _check_inputs(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> list[str]:
    if not predictions:
        raise CaptionInputError("predictions is empty; nothing to score")
    missing = sorted(set(predictions) - set(references))
    extra = sorted(set(references) - set(predictions))
    if missing or extra:
        raise CaptionInputError(
            "predictions and references must have the same keys; "
            f"no references for {missing[:5]}, no prediction for {extra[:5]} "
            f"({len(missing)} and {len(extra)} in all)"
        )
    keys = sorted(predictions)
    for key in keys:
        if not isinstance(predictions[key], str):
            raise CaptionInputError(f"predictions[{key!r}] must be a string caption")
        refs = references[key]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise CaptionInputError(
                f"references[{key!r}] must be a non-empty list of caption strings"
            )
    return keys


def caption_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of predicted captions against references.

    Args:
      predictions: item id -> predicted caption.
      references: item id -> its reference captions; same ids as `predictions`.

    Returns:
      {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"} -> float in [0, 1] and
      "CIDEr-D" -> float (x10 scale, typically 0..10). With a single item every n-gram
      has IDF 0 and CIDEr-D is 0, as in COCO's code; score whole test sets.
    """
    keys = _check_inputs(predictions, references)
    cands = [tokenize(predictions[k]) for k in keys]
    refs = [[tokenize(r) for r in references[k]] for k in keys]
    metrics = {f"BLEU-{n}": score for n, score in enumerate(bleu(cands, refs), start=1)}
    metrics["ROUGE-L"] = float(np.mean([rouge_l(c, r) for c, r in zip(cands, refs, strict=True)]))
    metrics["CIDEr-D"] = float(np.mean(cider_d(cands, refs)))
    return metrics


_WORD = re.compile(r"[a-z0-9]+")


def _stem(word: str) -> str:
    # Light suffix stripping so "a bird trilling" mentions "bird trill", "crackling"
    # mentions "crackle" and "purring" "purr": -ing, plural -s/-es, then a final doubled
    # consonant (not l/s/z: "running" -> "run" as "purr" -> "pur"), then a final -e.
    if word.endswith("ing") and len(word) > 5:
        word = word[:-3]
    elif word.endswith(("ses", "xes", "zes", "ches", "shes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        word = word[:-1]
    if len(word) > 2 and word[-1] == word[-2] and word[-1] not in "lsz":
        word = word[:-1]
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def _stems(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text.lower().replace("_", " "))]


def mentions(caption: str, class_name: str) -> bool:
    """Whether `caption` names `class_name` (case-, plural- and -ing-insensitive words).

    Args:
      caption: generated text.
      class_name: e.g. "bird trill" or "engine_hum".

    Returns:
      True when the class name's words occur in the caption consecutively.
    """
    words, name = _stems(caption), _stems(class_name)
    return bool(name) and any(words[i:i + len(name)] == name
                              for i in range(len(words) - len(name) + 1))


def class_mention_rate(captions: Sequence[str | Sequence[str]],
                       labels: Sequence[Sequence[str]]) -> float:
    """Share of labelled clips whose caption(s) mention one of the clip's classes.

    Args:
      captions: per clip, one caption or a list of captions (any one may mention).
      labels: per clip, its class names; clips with none are not counted.

    Returns:
      A fraction in [0, 1].
    """
    if len(captions) != len(labels):
        raise CaptionInputError(f"got {len(captions)} caption entries for {len(labels)} "
                                f"label entries; need one per clip")
    hits = total = 0
    for texts, names in zip(captions, labels, strict=True):
        if isinstance(names, str):
            raise CaptionInputError(f"labels must be a list of class names per clip, got "
                                    f"{names!r}")
        if not names:
            continue
        texts = [texts] if isinstance(texts, str) else list(texts)
        total += 1
        hits += any(mentions(t, n) for t in texts for n in names)
    if not total:
        raise CaptionInputError("no clip has a label; class_mention_rate needs labelled clips")
    return hits / total

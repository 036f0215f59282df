"""Caption metrics (BLEU, ROUGE-L, CIDEr-D) against hand-computed values."""

import math

import numpy as np
import pytest

from cacophony_jax.data import pipeline
from cacophony_jax.evals.captioning import (
    CaptionInputError,
    bleu,
    caption_metrics,
    cider_d,
    lcs_length,
    rouge_l,
    tokenize,
)
from cacophony_jax.tasks import cacophony as cacophony_task

# The COCO BLEU scorer adds 1e-15 / 1e-9 to its fractions; allow for it.
TOL = 1e-6


def _words(caption):
    return caption.split()


def _toks(*captions):
    return [_words(caption) for caption in captions]


def test_tokenize():
    # As COCO's evaluation sees PTB tokens: clitics split off, hyphenated words and
    # numbers whole, the punctuation it drops dropped.
    words = ["a", "dog", "'s", "bark", "loud", "then", "high-pitched", "it", "'s"]
    assert tokenize("A Dog's bark, LOUD!  then high-pitched... It\u2019s") == words
    assert tokenize("don't can't") == ["do", "n't", "ca", "n't"]
    assert tokenize("Cannot, gonna") == ["can", "not", "gon", "na"]
    assert tokenize("o'clock \u2014 cafe\u0301\u2026") == ["o'clock", "caf\u00e9"]
    assert tokenize('the dogs\' barks (loud) -- then "quiet"; 3.5 or 1,000?') == [
        "the", "dogs", "barks", "loud", "then", "quiet", "3.5", "or", "1,000"]


def test_hyphenated_words_score_as_coco_does():
    # Worked with PTB-style tokens ("high-pitched" one token): 4-gram matches only in
    # the first caption, so BLEU-4 is small; the values come from an independent
    # implementation of the COCO formulas.
    metrics = caption_metrics({1: "a high-pitched beep", 2: "a car passes"},
                              {1: ["a high-pitched beep sounds twice"], 2: ["a car passes by"]})
    assert metrics["BLEU-1"] == pytest.approx(0.606531, abs=1e-6)
    assert metrics["BLEU-4"] == pytest.approx(0.019180, abs=1e-6)
    assert metrics["ROUGE-L"] == pytest.approx(0.776632, abs=1e-6)
    assert metrics["CIDEr-D"] == pytest.approx(5.239702, abs=1e-6)


def test_identical_caption_scores_one():
    predictions = {"a": "a dog barks at the mailman", "b": "rain falls on a tin roof"}
    references = {k: [v, "something else entirely"] for k, v in predictions.items()}
    metrics = caption_metrics(predictions, references)
    for n in range(1, 5):
        assert metrics[f"BLEU-{n}"] == pytest.approx(1.0, abs=TOL)
    assert metrics["ROUGE-L"] == pytest.approx(1.0)


def test_bleu_by_hand():
    cand = _words("the cat sat on mat")
    refs = _toks("the cat sat on the mat", "a cat is on the mat")
    # Unigrams: all 5 appear in a reference -> 5/5. Bigrams: the cat, cat sat, sat on
    # match, "on mat" does not -> 3/4. Closest reference length 6 > 5: BP = exp(1 - 6/5).
    bp = math.exp(1 - 6 / 5)
    scores = bleu([cand], [refs])
    assert scores[0] == pytest.approx(1.0 * bp, abs=TOL)
    assert scores[1] == pytest.approx(math.sqrt(1.0 * 3 / 4) * bp, abs=TOL)
    # Trigrams: "the cat sat", "cat sat on" match, "sat on mat" not -> 2/3; 4-grams 1/2.
    assert scores[3] == pytest.approx((1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 * bp, abs=TOL)


def test_bleu_clips_counts_and_picks_closest_shorter_reference():
    # "the" x3 against a reference holding one "the": clipped to 1/3.
    assert bleu([["the", "the", "the"]], [_toks("the cat sat")])[0] == pytest.approx(1 / 3, abs=TOL)
    # Candidate length 5 is 1 away from both 4 and 6: the shorter wins, so no penalty.
    cand = _words("a b c d e")
    assert bleu([cand], [_toks("a b c d", "a b c d e f")])[0] == pytest.approx(1.0, abs=TOL)


def test_bleu_is_corpus_level():
    # Counts are pooled before dividing: (2 + 0) / (2 + 2) matches for unigrams, not the
    # mean of per-sentence scores; lengths 2 + 2 equal references 2 + 2, so BP = 1.
    cands = _toks("a b", "c d")
    refs = [_toks("a b"), _toks("x y")]
    assert bleu(cands, refs)[0] == pytest.approx(2 / 4, abs=TOL)
    assert bleu(cands, refs)[1] == pytest.approx(math.sqrt(2 / 4 * 1 / 2), abs=TOL)


def test_lcs():
    assert lcs_length(_words("a b c d e"), _words("a c e x")) == 3
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_by_hand():
    cand = _words("a dog barks at the cat")
    # LCS with the first reference is "dog barks at cat" = 4: P = 4/6, R = 4/7.
    ref1 = _words("the dog barks loudly at a cat")
    p, r = 4 / 6, 4 / 7
    assert rouge_l(cand, [ref1]) == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    # COCO takes the best precision and the best recall separately: "a dog" gives R = 1.
    p, r = 4 / 6, 1.0
    assert rouge_l(cand, [ref1, ["a", "dog"]]) == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    assert rouge_l([], [ref1]) == 0.0


def test_cider_d_two_items_by_hand():
    cands = _toks("the dog barks", "a cat")
    refs = [_toks("the dog barks", "a dog barks loudly"), _toks("the cat meows")]
    # Document frequency over the 2 items: "the" is in both -> IDF log 2 - log 2 = 0;
    # every other n-gram (also "a", and "a cat" which no reference holds) has IDF
    # log 2 = L. L cancels in the cosines, so they are counted in units of L.
    gauss = math.exp(-(1**2) / (2 * 6.0**2))  # length (bigram count) differs by one
    # Item 1 vs its identical first reference: cosine 1 for n = 1, 2, 3 and 0 for n = 4
    # (no 4-gram). Vs "a dog barks loudly" (3 bigrams vs 2):
    #   n=1: dog + barks = 2 / (sqrt 2 * sqrt 4); n=2: "dog barks" = 1 / (sqrt 2 * sqrt 3);
    #   n=3, 4: nothing shared.
    vs_second = gauss * (2 / (math.sqrt(2) * 2) + 1 / (math.sqrt(2) * math.sqrt(3)))
    item1 = 10 * (3 + vs_second) / 4 / 2
    # Item 2 "a cat" vs "the cat meows" (1 vs 2 bigrams): only "cat" is shared:
    #   n=1: 1 / (sqrt 2 [a, cat] * sqrt 2 [cat, meows; "the" weighs 0]).
    item2 = 10 * gauss * (1 / 2) / 4 / 1
    scores = cider_d(cands, refs)
    assert scores == pytest.approx([item1, item2])
    predictions = {"x": "The dog barks.", "y": "A cat!"}
    references = {"x": ["the dog barks", "A dog barks, loudly"], "y": ["The cat meows."]}
    assert caption_metrics(predictions, references)["CIDEr-D"] == pytest.approx((item1 + item2) / 2)


def test_cider_d_perfect_long_caption_is_ten():
    refs = [_toks("a dog barks at night"), _toks("rain on a metal roof")]
    assert cider_d([refs[0][0], refs[1][0]], refs) == pytest.approx([10.0, 10.0])


def test_scores_improve_as_the_caption_gets_closer():
    references = {"a": ["a man speaks while a car passes by"], "b": ["birds chirp in a forest"]}
    worse = {"a": "music plays", "b": "birds chirp"}
    better = {"a": "a man speaks while a car passes", "b": "birds chirp in a forest"}
    low = caption_metrics(worse, references)
    high = caption_metrics(better, references)
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert high[name] > low[name], name
        assert low[name] >= 0.0
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L"):
        assert high[name] <= 1.0 + TOL


@pytest.mark.parametrize(
    ("predictions", "references", "match"),
    [
        ({}, {}, "empty"),
        ({"a": "x"}, {"b": ["x"]}, "same keys"),
        ({"a": "x"}, {"a": "x"}, "non-empty list"),
        ({"a": "x"}, {"a": []}, "non-empty list"),
        ({"a": 3}, {"a": ["x"]}, "string caption"),
    ],
)
def test_bad_inputs_name_the_problem(predictions, references, match):
    with pytest.raises(CaptionInputError, match=match):
        caption_metrics(predictions, references)


def test_caption_scores_by_hand():
    texts = pipeline.EvalTexts(
        captions=["a high beep repeats", "a dog barks", "a siren wails", "a bell rings"],
        caption_clip=np.asarray([0, 0, 1, 1]), labels=[(0,), (1,)],
        class_names=("beep", "siren"))
    scores = cacophony_task.caption_scores({0: "a high beep repeats", 1: "a bell rings"},
                                           texts)
    # Clip 0's caption names "beep"; clip 1's names no siren: 1 of 2 clips.
    assert scores["eval/caption_names_class"] == 50.0
    assert scores["eval/caption_ROUGE-L"] == pytest.approx(1.0)  # both match a reference
    assert scores["eval/caption_BLEU-1"] == pytest.approx(1.0)

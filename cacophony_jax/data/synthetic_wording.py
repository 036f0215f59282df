"""The wording of the synthetic corpus: captions that spell out a scene's attributes.

`captions` gives three paraphrases of a scene (canonical words first, then synonyms
and other orders), `synthetic_captions` two terse ones in the style of an audio
captioning model. Both draw only from the wording random stream they are given, so
rewording never changes a clip's audio (see `cacophony_jax.data.synthetic`).

The wording is kept short: with the 500-token BPE the quickstart trains on these
captions, a caption of three events (the longest kind) takes at most 39 tokens with
bos and eos, within the quickstart's 40-token text length (the tiny text tower's
positions), so no training caption is cut. Synonyms are few and common for the same
reason: so small a vocabulary splits a rare word into several tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# name -> (takes an article, verb, captioner-style gerund phrase)
_GRAMMAR: dict[str, tuple[bool, str, str]] = {
    "beep": (True, "pulses", "beeping"),
    "siren": (True, "wails", "a siren wailing"),
    "rising chirp": (True, "sweeps upward", "rising chirps"),
    "falling chirp": (True, "sweeps downward", "falling chirps"),
    "hiss": (True, "surges", "hissing"),
    "ticking": (False, "repeats", "ticking"),
    "drum": (True, "beats", "a drum beating"),
    "bell": (True, "rings", "a bell ringing"),
    "engine hum": (True, "throbs", "an engine humming"),
    "whistle": (True, "warbles", "whistling"),
    "bird trill": (True, "sings", "a bird trilling"),
    "knocking": (False, "repeats", "knocking"),
    "crackle": (False, "pops", "crackling"),
    "buzzer": (True, "buzzes", "a buzzer buzzing"),
}
# The first word of each list is the canonical one used by the first caption.
_PITCH_WORDS = {"low": ("low", "deep"), "high": ("high", "shrill")}
_LOUD_WORDS = {"quiet": ("quiet", "soft", "gentle"), "loud": ("loud", "strong", "powerful")}
_SPEED_ADVERBS = {"slow": ("slowly", "unhurriedly"), "fast": ("quickly", "rapidly")}
_SPEED_ADJECTIVES = {"slow": ("slow", "unhurried"), "fast": ("fast", "rapid", "quick")}
_DURATION_ADJECTIVES = {"short": ("short", "brief"), "long": ("long", "lengthy", "extended")}
_POSITION_WORDS = {"start": ("at the start", "at the beginning", "early on"),
                   "middle": ("in the middle", "midway through", "halfway through"),
                   "end": ("at the end", "near the end", "late in the clip")}
_ORDINALS = {2: (("first", "then"), ("first", "afterwards")),
             3: (("first", "next", "then"), ("first", "then", "next"))}
_JOINS = ("; then ", "; next, ", ", followed by ")
_BACKGROUND_WORDS = {"white": "white noise", "pink": "pink noise", "brown": "rumbling noise"}
# Not the events' loudness words: a noticeable background is still far below a quiet event.
_BACKGROUND_LEVEL_WORDS = {"faint": ("faint",),
                           "noticeable": ("clear",)}


def pick(rng: np.random.Generator, options: tuple) -> Any:
    """One of `options`, uniformly: every attribute and word choice is drawn this way."""
    return options[int(rng.integers(len(options)))]


def _noun_phrase(event: dict[str, Any], adjectives: list[str]) -> str:
    name = event["class"]
    phrase = " ".join([*adjectives, name])
    if not _GRAMMAR[name][0]:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def captions(rng: np.random.Generator, events: list[dict[str, Any]],
              background: dict[str, str]) -> list[str]:
    """Three paraphrases: canonical words first, then synonyms and other orders."""
    lone = len(events) == 1
    canonical = ", then ".join(
        _noun_phrase(e, [e["duration"], _LOUD_WORDS[e["loudness"]][0],
                         _PITCH_WORDS[e["pitch"]][0]])
        + f" {_GRAMMAR[e['class']][1]} {_SPEED_ADVERBS[e['speed']][0]}" for e in events)
    if lone:
        canonical += " " + _POSITION_WORDS[events[0]["position"]][0]

    clauses = [f"{_noun_phrase(e, [pick(rng, _PITCH_WORDS[e['pitch']])])}, "
               f"{pick(rng, _LOUD_WORDS[e['loudness']])}, "
               f"{pick(rng, _SPEED_ADJECTIVES[e['speed']])} and "
               f"{pick(rng, _DURATION_ADJECTIVES[e['duration']])}" for e in events]
    listed = clauses[0]
    for clause in clauses[1:]:
        listed += pick(rng, _JOINS) + clause
    if lone:
        listed = f"{pick(rng, _POSITION_WORDS[events[0]['position']])}, {listed}"

    lead = ((pick(rng, _POSITION_WORDS[events[0]["position"]]),) if lone
            else pick(rng, _ORDINALS[len(events)]))
    ordered = "; ".join(
        f"{word}, " + _noun_phrase(e, [pick(rng, _DURATION_ADJECTIVES[e["duration"]]),
                                       pick(rng, _PITCH_WORDS[e["pitch"]])])
        + f" {_GRAMMAR[e['class']][1]} {pick(rng, _SPEED_ADVERBS[e['speed']])}"
        for word, e in zip(lead, events, strict=True))
    ordered += (f", over {pick(rng, _BACKGROUND_LEVEL_WORDS[background['level']])} "
                f"{_BACKGROUND_WORDS[background['colour']]}")
    return [_sentence(canonical), _sentence(listed), _sentence(ordered)]


def synthetic_captions(rng: np.random.Generator, events: list[dict[str, Any]]) -> list[str]:
    """Two terse lower-case captions in the style of an audio captioning model.

    Like a real captioner they sometimes miss a later event and mostly drop the
    attributes.
    """
    kept = list(events)
    if len(kept) > 1 and rng.random() < 0.3:
        kept.pop(int(rng.integers(1, len(kept))))
    gerunds = [_GRAMMAR[e["class"]][2] for e in kept]
    first = f"{gerunds[0]} {_SPEED_ADVERBS[kept[0]['speed']][0]}"
    if len(gerunds) > 1:
        first += " followed by " + " and ".join(gerunds[1:])
    if rng.random() < 0.5:
        first += " with background noise"
    return [" and ".join(gerunds), first]

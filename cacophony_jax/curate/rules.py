"""Rule-based caption cleaning: noisy web-sound metadata -> one short sound caption.

Web sound collections describe a clip with a title, tags and a free-text description
full of things that are not about the sound: links, licences, the recorder and its
settings, file names, dates, greetings. `compose_caption` removes those, takes the
first description sentence that still names a sound once cut to length (else the
title), adds up to two salient tags when that is short, falls back to the tags alone,
and returns None when nothing about the sound is left. Everything here is
deterministic and takes time linear in the text's length (each field is first cut to
`MAX_FIELD_CHARS`, the tags to `MAX_TAGS`); the vocabulary of sounds is English
(metadata in other languages wants the LLM backend). The vocabulary is
`curate.rules_words`, the text cleaning `curate.rules_text`.
"""

from __future__ import annotations

from cacophony_jax.curate.rules_text import clean_title, sentences, split_tags, tidy
from cacophony_jax.curate.rules_words import (
    GENERIC_TAGS,
    STRONG_WORDS,
    has_sound,
    is_word,
    words_of,
)

# Longer fields are cut before cleaning: a caption comes from the first sentences and
# tags, and the cut bounds the time one clip of odd metadata can take.
MAX_FIELD_CHARS = 4000
MAX_TAGS = 64


def _salient(tags: list[str], caption: str) -> list[str]:
    """Tags naming a sound the caption does not mention; broader duplicates dropped."""
    said = set(words_of(caption))
    picked = []
    for tag in tags:
        words = [w for w in words_of(tag) if w not in GENERIC_TAGS]
        if not any(is_word(w, STRONG_WORDS) for w in words):
            continue
        if all(w in said or any(is_word(w, frozenset([s])) or is_word(s, frozenset([w]))
                                for s in said) for w in words):
            continue
        picked.append(tag)
    # "rain" adds nothing next to "heavy rain".
    return [t for t in picked
            if not any(t != u and set(t.split()) < set(u.split()) for u in picked)]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _shorten(text: str, max_words: int) -> str:
    words = text.split()
    if len(words) <= max_words:
        return text
    head = " ".join(words[:max_words])
    cut = max(head.rfind(","), head.rfind(";"))
    if cut > 0 and len(head[:cut].split()) >= 5:
        head = head[:cut]
    return tidy(head)


def _cap(text: str) -> str:
    """`text` cut to `MAX_FIELD_CHARS`, before the word the limit falls in."""
    if len(text) <= MAX_FIELD_CHARS:
        return text
    head = text[:MAX_FIELD_CHARS]
    cut = max(head.rfind(" "), head.rfind("\n"))
    return head[:cut] if cut > 0 and not text[MAX_FIELD_CHARS].isspace() else head


def _finish(text: str) -> str:
    text = text.rstrip(" .!?,;:")
    return text[:1].upper() + text[1:] + "."


def compose_caption(title: str, description: str, tags: list[str] | str | None,
                    max_words: int = 20, short_words: int = 8) -> str | None:
    """One short sound-focused caption from a clip's web metadata.

    Each field is cut to its first `MAX_FIELD_CHARS` characters (at a space) and the
    tags to the first `MAX_TAGS` before cleaning, which bounds the time one clip takes.

    Args:
      title: the clip's title (often a file name); used when no sentence will do.
      description: free text; its first sentence that names a sound, still once cut
        to `max_words`, is used.
      tags: list or comma-separated string.
      max_words: longer sentences are cut (at a comma when possible).
      short_words: captions shorter than this get up to two salient tags added.

    Returns:
      The caption, or None when nothing about the sound is left.
    """
    if isinstance(tags, str):
        tags = _cap(tags)
    elif tags is not None:
        tags = [_cap(t) for t in tags[:MAX_TAGS]]
    tag_list = split_tags(tags)[:MAX_TAGS]
    main = None
    for text in [*sentences(_cap(description or "")), clean_title(_cap(title or ""))]:
        # Checked again once cut: the sound may be named only past the cut.
        if has_sound(text):
            text = _shorten(text, max_words).rstrip(" .!?,;:")
            if has_sound(text):
                main = text
                break
    if main is None:
        sounds = _salient(tag_list, "")
        return _finish("the sound of " + _join(sounds[:4])) if sounds else None
    if len(main.split()) < short_words:
        extra = _salient(tag_list, main)[:2]
        if extra:
            main += ", with " + _join(extra)
    return _finish(main)

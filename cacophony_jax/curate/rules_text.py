"""Rule-based cleaning of web-sound metadata text: what is not about the sound goes.

`scrub` removes markup, links, e-mail addresses and user handles (what an LLM may
safely see); `clean_text` also removes licences, recording gear, formats and settings,
file names, dates, ids and the punctuation they leave behind. `sentences`,
`clean_title` and `split_tags` apply it to a description, a title and tags. Every
pattern takes time linear in the text's length.
"""

from __future__ import annotations

import html
import re
import unicodedata

from cacophony_jax.curate.rules_words import STRONG_WORDS, is_word

# Dotted names (links, file names, e-mail addresses) are only looked for from the start
# of a run of name characters, its leading dots and dashes included in the match: tried
# from every character of a long run ("a.a.a...") each try would rescan the rest of the
# run, which takes time quadratic in its length. Dots inside a name may repeat.
_DOTTED = r"(?<![\w.-])[.-]*+[\w-]+(?:\.+[\w-]+)*"
_URL = (r"(?:https?://|www\.)\S+|" + _DOTTED + r"\.(?:com|org|net|edu|gov|io|co|uk|de|fr|nl|"
        r"es|it|ru|jp|info|me|tv|fm)\b(?:/\S*)?")
# Possessive: the address part cannot contain the "@" that has to follow it.
_EMAIL = r"(?<![\w.+-])[.+-]*+[\w.+-]++@[\w-]+(?:\.[\w-]+)+\b"
_AUDIO_EXT = r"(?:wav|wave|mp3|flac|aiff?|ogg|m4a|wma|aac|mp4|mov|zip)"
# Whole sentences about rights, credits or the uploader: nothing about the sound.
_DROP_SENTENCE = re.compile(
    r"creative\s*commons|\bcc[\s-]?(?:by|0|zero)\b|\blicen[cs]|\battribution\b|"
    r"public\s+domain|copyright|all\s+rights|\bcredit|\bplease\b|\bcheck\s+out\b|"
    r"\bsubscribe|\bfollow\s+me|\bdonat|\bpatreon|\bfeel\s+free|\benjoy\b|\bthanks?\b|"
    r"\bthank\s+you|\bmy\s+(?:other\s+)?(?:sounds|pack|website|channel|page)", re.I)
_PRESENTING = re.compile(r"^(?:this\s+is|these\s+are|here\s+(?:is|are)|i\s+recorded)\s+", re.I)
_LEAD_IN = re.compile(
    r"^(?:an?\s+|the\s+)?(?:(?:field|ambient|stereo|mono|binaural|"
    r"hydrophone|close[\s-]?up|short|long|quick)\s+)*(?:recordings?|samples?|clips?|sfx|"
    r"sound\s+effects?|audio)\s+(?:of|from)\s+", re.I)
_SUBS = [re.compile(p, re.I) for p in (
    r"<[^<>]+>",  # not "[^>]+": a run of "<" without ">" would be rescanned from each
    _EMAIL,  # before _URL, which would take its domain
    _URL,
    r"(?<![\w@])@\w+",
    r"(?<![\w&])#\w+",
    rf"{_DOTTED}\.{_AUDIO_EXT}\b",
    # ", recorded at 5am with ..." trails off into metadata; "recorded with X" is gear.
    r"[,;]\s*(?:recorded|captured|taken|made|shot|uploaded)\b[^.;!?]*",
    r"\b(?:recorded|captured|taken|made|shot)\s+(?:with|using|via|through|on\s+(?:a|my))\b"
    r"[^.,;:!?()]*",
    # Recorders and microphones (models keep ordinary words like "zoom" or "rode" safe).
    r"\bzoom\s*-?\s*[hfq]\d+\w*|\bh[1-6]n?\b|\btascam[\w-]*(?:\s+dr-?\d+\w*)?|\bdr-\d+\w*",
    r"\bsony\s*pcm[\w-]*|\bpcm-[\w-]+|\brode\s+(?:nt|videomic)[\w-]*|\bntg?-?\d\w*",
    r"\bsennheiser(?:\s*(?:mkh|mke|me|e)\s*-?\d+\w*)?|\bmkh\s*-?\d+\w*",
    r"\baudio[\s-]technica(?:\s*(?:at|bp)\s*-?\d+\w*)?|\bat-?\d{4}\w*",
    r"\bshure(?:\s*sm\s*-?\d+\w*)?|\bolympus(?:\s*ls-?\d+\w*)?|\bls-\d+\w*",
    r"\broland\s*r-?\d+\w*|\bmarantz(?:\s*pmd-?\d+\w*)?|\bsound\s*devices(?:\s*[\w-]+)?",
    r"\b(?:mixpre[\w-]*|neumann|schoeps|dpa|lewitt|behringer|focusrite|scarlett|sanken|"
    r"em272|km\s?18[34]|u87|jrf|usmoq|lom)\b",
    # Upload-page wording: quality tags and offers.
    r"\b(?:hq|hd|uhd|4k|\d{3,4}p|high[\s-]quality|hi[\s-]?res|royalty[\s-]free|"
    r"copyright[\s-]free|no\s+copyright|(?:free\s+)?download(?:able)?|free\s+(?:sfx|sound\s+"
    r"effects?|sounds?|to\s+use))\b",
    # Formats and settings.
    r"\b\d+(?:[.,]\d+)?\s*-?\s*(?:k?hz|kbps|kb/s|bits?)\b",
    r"\b(?:16|24|32)\s*/\s*(?:44[.,]1|48|88[.,]2|96|192)k?\b",
    r"\b(?:stereo|mono|monophonic|wav|wave|mp3|flac|aiff?|ogg|m4a|pcm|khz|hz|kbps|"
    r"bit\s?rate|sample\s?rate|bit\s?depth|(?:shotgun\s+|contact\s+)?mic(?:rophone)?s?|"
    r"(?:field\s+)?recorders?|preamps?|x/?y|ortf|mid[\s-]side|binaural|ambisonics?|"
    r"hydrophones?|lavalier|cardioid|hypercardioid|supercardioid|omni(?:directional)?|"
    r"normali[sz](?:ed|ation)|unprocessed|edited|eq(?:'?d)?|equali[sz]ed|denoised|"
    r"noise\s+reduction|mastered|audacity|reaper|ableton|pro\s+tools|audition|izotope|"
    r"field[\s-]?recordings?|sfx|daw|vst|plugins?|loopable|seamless\s+loop)\b",
    # Dates, times, durations, take numbers and camera-style ids.
    r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b|\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b",
    r"\b(?:\d{1,2}(?:st|nd|rd|th)?\s+)?(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|"
    r"dec)[a-z]*\.?\s+(?:\d{1,2}(?:st|nd|rd|th)?,?\s+)?\d{4}\b",
    r"\b\d{1,2}:\d{2}(?::\d{2})?\s*(?:am|pm)?\b|\b\d{1,2}\s*(?:am|pm)\b",
    r"\b\d+(?:[.,]\d+)?\s*(?:s|secs?|seconds?|mins?|minutes?|ms|hours?|hrs?)\b",
    r"\b(?:take|part|pt|track|version|ver|vol|volume|no|num|number|file|clip|edit)\.?\s*#?"
    r"\d+\b",
    r"\b[a-z]+[_-]?\d{3,}\w*\b",
)]
# Ends of sentences, but not of "St. Mary's" or "e.g. rain".
_SENTENCE_END = re.compile(
    r"(?<!\bSt\.)(?<!\bMr\.)(?<!\bDr\.)(?<!\bMt\.)(?<!\bvs\.)(?<!e\.g\.)(?<!i\.e\.)"
    r"(?<=[.!?])\s+|\n+|\s+-\s+")
# Words a caption may not end with, or begin with: left dangling by the removals.
_TRAILING = frozenset({"with", "using", "on", "at", "in", "of", "and", "or", "by", "from", "a",
                       "an", "the", "to", "for", "via", "while"})
_LEADING = re.compile(r"(?:with|and|or|of|by|using|from|via)\b\s*", re.I)
_CLOSING = {")": "(", "]": "["}


def scrub(text: str) -> str:
    """Removes markup, links, e-mail addresses and user handles; keeps everything else.

    Args:
      text: raw metadata text.

    Returns:
      The text without those, whitespace collapsed (what an LLM may safely see).
    """
    text = html.unescape(text or "")
    for pattern in _SUBS[:4]:
        text = pattern.sub(" ", text)
    return re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", text)).strip()


def _drop_numbers(text: str) -> str:
    # A number stays only when it counts sound sources ("3 dogs barking").
    tokens = text.split(" ")
    kept = [t for i, t in enumerate(tokens)
            if not re.fullmatch(r"[#(]?\d+(?:[.,]\d+)?[)]?[,.;:!?]?", t)
            or (i + 1 < len(tokens) and is_word(tokens[i + 1].strip(",.;:!?"), STRONG_WORDS))]
    return " ".join(kept)


def _brackets(text: str) -> str:
    """Drops unmatched brackets, and pairs with no word left inside (with their inside)."""
    if not any(c in text for c in "()[]"):
        return text
    out: list[str] = []
    open_: list[list] = []  # per open bracket: [bracket, its index in out, word inside]
    for c in text:
        if c in "([":
            open_.append([c, len(out), False])
            out.append(c)
        elif c in _CLOSING:
            if not open_ or open_[-1][0] != _CLOSING[c]:
                out.append(" ")  # closes nothing (or crosses another pair)
                continue
            _, at, word = open_.pop()
            if word:
                out.append(c)
                if open_:
                    open_[-1][2] = True
            else:
                del out[at:]  # each character is deleted at most once: linear
                out.append(" ")
        else:
            out.append(c)
            if open_ and (c.isalnum() or c == "_"):
                open_[-1][2] = True
    for _, at, _ in open_:
        out[at] = " "
    return "".join(out)


def _strip_function_words(text: str) -> str:
    """Drops dangling function words from both ends ("dog barking with" -> "dog
    barking"), keeping a final [.!?]; one pass, however many there are."""
    body, end = text, ""
    start, stop = 0, len(body)
    while True:
        if not end and stop > start and body[stop - 1] in ".!?":
            # "dog barks. with": once "with" is gone, "." ends the caption.
            end, stop = body[stop - 1], stop - 1
        before = start, stop
        while stop > start and body[stop - 1] in " ,;:":
            stop -= 1
        word_at = body.rfind(" ", start, stop) + 1 or start
        if body[word_at:stop].lower() in _TRAILING:
            stop = word_at
        leading = _LEADING.match(body, start, stop)
        if leading:
            start = leading.end()
        while start < stop and body[start] in " ,;:":
            start += 1
        while stop > start and body[stop - 1] in " ,;:":
            stop -= 1
        if (start, stop) == before:
            break
    return body[start:stop] + end if stop > start else ""


def tidy(text: str) -> str:
    """Collapses whitespace and punctuation left behind by the removals."""
    text = _brackets(text)
    text = re.sub(r"(?<=\s)[-/|~*+=_]+(?=\s)", " ", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r" ([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?: ?[,;:])+", r"\1", text)
    text = re.sub(r"[,;:]? ?([.!?])(?: ?[.!?,;:])*", r"\1", text)
    text = text.lstrip(" -/|~*+,;:.!?").rstrip(" -/|~*+,;:")
    return _strip_function_words(text)


def clean_text(text: str) -> str:
    """Strips links, licences, gear, formats, file names, ids and stray punctuation.

    Args:
      text: one sentence or title of raw metadata.

    Returns:
      What is left, tidied ("" when nothing is).
    """
    text = _SUBS[0].sub(" ", html.unescape(text or ""))  # markup first: '<' is a symbol
    # Emoji and other symbols carry no words; keep letters, digits, punctuation, spaces.
    text = "".join(c if unicodedata.category(c)[0] in "LNPZ" else " " for c in text)
    # One space between words: patterns like "zoom\s*-?\s*h4" would otherwise try every
    # split of a long run of spaces.
    text = re.sub(r"\s+", " ", text)
    if text.isupper():
        text = text.lower()
    text = _LEAD_IN.sub("", _PRESENTING.sub("", text.strip()))
    for pattern in _SUBS:
        text = pattern.sub(" ", text)
    return tidy(_drop_numbers(re.sub(r"\s+", " ", text).strip()))


def sentences(description: str) -> list[str]:
    """The description's sentences without licence/credit/promotion ones, each cleaned."""
    text = re.sub(r"<br\s*/?>|</p>", "\n", html.unescape(description or ""), flags=re.I)
    # Each run of whitespace as one "\n" or " ": " - " (a sentence break) would otherwise
    # be looked for from every character of a long run.
    text = re.sub(r"\s+", lambda m: "\n" if "\n" in m.group() else " ", text)
    out = []
    for raw in _SENTENCE_END.split(text):
        if raw.strip() and not _DROP_SENTENCE.search(raw):
            cleaned = clean_text(raw)
            if cleaned:
                out.append(cleaned)
    return out


def _split_camel(text: str) -> str:
    # Only all-letter words: "DogBark" -> "Dog Bark", but "44.1kHz" stays one token.
    return re.sub(r"\b[A-Za-z]+\b",
                  lambda m: re.sub(r"(?<=[a-z])(?=[A-Z])", " ", m.group()), text)


def clean_title(title: str) -> str:
    """A title as plain lower-case words: no extension, separators or CamelCase."""
    title = re.sub(rf"\.{_AUDIO_EXT}$", "", (title or "").strip(), flags=re.I)
    title = _split_camel(title)
    return clean_text(re.sub(r"[_+]+", " ", title)).lower()


def split_tags(tags: list[str] | str | None) -> list[str]:
    """Tags as cleaned lower-case phrases, deduplicated, in their original order.

    Args:
      tags: a list of strings, or one string separated by commas/semicolons (or by
        spaces when it is a run of #hashtags).

    Returns:
      The usable tags (gear, formats and numbers removed).
    """
    if tags is None:
        return []
    if isinstance(tags, str):
        if "," not in tags and ";" not in tags and tags.strip().startswith("#"):
            tags = tags.split()
        else:
            tags = re.split(r"[,;]", tags)
    out: dict[str, None] = {}  # ordered, and quick to look up however many tags
    for tag in tags:
        tag = re.sub(r"[-_#]+", " ", tag).strip()
        tag = clean_text(_split_camel(tag)).lower().strip(".")
        if tag:
            out[tag] = None
    return list(out)

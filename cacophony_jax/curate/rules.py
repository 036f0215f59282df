"""Rule-based caption cleaning: noisy web-sound metadata -> one short sound caption.

Web sound collections describe a clip with a title, tags and a free-text description
full of things that are not about the sound: links, licences, the recorder and its
settings, file names, dates, greetings. `compose_caption` removes those, takes the
first description sentence that still names a sound once cut to length (else the
title), adds up to two salient tags when that is short, falls back to the tags alone,
and returns None when nothing about the sound is left. Everything here is
deterministic and takes time linear in the text's length (each field is first cut to
`MAX_FIELD_CHARS`, the tags to `MAX_TAGS`); the vocabulary of sounds is English
(metadata in other languages wants the LLM backend).
"""

from __future__ import annotations

import html
import re
import unicodedata

# Sound sources and events. A caption must name at least one of these, or a place.
_STRONG = """
dog bark woof howl growl whine yelp puppy cat meow purr hiss kitten bird chirp tweet
birdsong sing warble crow raven owl hoot rooster crowing chicken hen cluck duck quack goose
geese gull seagull pigeon dove coo parrot woodpecker peck blackbird robin sparrow magpie
cuckoo frog toad croak cricket cicada insect bee buzz fly mosquito wasp cow moo horse neigh
whinny gallop hoof hooves sheep bleat goat pig oink grunt snort lion roar tiger bear wolf
elephant monkey whale dolphin seal bat mouse rat squirrel deer livestock cattle
rain rainfall raindrop drizzle downpour shower storm thunder thunderstorm lightning wind
breeze gust gale hail snow sleet water stream brook creek river waterfall ocean wave surf
tide drip drop splash trickle gurgle bubble babble flow rustle leaves fire flame crackle
campfire fireplace
voice speech speak talk conversation chatter whisper shout yell scream cry sob laugh
laughter giggle cough sneeze sniff breath breathe pant sigh yawn snore hiccup gasp burp
hum whistle singer choir chant clap applause cheer crowd people child children kid baby
infant man men woman women footstep step walk run jog stomp kiss chew eat drink gulp
swallow slurp heartbeat
door knock slam creak squeak hinge lock key keyboard type typing typewriter click clock
tick tock alarm bell doorbell chime phone telephone ring ringtone vibrate vibration beep
buzzer microwave fridge refrigerator dishwasher washer dryer vacuum blender mixer kettle
boil sizzle fry frying pan pot cutlery dish plate cup mug bottle cork pour faucet tap
sink toilet flush bath zipper velcro crumple tear scissors cut chop knife page pen
pencil drawer chair bag wrapper coin jangle
hammer saw drill grinder grind sander chainsaw lawnmower mower machine machinery engine
motor generator compressor pump jackhammer bulldozer excavator crane tool clank clang
clatter rattle scrape screech squeal steam valve fan
car truck bus van motorcycle motorbike scooter bicycle bike train tram subway metro
locomotive airplane aeroplane plane aircraft jet helicopter boat ship ferry horn honk
siren ambulance traffic vehicle tire tyre brake skid rev idle
music melody song tune piano guitar bass drum percussion cymbal snare violin cello viola
fiddle flute clarinet saxophone sax trumpet trombone tuba harp organ accordion harmonica
banjo ukulele mandolin synth synthesizer xylophone marimba glockenspiel gong tambourine
shaker orchestra band chord strum pluck beat rhythm
hum drone whir whoosh swoosh swish woosh rumble thud thump bang boom crash smash shatter
break impact hit strike pop snap crack crunch squish squelch splat slap punch kick
explosion explode blast gunshot gun shot firework blip ding dong jingle tinkle clink
echo reverb static glitch
"""
# Scenes imply a soundscape: enough for a caption, too vague to add as a tag.
_PLACES = """
city urban street market cafe restaurant bar pub kitchen office room hall church cathedral
station airport harbour harbor port park playground school classroom stadium arena mall
shop store supermarket village farm countryside garden backyard yard courtyard tunnel
bridge hospital library forest woods jungle meadow beach shore lake pond sea cave
highway road railway construction factory workshop
"""
STRONG_WORDS = frozenset(_STRONG.split())
PLACE_WORDS = frozenset(_PLACES.split())

# Longer fields are cut before cleaning: a caption comes from the first sentences and
# tags, and the cut bounds the time one clip of odd metadata can take.
MAX_FIELD_CHARS = 4000
MAX_TAGS = 64

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
# Category tags: true of a whole collection, never news about one clip.
_GENERIC = """sound sounds noise audio ambience ambiance ambient atmosphere atmos soundscape
nature animal animals environment outdoor outdoors indoor indoors foley effect effects"""
_GENERIC_TAGS = frozenset(_GENERIC.split())


def _is_word(word: str, vocabulary: frozenset[str]) -> bool:
    """Whether `word` or a simple inflection of it (barking, cries, dogs) is listed."""
    w = word.lower().strip("'")
    if w in vocabulary:
        return True
    for suffix in ("ing", "ed", "es", "s", "ers", "er", "y"):
        # "y" needs a longer stem: windy -> wind, but not many -> man.
        if w.endswith(suffix) and len(w) - len(suffix) >= (4 if suffix == "y" else 2):
            base = w[: -len(suffix)]
            options = {base, base + "e"}
            if len(base) > 2 and base[-1] == base[-2]:
                options.add(base[:-1])  # running -> run, dripping -> drip
            if base.endswith("i"):
                options.add(base[:-1] + "y")  # cries -> cry
            if options & vocabulary:
                return True
    return False


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def has_sound(text: str) -> bool:
    """True if `text` names a sound source or event, or a place (a soundscape)."""
    return any(_is_word(w, STRONG_WORDS) or _is_word(w, PLACE_WORDS) for w in _words(text))


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
            or (i + 1 < len(tokens) and _is_word(tokens[i + 1].strip(",.;:!?"), STRONG_WORDS))]
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


def _tidy(text: str) -> str:
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
    return _tidy(_drop_numbers(re.sub(r"\s+", " ", text).strip()))


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


def _salient(tags: list[str], caption: str) -> list[str]:
    """Tags naming a sound the caption does not mention; broader duplicates dropped."""
    said = set(_words(caption))
    picked = []
    for tag in tags:
        words = [w for w in _words(tag) if w not in _GENERIC_TAGS]
        if not any(_is_word(w, STRONG_WORDS) for w in words):
            continue
        if all(w in said or any(_is_word(w, frozenset([s])) or _is_word(s, frozenset([w]))
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
    return _tidy(head)


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

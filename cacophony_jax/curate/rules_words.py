"""The sound vocabulary of rule-based caption cleaning (English) and word matching.

A caption must name a sound source or event (`STRONG_WORDS`) or a place, whose
soundscape it implies (`PLACE_WORDS`); `is_word` accepts simple inflections (barking,
cries, dogs). `GENERIC_TAGS` are category tags, true of a whole collection, that never
count as naming a sound.
"""

from __future__ import annotations

import re

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
# Category tags: true of a whole collection, never news about one clip.
_GENERIC = """sound sounds noise audio ambience ambiance ambient atmosphere atmos soundscape
nature animal animals environment outdoor outdoors indoor indoors foley effect effects"""
GENERIC_TAGS = frozenset(_GENERIC.split())


def is_word(word: str, vocabulary: frozenset[str]) -> bool:
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


def words_of(text: str) -> list[str]:
    """The lower-case words of `text` (runs of letters and apostrophes)."""
    return re.findall(r"[a-z']+", text.lower())


# "Noise" alone is a category tag, but a kind of noise is the sound itself.
_NOISE_KINDS = re.compile(
    r"\b(?:white|pink|brown(?:ian)?|red|gr[ae]y|blue|violet|purple|green|black|harsh|"
    r"digital|analog(?:ue)?|electronic|glitch(?:y)?|industrial|broadband|filtered|"
    r"background|room)\s+noises?\b")


def has_sound(text: str) -> bool:
    """True if `text` names a sound source or event, a kind of noise ("pink noise"), or
    a place (a soundscape)."""
    return (any(is_word(w, STRONG_WORDS) or is_word(w, PLACE_WORDS) for w in words_of(text))
            or _NOISE_KINDS.search(text.lower()) is not None)

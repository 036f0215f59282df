"""Procedural sound events and background noise for the embedded synthetic corpus.

Every event class is a short numpy recipe over a time axis; two of its attributes
change how it sounds: pitch ("low" or "high": the frequency range of the tone or of
the noise band) and speed ("slow" or "fast": its repetition or modulation rate).
The two settings of each attribute lie far apart (a factor of about three) so a tiny
model sees them in a log-mel spectrogram after a few minutes of training. Loudness,
duration and placement in time are applied by the corpus (`synthetic.py`).

Recipes are vectorised: repeated hits (drum strokes, ticks, knocks) use the time
since the most recent hit, computed for all samples at once, never a loop over
samples, so a 10 s clip takes a few milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

# Natural names: each one reads well in the zero-shot prompt "This is a sound of {x}."
EVENT_CLASSES: tuple[str, ...] = (
    "beep", "siren", "rising chirp", "falling chirp", "hiss", "ticking", "drum",
    "bell", "engine hum", "whistle", "bird trill", "knocking", "crackle", "buzzer",
)
PITCHES: tuple[str, ...] = ("low", "high")
SPEEDS: tuple[str, ...] = ("slow", "fast")
# Background colour -> exponent a of its power spectrum 1 / f^a.
NOISE_COLOURS: dict[str, float] = {"white": 0.0, "pink": 1.0, "brown": 2.0}

_FADE_S = 0.01  # fade in/out of every event, so onsets and offsets do not click
_LEVEL_FRAME_S = 0.02  # frame length of the level measurement
_NOISE_CORNER_HZ = 50.0  # coloured noise is flat below this


@dataclasses.dataclass(frozen=True)
class _Draw:
    """What a recipe needs: random numbers, the time axis and the two attributes."""

    rng: np.random.Generator
    t: np.ndarray  # float64 seconds since the event's onset
    sample_rate: int
    high: bool
    fast: bool

    def pitch(self, low: tuple[float, float], high: tuple[float, float]) -> float:
        lo, hi = high if self.high else low
        return float(self.rng.uniform(lo, hi))

    def rate(self, slow: tuple[float, float], fast: tuple[float, float]) -> float:
        lo, hi = fast if self.fast else slow
        return float(self.rng.uniform(lo, hi))

    def noise(self) -> np.ndarray:
        return self.rng.standard_normal(self.t.size)


def _gate(t: np.ndarray, rate: float, duty: float, ramp: float = 0.005) -> np.ndarray:
    """On/off pulses at `rate` Hz, on for `duty` of each period, with short ramps."""
    within = np.mod(t * rate, 1.0) / rate
    on = duty / rate
    return np.clip(within / ramp, 0.0, 1.0) * np.clip((on - within) / ramp, 0.0, 1.0)


def _since_hits(d: _Draw, hit_times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seconds since the latest hit and that hit's number, for every sample.

    Args:
      d: the recipe's draw (its time axis sets the length).
      hit_times: hit times in seconds; the first should be 0 so every sample has one.

    Returns:
      (tau, which): float64 [n] seconds since the latest hit, int [n] index of that
      hit in the sorted, de-duplicated hit list.
    """
    n = d.t.size
    starts = np.unique(np.clip(np.round(hit_times * d.sample_rate).astype(np.int64), 0, n - 1))
    marks = np.zeros(n, np.int64)
    marks[starts] = 1
    which = np.maximum(np.cumsum(marks) - 1, 0)
    tau = (np.arange(n) - starts[which]) / d.sample_rate
    return np.maximum(tau, 0.0), which


def _periodic_hits(d: _Draw, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """`_since_hits` for hits every 1/rate s with a little timing jitter."""
    duration = d.t.size / d.sample_rate
    times = np.arange(0.0, duration, 1.0 / rate)
    times[1:] += d.rng.uniform(-0.03, 0.03, times.size - 1) / rate
    return _since_hits(d, times)


def _sweep_phase(f_start: float, ratio: float, length: float, tau: np.ndarray) -> np.ndarray:
    """Phase of an exponential sweep from f_start to f_start * ratio over `length` s."""
    tau = np.minimum(tau, length)
    return 2 * np.pi * f_start * length / np.log(ratio) * (ratio ** (tau / length) - 1.0)


def _beep(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((300, 500), (1200, 2000))
    rate = d.rate((1.5, 2.5), (5.0, 7.0))
    return np.sin(2 * np.pi * f * d.t) * _gate(d.t, rate, 0.5), {"frequency_hz": f, "rate_hz": rate}


def _siren(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((450, 650), (1300, 1800))
    rate = d.rate((0.6, 1.0), (3.0, 4.5))
    depth = 0.25
    # Instantaneous frequency f * (1 + depth * sin(2 pi rate t)), integrated exactly.
    phase = 2 * np.pi * f * (d.t - depth * np.cos(2 * np.pi * rate * d.t) / (2 * np.pi * rate))
    return np.sin(phase) + 0.3 * np.sin(2 * phase), {"frequency_hz": f, "rate_hz": rate}


def _chirp(d: _Draw, rising: bool) -> tuple[np.ndarray, dict]:
    f_low = d.pitch((200, 300), (1300, 1600))
    ratio = 3.5
    rate = d.rate((1.2, 1.8), (4.0, 6.0))
    length = 0.8 / rate
    start, factor = (f_low, ratio) if rising else (f_low * ratio, 1.0 / ratio)
    phase = _sweep_phase(start, factor, length, np.mod(d.t, 1.0 / rate))
    params = {"frequency_hz": start, "end_frequency_hz": start * factor, "rate_hz": rate}
    return np.sin(phase) * _gate(d.t, rate, 0.8), params


def _rising_chirp(d: _Draw) -> tuple[np.ndarray, dict]:
    return _chirp(d, rising=True)


def _falling_chirp(d: _Draw) -> tuple[np.ndarray, dict]:
    return _chirp(d, rising=False)


def _hiss(d: _Draw) -> tuple[np.ndarray, dict]:
    centre = d.pitch((500, 900), (3500, 5500))
    rate = d.rate((1.0, 1.5), (4.0, 6.0))
    spectrum = np.fft.rfft(d.noise())
    freqs = np.fft.rfftfreq(d.t.size, 1.0 / d.sample_rate)
    spectrum *= np.exp(-0.5 * ((freqs - centre) / (0.4 * centre)) ** 2)
    band = np.fft.irfft(spectrum, d.t.size)
    surge = 1.0 - 0.4 * (1.0 + np.cos(2 * np.pi * rate * d.t))
    return band * surge, {"frequency_hz": centre, "rate_hz": rate}


def _ticking(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((900, 1400), (3000, 4500))
    rate = d.rate((2.0, 3.0), (7.0, 10.0))
    tau, _ = _periodic_hits(d, rate)
    tick = np.exp(-tau / 0.003) * np.sin(2 * np.pi * f * tau)
    return tick + 0.3 * np.exp(-tau / 0.001) * d.noise(), {"frequency_hz": f, "rate_hz": rate}


def _drum(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((55, 80), (160, 240))
    rate = d.rate((1.2, 2.0), (4.0, 6.0))
    tau, _ = _periodic_hits(d, rate)
    # The skin's pitch starts 2.5x higher and drops within ~15 ms, as a struck drum does.
    phase = 2 * np.pi * f * (tau + 1.5 * 0.015 * (1.0 - np.exp(-tau / 0.015)))
    body = np.exp(-tau / 0.12) * np.sin(phase)
    return body + 0.3 * np.exp(-tau / 0.005) * d.noise(), {"frequency_hz": f, "rate_hz": rate}


_BELL_PARTIALS = np.array([1.0, 2.0, 2.76, 4.07, 5.4])
_BELL_GAINS = np.array([1.0, 0.6, 0.4, 0.25, 0.2])
_BELL_DECAYS = np.array([1.0, 0.7, 0.5, 0.35, 0.25])


def _bell(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((280, 420), (900, 1400))
    rate = d.rate((0.6, 1.0), (2.5, 3.5))
    tau, _ = _periodic_hits(d, rate)
    # Ring for about half a period, so the next strike does not cut a loud tail.
    decays = _BELL_DECAYS * min(1.0, 0.5 / rate)
    out = np.zeros_like(tau)
    for ratio, gain, decay in zip(_BELL_PARTIALS, _BELL_GAINS, decays, strict=True):
        out += gain * np.exp(-tau / decay) * np.sin(2 * np.pi * f * ratio * tau)
    return out, {"frequency_hz": f, "rate_hz": rate}


def _engine_hum(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((35, 55), (100, 150))
    rate = d.rate((1.5, 2.5), (6.0, 9.0))
    phase = 2 * np.pi * f * d.t
    cos1 = np.cos(phase)
    previous, current = np.zeros_like(phase), np.sin(phase)
    out = np.zeros_like(phase)
    # Harmonics by the recurrence sin((k+1)x) = 2 cos(x) sin(kx) - sin((k-1)x): one sin.
    for k in range(1, 9):
        out += current / k
        previous, current = current, 2.0 * cos1 * current - previous
    throb = 1.0 - 0.3 * (1.0 + np.cos(2 * np.pi * rate * d.t))
    return out * throb, {"frequency_hz": f, "rate_hz": rate}


def _whistle(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((700, 1000), (2000, 3000))
    rate = d.rate((2.0, 3.0), (7.0, 9.0))
    depth = 0.04
    phase = 2 * np.pi * f * (d.t - depth * np.cos(2 * np.pi * rate * d.t) / (2 * np.pi * rate))
    return np.sin(phase) + 0.15 * np.sin(2 * phase), {"frequency_hz": f, "rate_hz": rate}


def _bird_trill(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((1800, 2600), (3800, 5200))
    rate = d.rate((5.0, 7.0), (12.0, 16.0))
    length = 0.6 / rate
    tau = np.mod(d.t, 1.0 / rate)
    inside = np.minimum(tau / length, 1.0)
    # Each syllable arcs up by 35% and back down (f * (1 + 0.35 sin(pi tau / length))).
    phase = 2 * np.pi * f * (tau + 0.35 * length / np.pi * (1.0 - np.cos(np.pi * inside)))
    envelope = np.sin(np.pi * inside) ** 2
    return envelope * np.sin(phase), {"frequency_hz": f, "rate_hz": rate}


def _knocking(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((120, 200), (450, 700))
    rate = d.rate((1.5, 2.5), (5.0, 7.0))
    tau, _ = _periodic_hits(d, rate)
    knock = np.exp(-tau / 0.025) * np.sin(2 * np.pi * f * tau)
    return knock + 0.5 * np.exp(-tau / 0.006) * d.noise(), {"frequency_hz": f, "rate_hz": rate}


def _crackle(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((400, 800), (3000, 5000))
    rate = d.rate((6.0, 10.0), (30.0, 45.0))
    duration = d.t.size / d.sample_rate
    count = max(1, int(d.rng.poisson(rate * duration)))
    times = np.concatenate([[0.0], np.sort(d.rng.uniform(0.0, duration, count - 1))])
    tau, which = _since_hits(d, times)
    gains = d.rng.lognormal(0.0, 0.5, times.size)[which]
    decay = 0.004 if not d.high else 0.0015
    click = 0.6 * np.sin(2 * np.pi * f * tau) + 0.4 * d.noise()
    return gains * np.exp(-tau / decay) * click, {"frequency_hz": f, "rate_hz": rate}


def _buzzer(d: _Draw) -> tuple[np.ndarray, dict]:
    f = d.pitch((100, 160), (350, 550))
    rate = d.rate((1.0, 1.5), (3.5, 5.0))
    # tanh of a sine: a square-ish buzz whose harmonics fall off fast enough not to alias.
    tone = np.tanh(4.0 * np.sin(2 * np.pi * f * d.t))
    return tone * _gate(d.t, rate, 0.6), {"frequency_hz": f, "rate_hz": rate}


_RECIPES: dict[str, Callable[[_Draw], tuple[np.ndarray, dict]]] = {
    "beep": _beep, "siren": _siren, "rising chirp": _rising_chirp,
    "falling chirp": _falling_chirp, "hiss": _hiss, "ticking": _ticking, "drum": _drum,
    "bell": _bell, "engine hum": _engine_hum, "whistle": _whistle,
    "bird trill": _bird_trill, "knocking": _knocking, "crackle": _crackle,
    "buzzer": _buzzer,
}
assert tuple(_RECIPES) == EVENT_CLASSES


def active_level(samples: np.ndarray, sample_rate: int) -> float:
    """Loudness of a sound while it is sounding: the largest 20 ms frame RMS.

    A plain RMS would call a sparse ticking much quieter than a steady hum of the
    same strength; the loudest frame measures the event where it is on.

    Args:
      samples: float waveform [n].
      sample_rate: samples per second.

    Returns:
      The level as a linear amplitude (0 for silence).
    """
    frame = max(1, int(_LEVEL_FRAME_S * sample_rate))
    count = samples.size // frame
    if count < 1:
        return float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0
    frames = samples[: count * frame].reshape(count, frame)
    return float(np.sqrt(np.max(np.mean(np.square(frames), axis=1))))


def synthesize_event(class_name: str, rng: np.random.Generator, num_samples: int,
                     pitch: str, speed: str,
                     sample_rate: int = 16_000) -> tuple[np.ndarray, dict]:
    """Synthesises one sound event at unit active level.

    Args:
      class_name: one of EVENT_CLASSES.
      rng: the source of randomness (frequencies, rates, noise).
      num_samples: length of the event in samples.
      pitch: "low" or "high".
      speed: "slow" or "fast".
      sample_rate: samples per second (16 kHz or more; the highest partial is 7.6 kHz).

    Returns:
      (samples, params): float32 [num_samples] with `active_level` 1 and 10 ms fades
      at both ends; params holds the drawn numbers, e.g. {"frequency_hz", "rate_hz"}.
    """
    if class_name not in _RECIPES:
        raise ValueError(f"unknown event class {class_name!r}; choose one of {EVENT_CLASSES}")
    if pitch not in PITCHES or speed not in SPEEDS:
        raise ValueError(f"pitch must be one of {PITCHES} and speed one of {SPEEDS}, "
                         f"got pitch={pitch!r}, speed={speed!r}")
    if num_samples < 1:
        raise ValueError(f"an event needs at least one sample, got num_samples={num_samples}")
    t = np.arange(num_samples) / sample_rate
    draw = _Draw(rng, t, sample_rate, pitch == "high", speed == "fast")
    samples, params = _RECIPES[class_name](draw)
    fade = min(int(_FADE_S * sample_rate), num_samples // 2)
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        samples[:fade] *= ramp
        samples[num_samples - fade:] *= ramp[::-1]
    level = active_level(samples, sample_rate)
    samples = samples / level if level > 0 else samples
    return samples.astype(np.float32), {k: float(v) for k, v in params.items()}


def background_noise(rng: np.random.Generator, num_samples: int, colour: str,
                     level_db: float, sample_rate: int = 16_000) -> np.ndarray:
    """Stationary coloured noise at a given RMS level.

    Args:
      rng: the source of randomness.
      num_samples: length in samples.
      colour: "white", "pink" or "brown" (power falling as 1/f^0, 1/f, 1/f^2 above
        50 Hz and flat below, so the energy stays audible instead of drifting).
      level_db: RMS level in dB relative to full scale (e.g. -50).
      sample_rate: samples per second.

    Returns:
      float32 [num_samples].
    """
    if colour not in NOISE_COLOURS:
        raise ValueError(f"unknown noise colour {colour!r}; choose one of {tuple(NOISE_COLOURS)}")
    exponent = NOISE_COLOURS[colour]
    if exponent == 0.0:
        noise = rng.standard_normal(num_samples, dtype=np.float32)
    else:
        # Shape a white spectrum directly: one inverse FFT instead of a filter.
        bins = num_samples // 2 + 1
        spectrum = (rng.standard_normal(bins, dtype=np.float32)
                    + 1j * rng.standard_normal(bins, dtype=np.float32))
        freqs = np.arange(bins, dtype=np.float32) * np.float32(sample_rate / num_samples)
        spectrum *= np.maximum(freqs, np.float32(_NOISE_CORNER_HZ)) ** np.float32(-exponent / 2)
        spectrum[0] = 0.0
        noise = np.fft.irfft(spectrum, num_samples).astype(np.float32)
    rms = float(np.sqrt(np.mean(np.square(noise)))) or 1.0
    return noise * np.float32(10.0 ** (level_db / 20.0) / rms)

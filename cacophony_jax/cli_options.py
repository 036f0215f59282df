"""The command line's shared option definitions (`cacophony_jax.cli` builds the commands).

One-line argument errors, positive counts, the `--window-seconds` and decoding options,
and the per-command `--quiet`/`--debug` switches.
"""

from __future__ import annotations

import argparse

from cacophony_jax.audio.files import AUDIO_EXTENSIONS


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the --help to read."""

    def error(self, message: str) -> None:  # one line, not a usage dump
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _whole(text: str, low: int, high: float, expected: str) -> int:
    """`text` as a whole number in [low, high], else argparse's error "expected ..."."""
    digits = text.strip()
    if digits.lstrip("-").isdigit() and low <= int(digits) <= high:
        return int(digits)
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return _whole(text, 1, float("inf"), "a positive integer")


def non_negative(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    return _whole(text, 0, float("inf"), "a whole number of 0 or more")


def seed(text: str) -> int:
    """An argparse type: a sampling seed, as JAX's 32-bit keys hold it."""
    from cacophony_jax.inference import SEED_MAX, SEED_MIN

    return _whole(text, SEED_MIN, SEED_MAX,
                  f"a seed in [{SEED_MIN}, 2**32 - 1] (JAX's keys hold 32 bits)")


def window_seconds(text: str) -> float | None:
    """An argparse type: a window length in seconds; 0 means the bundle's (None)."""
    from cacophony_jax.inference_runtime import MAX_WINDOW_SECONDS, MIN_WINDOW_SECONDS

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value == 0:
        return None  # the bundle's window, as for eval
    if not MIN_WINDOW_SECONDS <= value <= MAX_WINDOW_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} must be between {MIN_WINDOW_SECONDS:g} "
                                         f"and {MAX_WINDOW_SECONDS:g} seconds, or 0 for the "
                                         "bundle's window")
    return value


def window_option(p: argparse.ArgumentParser, what: str) -> None:
    """Adds --window-seconds; `what` says what the window is for."""
    p.add_argument("--window-seconds", type=window_seconds, metavar="S",
                   help=f"{what} (default or 0: the bundle's training clip length; 30: "
                        "clips of up to 30 s in one pass, as the released code; memory grows "
                        "with the square of S)")


def extensions(text: str) -> list[str]:
    """"wav,.flac" -> ["wav", "flac"]."""
    return [e.strip().lstrip(".") for e in text.split(",") if e.strip()]


def add_command(sub, name: str, func, summary: str, examples: str) -> argparse.ArgumentParser:
    """Adds the command `name` (run by `func`) with its summary, examples and switches."""
    p = sub.add_parser(name, help=summary, description=summary,
                       epilog="examples:\n" + examples,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    # Both also accepted before the command name; SUPPRESS keeps one given there.
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress line")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks of errors")
    return p


def audio_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    """Adds --batch-size (default `batch_size`), --workers and --extensions."""
    p.add_argument("--batch-size", type=positive, default=batch_size,
                   help="clips per model call")
    p.add_argument("--workers", type=positive, default=4, help="threads decoding audio")
    p.add_argument("--extensions", default=",".join(AUDIO_EXTENSIONS),
                   help="suffixes collected from folders (default: %(default)s)")


def decoding_options(p: argparse.ArgumentParser, method: str) -> None:
    """Adds the caption decoding options (default method `method`)."""
    p.add_argument("--method", choices=("greedy", "beam", "sample"), default=method)
    p.add_argument("--beam-size", type=positive, default=4)
    p.add_argument("--length-penalty", type=float, default=0.0, metavar="P",
                   help="beam: rank beams by log-probability / length**P (default 0: "
                        "summed log-probability; 1 favours longer captions)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--max-len", type=positive, default=None,
                   help="tokens per caption at most (default: the bundle's text length)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed")

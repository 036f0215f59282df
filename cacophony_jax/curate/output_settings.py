"""What `curate clean` and `curate caption` record next to their output: the settings
the rows depend on, in ``OUTPUT.settings.json`` (``OUTPUT.partial.settings.json`` for
the partial output of an --overwrite run, until that replaces the output), and the
check that refuses to continue an output begun with other settings.

`curate caption`'s settings are the bundle (fingerprint), its tokenizer and the
decoding options (`decoding_settings`); `curate clean`'s the backend and, for the
language model, its model, server and temperature.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from absl import logging

from cacophony_jax.curate import resume


class SettingsError(resume.OutputError):
    """An output begun with other settings, or not by the tool that continues it."""


def settings_path(output_path: str) -> str:
    """The file that records the settings `output_path` was written with."""
    return f"{output_path}.settings.json"


def decoding_settings(model: Any, num_captions: int, method: str, beam_size: int,
                      temperature: float, max_len: int | None, seed: int,
                      length_penalty: float) -> dict[str, Any]:
    """What the captions of a `curate caption` run depend on: the bundle (fingerprint),
    its tokenizer and the decoding options that apply (a seed only when a caption is
    sampled, the bundle's text length for max_len None)."""
    from cacophony_jax import embedding_index

    path = getattr(model, "bundle_path", "")
    sampled = num_captions > 1 or method == "sample"
    return {"bundle": embedding_index.bundle_fingerprint(path) if path else "",
            "tokenizer": embedding_index.tokenizer_fingerprint(model),
            "num_captions": num_captions, "method": method,
            "beam_size": beam_size if method == "beam" else None,
            "temperature": temperature if sampled else None,
            "max_len": max_len or getattr(model, "text_length", None),
            "seed": seed if sampled else None,
            "length_penalty": length_penalty if method == "beam" else None}


def caption_earlier(bundle_path: str) -> Callable[[dict, dict], dict]:
    """How `curate caption` reads settings written by earlier versions: a setting they
    did not record gets the value they used; a bundle fingerprint taken over every file
    of the folder (as they did) that still matches is today's; a seed recorded where
    nothing was sampled, or max_len None, meant what today's None / text length mean."""
    def earlier(before: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        before = {"length_penalty": 0.0 if settings["method"] == "beam" else None,
                  **before}
        if settings["seed"] is None:
            before["seed"] = None
        if before.get("max_len") is None:
            before["max_len"] = settings["max_len"]
        if bundle_path and before.get("bundle") not in ("", settings["bundle"]):
            from cacophony_jax import embedding_index

            if before["bundle"] == embedding_index.bundle_fingerprint(bundle_path,
                                                                      every_file=True):
                before["bundle"] = settings["bundle"]
        return before
    return earlier


def record(writing: str, settings: dict[str, Any]) -> None:
    """Writes the settings next to the file the rows go to (an --overwrite run's
    partial output until it is complete)."""
    from cacophony_jax import atomic_write

    atomic_write.write_text(settings_path(writing), json.dumps(settings, indent=1))


def follow(output_path: str, writing: str) -> None:
    """After the partial output `writing` replaced `output_path`, its settings follow."""
    if writing != output_path:
        os.replace(settings_path(writing), settings_path(output_path))


def _first_row(path: str) -> dict[str, Any] | None:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return None
                return row if isinstance(row, dict) else None
    return None


def _has_rows(path: str) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def check_settings(output_path: str, settings: dict[str, Any], overwrite: bool, *,
                   tool: str, redo: str, row_key: str,
                   earlier: Callable[[dict, dict], dict] | None = None) -> None:
    """Refuses to continue an output that other settings began.

    An output without a settings file whose first row has `row_key` (begun by a
    version that recorded none) is continued, with a warning: the run then records its
    own settings.

    Args:
      output_path: the output JSONL.
      settings: this run's settings.
      overwrite: the run writes a new output; then the rows it continues are those of
        an unfinished --overwrite run's partial output.
      tool: the command, for messages ("curate caption").
      redo: what --overwrite does, for messages ("caption every clip again").
      row_key: a key every row of the tool has and other manifests lack.
      earlier: reads a settings dict of an earlier version as this one would write it.

    Raises:
      SettingsError: the rows to continue were begun with other settings, or are not
        the tool's rows and have no settings file next to them.
    """
    partial = resume.partial_path(output_path)
    orphan = settings_path(partial)
    if not os.path.exists(partial) and os.path.exists(orphan):
        if os.path.isfile(output_path) and (os.path.getmtime(output_path)
                                            >= os.path.getmtime(orphan)):
            # The partial output replaced the output just before these settings could
            # follow it (rows are written after the settings): they are the output's.
            os.replace(orphan, settings_path(output_path))
        else:  # the partial output was deleted: the output is the old one
            os.remove(orphan)
    target = partial if overwrite else output_path
    if not overwrite and os.path.exists(partial) or not os.path.isfile(target) or (
            not _has_rows(target)):
        return  # resume.prepare_output names an unfinished --overwrite run
    fix = (f"delete {target} to start the new output again" if overwrite else
           f"pass --overwrite to {redo}, or choose another output")
    path = settings_path(target)
    if not os.path.exists(path):
        first = _first_row(target)
        if first is not None and row_key in first:
            logging.warning("%s has no %s (a version of cacophony_jax that kept none began "
                            "it): continuing it with this run's settings; if it was begun "
                            "with others, %s", target, path, fix)
            return
        if not overwrite:  # someone else's file: the safe way out first
            fix = "choose another output, or pass --overwrite to replace that file"
        raise SettingsError(f"{target} has rows but no {path}, and they are not {tool}'s "
                            f"rows (no {row_key!r}): {tool} did not begin it; nothing was "
                            f"changed: {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise SettingsError(f"{path} is unreadable ({e}); nothing was changed: {fix}") from None
    if earlier is not None:
        before = earlier(before, settings)
    differ = [f"{k} ({before.get(k)!r} before, {v!r} now)" for k, v in settings.items()
              if k in before and before[k] != v and (k != "bundle" or before[k] and v)]
    if differ:
        raise SettingsError(f"{target} was begun with another "
                            f"{'bundle' if differ[0].startswith('bundle') else 'setting'}: "
                            f"{', '.join(differ)}; its rows would mix the two. "
                            f"{fix[0].upper()}{fix[1:]}")

"""What `curate caption` records next to its output: the bundle and decoding settings
in ``OUTPUT.settings.json`` (``OUTPUT.partial.settings.json`` for the partial output of
an --overwrite run, until that replaces the output), and the check that refuses to
continue an output begun with others, or not begun by `curate caption` at all."""

from __future__ import annotations

import json
import os
from typing import Any

from cacophony_jax.curate import resume


class SettingsError(resume.OutputError):
    """An output another bundle or other settings began, or not `curate caption`'s."""


def settings_path(output_path: str) -> str:
    """The file that records which bundle and settings captioned `output_path`."""
    return f"{output_path}.settings.json"


def decoding_settings(model: Any, num_captions: int, method: str, beam_size: int,
                      temperature: float, max_len: int | None, seed: int,
                      length_penalty: float) -> dict[str, Any]:
    """What the captions of a run depend on: the bundle (fingerprint), its tokenizer
    and the decoding options that apply to `method`."""
    from cacophony_jax import embedding_index

    path = getattr(model, "bundle_path", "")
    return {"bundle": embedding_index.bundle_fingerprint(path) if path else "",
            "tokenizer": embedding_index.tokenizer_fingerprint(model),
            "num_captions": num_captions, "method": method,
            "beam_size": beam_size if method == "beam" else None,
            "temperature": temperature if num_captions > 1 or method == "sample" else None,
            "max_len": max_len, "seed": seed,
            "length_penalty": length_penalty if method == "beam" else None}


def _has_rows(path: str) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


# Settings that earlier versions did not record, with the value they decoded with.
_BEFORE_RECORDED = {"length_penalty": lambda settings: 0.0 if settings["method"] == "beam"
                    else None}


def _earlier(before: dict[str, Any], settings: dict[str, Any], bundle_path: str) -> dict:
    """`before` as this version would have written it: settings it did not record get
    the value it used, and a bundle fingerprint taken over every file of the folder (as
    earlier versions did) that still matches is replaced by today's."""
    before = {**{k: f(settings) for k, f in _BEFORE_RECORDED.items()}, **before}
    if bundle_path and before.get("bundle") not in ("", settings["bundle"]):
        from cacophony_jax import embedding_index

        if before["bundle"] == embedding_index.bundle_fingerprint(bundle_path,
                                                                  every_file=True):
            before["bundle"] = settings["bundle"]
    return before


def check_settings(output_path: str, settings: dict[str, Any], overwrite: bool,
                   bundle_path: str = "") -> None:
    """Refuses to continue an output that another bundle or other settings began.

    Args:
      output_path: the output JSONL.
      settings: this run's `decoding_settings`.
      overwrite: the run writes a new output; then the rows it continues are those of
        an unfinished --overwrite run's partial output.
      bundle_path: the bundle's folder (to recognise a fingerprint an earlier version
        took over every file of the folder).

    Raises:
      SettingsError: the rows to continue were begun with other settings, or have no
        settings file next to them (so `curate caption` did not begin them).
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
           "pass --overwrite to caption every clip again, or choose another output")
    path = settings_path(target)
    if not os.path.exists(path):
        raise SettingsError(f"{target} has rows but no {path}: curate caption did not begin "
                            f"it (or its settings file was deleted, or a version of "
                            f"cacophony_jax that kept none began it); nothing was changed: "
                            f"{fix}")
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise SettingsError(f"{path} is unreadable ({e}); nothing was changed: {fix}") from None
    before = _earlier(before, settings, bundle_path)
    differ = [f"{k} ({before.get(k)!r} before, {v!r} now)" for k, v in settings.items()
              if k in before and before[k] != v and (k != "bundle" or before[k] and v)]
    if differ:
        raise SettingsError(f"{target} was begun with another "
                            f"{'bundle' if differ[0].startswith('bundle') else 'setting'}: "
                            f"{', '.join(differ)}; its rows would mix the two. "
                            f"{fix[0].upper()}{fix[1:]}")

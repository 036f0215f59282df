"""Dataset building: merge, content-hash dedup, eval-set exclusion, filters, resume."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile

from cacophony_jax.curate import build, build_inputs, hashing
from cacophony_jax.curate.build_inputs import BuildError
from cacophony_jax.data.array_record import ArrayRecordSource
from cacophony_jax.data.array_record_write import write_array_record


def _clip(seed, seconds=1.0):
    return np.random.default_rng(seed).integers(-3000, 3000, int(16000 * seconds)).astype(
        np.int16)


def _write(path, audio, fmt="WAV"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, audio, 16000, format=fmt, subtype="PCM_16")


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def corpus(tmp_path):
    """Two manifests and a Clotho-layout evaluation set over overlapping audio."""
    a, b, ev = tmp_path / "a", tmp_path / "b", tmp_path / "clotho"
    _write(a / "dog.wav", _clip(1))
    _write(a / "rain.wav", _clip(2))
    _write(a / "short.wav", _clip(3, 0.25))
    _write(a / "long.wav", _clip(4, 3.0))
    _write(a / "leak.wav", _clip(5))  # also in the evaluation set
    _write(a / "eval_id.wav", _clip(6))  # excluded by id
    _write(a / "hashed.wav", _clip(7))  # excluded by hash
    (a / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    _jsonl(a / "m.jsonl", [
        {"audio": "dog.wav", "id": "dog", "captions": ["a dog barks"], "label": "dog"},
        {"audio": "rain.wav", "caption": "rain", "synthetic_captions": ["rain falling"]},
        {"audio": "short.wav", "caption": "short"},
        {"audio": "long.wav", "caption": "long"},
        {"audio": "leak.wav", "caption": "leak"},
        {"audio": "eval_id.wav", "caption": "eval"},
        {"audio": "hashed.wav", "caption": "hashed"},
        {"audio": "broken.wav", "caption": "broken"},
        {"audio": "gone.wav", "caption": "gone"},
        "{not json",
    ])
    _write(b / "dog_copy.flac", _clip(1), fmt="FLAC")  # the same samples as a/dog.wav
    _write(b / "new.wav", _clip(8))
    with open(b / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["audio", "caption", "label"],
                                 ["dog_copy.flac", "barking", "bell"],
                                 ["dog_copy.flac", "a dog barks", ""],
                                 ["new.wav", "something new", "bell"]])
    _write(ev / "evaluation" / "leak.wav", _clip(5))
    with open(ev / "clotho_captions_evaluation.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name"] + [f"caption_{k}" for k in range(1, 6)],
                                 ["leak.wav", "x", "x", "x", "x", "x"]])
    (tmp_path / "ids.txt").write_text("# evaluation ids\neval_id.flac\n")
    (tmp_path / "hashes.txt").write_text(hashing.audio_hash(_clip(7)).upper() + "\n")
    return tmp_path


def _build(corpus, out, **options):
    return build.run_build(
        [("a", str(corpus / "a" / "m.jsonl")), ("b", str(corpus / "b" / "m.csv"))], str(out),
        exclude_ids=build_inputs.read_lines(str(corpus / "ids.txt"), "ids"),
        exclude_hashes=build_inputs.read_lines(str(corpus / "hashes.txt"), "hashes"),
        exclude_sources=[f"clotho:{corpus / 'clotho'}"], min_seconds=0.5, max_seconds=2.0,
        workers=2, num_shards=2, **options)


def test_build_merges_dedups_excludes_and_filters(corpus):
    out = corpus / "out"
    summary = _build(corpus, out)
    a, b = summary["sources"]["a"], summary["sources"]["b"]
    assert (a["clips"], a["too_short"], a["too_long"], a["overlap"], a["unreadable"],
            a["missing"], a["bad_rows"]) == (2, 1, 1, 3, 1, 1, 1)
    assert (b["clips"], b["duplicate"], b["overlap"]) == (1, 1, 0)
    assert a["captions"] == 2 and a["synthetic_captions"] == 1
    assert b["captions"] == 1 + 1  # "barking" merged into a/dog ("a dog barks" is there)
    assert a["hours"] == pytest.approx(2 / 3600)
    assert summary["total"]["clips"] == 3 and summary["total"]["duplicate"] == 1
    assert summary["class_names"] == ["dog", "bell"]

    source = ArrayRecordSource(out, "train")
    records = {source[i]["id"]: source[i] for i in range(len(source))}
    assert list(records) == ["a/dog", "a/rain.wav", "b/new.wav"]
    dog = records["a/dog"]
    assert dog["captions"] == ["a dog barks", "barking"] and dog["labels"] == [0, 1]
    np.testing.assert_array_equal(dog["audio"], _clip(1))
    assert records["a/rain.wav"]["synthetic_captions"] == ["rain falling"]
    assert records["b/new.wav"]["labels"] == [1]

    hashes = (out / "train_hashes.txt").read_text().split()
    assert hashes == [hashing.audio_hash(_clip(k)) for k in (1, 2, 8)]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["train"]["total"]["clips"] == 3
    table = (out / "summary.md").read_text()
    assert "| a | 2 | 0.00 | 2 | 1 | 0 | 3 | 1 | 1 | 1 | 1 | 1 |" in table
    assert "| **total** | 3 |" in table


def test_rerun_uses_the_hash_cache_and_resumes(corpus, monkeypatch):
    decoded = []
    real = hashing.load_audio
    monkeypatch.setattr(hashing, "load_audio", lambda path: decoded.append(path) or real(path))

    def interrupt(label, done, total):
        if label == "hash a" and done == 3:
            raise KeyboardInterrupt

    out = corpus / "out"
    with pytest.raises(KeyboardInterrupt):
        _build(corpus, out, progress=interrupt)
    assert not (out / "dataset_info.json").exists()  # nothing half-written is visible
    first = len(decoded)
    assert first >= 4  # the evaluation clip and a's first three
    seen = []
    _build(corpus, out, progress=lambda *a: seen.append(a))
    # Over both runs every one of the 11 files is decoded exactly once: the rerun decodes
    # only what the first had not reached (a file found unreadable is cached as such).
    assert len(decoded) == len(set(decoded)) == 11
    assert ("hash a", 9, 9) in seen and ("hash b", 2, 2) in seen
    decoded.clear()
    summary = _build(corpus, out, split="again")
    assert decoded == [] and summary["total"]["clips"] == 3
    assert set(json.loads((out / "summary.json").read_text())) == {"train", "again"}


def test_array_record_input_and_default_split(corpus):
    out = corpus / "out"
    _build(corpus, out)
    again = build.run_build([("prev", f"array_record:{out}:train"),
                             ("a", f"manifest:{corpus / 'a' / 'm.jsonl'}")],
                            str(corpus / "out2"), workers=2)
    assert again["sources"]["prev"]["clips"] == 3
    # a's clips that survived the first build are duplicates now; the others are new.
    assert again["sources"]["a"]["duplicate"] == 2 and again["sources"]["a"]["clips"] == 5
    source = ArrayRecordSource(corpus / "out2", "train")
    assert source[0]["id"] == "prev/a/dog" and source[0]["labels"] == [0, 1]
    assert source.class_names == ("dog", "bell")


def test_one_id_for_two_clips_is_refused_before_anything_is_written(corpus, caplog):
    a, out = corpus / "a", corpus / "out"
    _jsonl(a / "ids.jsonl", [{"audio": "dog.wav", "id": "x"}, {"audio": "rain.wav", "id": "y"},
                             {"audio": "dog.wav", "id": "x"},  # the same clip: merged
                             {"audio": "rain.wav", "id": "x"}])
    with pytest.raises(BuildError, match=r"input a=.*ids\.jsonl gives id 'x' to two "
                                         r"different clips \(lines 1 and 4\)"):
        build.run_build([("a", str(a / "ids.jsonl"))], str(out))
    assert not out.exists()
    # Inline audio (an older build's split) is told apart by its hash.
    old = corpus / "old"
    write_array_record([{"id": "x", "captions": ["c"], "synthetic_captions": [], "labels": [],
                         "audio": _clip(k)} for k in (1, 2)], str(old), "train", 1, [])
    with pytest.raises(BuildError, match=r"gives id 'x' to two different clips \(clips 1 "
                                         r"and 2\)"):
        build.run_build([("old", f"array_record:{old}")], str(out))
    assert not (out / "dataset_info.json").exists()
    # A clip under one patch (0.15 s) is dropped and counted even without --min-seconds.
    _write(a / "blip.wav", _clip(9, 0.05))
    _jsonl(a / "blip.jsonl", [{"audio": "blip.wav", "id": "b", "caption": "a blip"},
                              {"audio": "dog.wav", "id": "d", "caption": "a dog"}])
    summary = build.run_build([("a", str(a / "blip.jsonl"))], str(corpus / "blip"))
    assert len(ArrayRecordSource(str(corpus / "blip"), "train")) == 1
    assert "too_short" in json.dumps(summary) and '"too_short": 1' in json.dumps(summary)
    # A second split sharing clips with the first is warned about, with the fix.
    _jsonl(a / "val.jsonl", [{"audio": "dog.wav", "id": "d", "caption": "a dog"}])
    with caplog.at_level("WARNING"):
        build.run_build([("a", str(a / "val.jsonl"))], str(corpus / "blip"), split="val")
    assert "1 clip(s) of split 'val' are also in split 'train'" in caplog.text
    assert "--exclude-hashes" in caplog.text
    # One file named two ways ("dog.wav", "./dog.wav") is one clip, merged as before.
    _jsonl(a / "same.jsonl", [{"audio": "dog.wav", "id": "x", "caption": "one"},
                              {"audio": "./dog.wav", "id": "x", "caption": "two"}])
    summary = build.run_build([("a", str(a / "same.jsonl"))], str(corpus / "same"))
    assert len(ArrayRecordSource(str(corpus / "same"), "train")) == 1, summary


def test_user_errors(corpus):
    out = corpus / "out"
    manifest = str(corpus / "a" / "m.jsonl")
    with pytest.raises(BuildError, match="no inputs"):
        build.run_build([], str(out))
    with pytest.raises(BuildError, match="unique"):
        build.run_build([("a", manifest), ("a", manifest)], str(out))
    with pytest.raises(BuildError, match="neither a manifest"):
        build.run_build([("a", str(corpus / "a" / "dog.wav"))], str(out))
    with pytest.raises(BuildError, match="unknown source kind 'cloto'"):
        build.run_build([("a", "cloto:x")], str(out))
    with pytest.raises(BuildError, match="min-seconds"):
        build.run_build([("a", manifest)], str(out), min_seconds=3, max_seconds=1)
    with pytest.raises(BuildError, match="no clip is left"):
        build.run_build([("a", manifest)], str(out), min_seconds=100)
    with pytest.raises(BuildError, match="cannot read the ids file"):
        build_inputs.read_lines(str(corpus / "nope.txt"), "ids")
    with pytest.raises(BuildError, match="--workers must be at least 1"):
        build.run_build([("a", manifest)], str(out), workers=0)
    _build(corpus, out)
    with pytest.raises(BuildError, match="already holds split 'train'.*--overwrite"):
        _build(corpus, out)
    hashes = (out / "train_hashes.txt").read_text()
    # --overwrite rebuilds it: a's clips without the filters now; the hash list follows.
    build.run_build([("a", str(corpus / "a" / "m.jsonl"))], str(out), workers=2,
                    overwrite=True)
    assert len(ArrayRecordSource(out, "train")) == 7 != len(hashes.split())
    assert len((out / "train_hashes.txt").read_text().split()) == len(
        ArrayRecordSource(out, "train"))


def test_an_overwrite_killed_before_its_commit_keeps_the_old_hash_list_and_summary(
        corpus, monkeypatch):
    out = corpus / "out"
    _build(corpus, out)
    before = {name: (out / name).read_text()
              for name in ("train_hashes.txt", "summary.json", "summary.md")}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "write_summary", killed)  # the last step before the commit
    with pytest.raises(KeyboardInterrupt):
        build.run_build([("a", str(corpus / "a" / "m.jsonl"))], str(out), workers=2,
                        overwrite=True)
    # The old split is still the readable one, and still described by its own files
    # (another build's --exclude-hashes must not get a list of another split).
    assert len(ArrayRecordSource(out, "train")) == len(before["train_hashes.txt"].split())
    assert {name: (out / name).read_text() for name in before} == before
    assert not [name for name in os.listdir(out) if name.startswith(".incomplete")]


def test_a_later_split_shares_the_labels_and_bad_settings_stop_before_hashing(
        corpus, monkeypatch):
    out = corpus / "out"
    seen = []
    _build(corpus, out, progress=lambda label, done, total: seen.append((label, done, total)))
    assert ("write train", 3, 3) in seen  # the write pass reports too, not only hashing
    (out / ".incomplete-val-x1").mkdir()  # left by a killed write
    # b's labels are only "bell": the split keeps train's order (dog, bell).
    build.run_build([("b", str(corpus / "b" / "m.csv"))], str(out), split="val", workers=2)
    val = ArrayRecordSource(out, "val")
    assert val.class_names == ("dog", "bell") and val[0]["labels"] == [1]
    assert not (out / ".incomplete-val-x1").exists()
    monkeypatch.setattr(build.hashing, "hash_source", lambda *a, **k: pytest.fail("hashed"))
    with pytest.raises(BuildError, match="may only use letters"):
        build.run_build([("b", str(corpus / "b" / "m.csv"))], str(out), split="dev-clean")
    new_class = corpus / "new.jsonl"
    new_class.write_text('{"audio": "a/dog.wav", "caption": "x", "label": "cat"}\n')
    with pytest.raises(BuildError, match=r"this split adds \['cat'\]"):
        build.run_build([("n", str(new_class))], str(out), split="test")


def test_cli_build(corpus, capsys):
    from cacophony_jax import cli

    out = corpus / "cli_out"
    code = cli.main(["curate", "build", "--input", f"a={corpus / 'a' / 'm.jsonl'}",
                     "--input", f"b={corpus / 'b' / 'm.csv'}", "--exclude-source",
                     f"clotho:{corpus / 'clotho'}:evaluation", "--exclude-ids",
                     str(corpus / "ids.txt"), "--min-seconds", "0.5", "--out", str(out),
                     "--num-shards", "1", "--quiet"])
    printed = capsys.readouterr().out
    # Kept now: long.wav (no --max-seconds) and hashed.wav (no --exclude-hashes).
    assert code == 0 and "| **total** | 5 |" in printed
    assert len(ArrayRecordSource(out, "train")) == 5
    assert cli.main(["curate", "build", "--input", "oops", "--out", str(out)]) == 2
    assert "error: --input 'oops' must be NAME=PATH" in capsys.readouterr().err



def test_exclusion_lists_with_a_bom_and_wrong_hash_lists(corpus):
    # Windows Notepad starts the file with a byte-order mark: no part of the first id.
    (corpus / "bom.txt").write_bytes(b"\xef\xbb\xbfeval_id.flac\r\n")
    assert build_inputs.read_lines(str(corpus / "bom.txt"), "ids") == {"eval_id.flac"}
    (corpus / "bom_hashes.txt").write_bytes(b"\xef\xbb\xbf"
                                            + hashing.audio_hash(_clip(7)).encode() + b"\n")
    assert build_inputs.check_hashes(build_inputs.read_lines(str(corpus / "bom_hashes.txt"),
                                                             "hashes"))
    from cacophony_jax import cli

    manifest = str(corpus / "a" / "m.jsonl")
    with pytest.raises(BuildError, match=r"--exclude-hashes .*ids.txt: 1 entry is not an "
                                         r"audio hash, e.g. 'eval_id.flac'; .*64 hex digits"):
        cli.main(["curate", "build", "--debug", "--input", f"a={manifest}", "--exclude-hashes",
                  str(corpus / "ids.txt"), "--out", str(corpus / "o"), "--quiet"])
    with pytest.raises(BuildError, match="not an audio hash"):
        build.run_build([("a", manifest)], str(corpus / "o"), exclude_hashes=["dog.wav"])
    assert not (corpus / "o").exists()


def test_non_finite_durations_are_refused(corpus):
    manifest = str(corpus / "a" / "m.jsonl")
    for options in (dict(min_seconds=float("nan")), dict(max_seconds=float("nan")),
                    dict(min_seconds=float("inf"))):
        with pytest.raises(BuildError, match="must be finite numbers"):
            build.run_build([("a", manifest)], str(corpus / "o"), **options)


def test_an_out_folder_of_other_files_is_refused_unchanged(corpus):
    manifest = str(corpus / "a" / "m.jsonl")
    out = corpus / "mine"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    (out / "summary.md").write_text("my notes")
    with pytest.raises(BuildError, match=r"--out .*mine is a folder with other files and no "
                                         r"build in it .*new or empty folder"):
        build.run_build([("a", manifest)], str(out), workers=2)
    assert sorted(os.listdir(out)) == ["summary.json", "summary.md"]
    assert (out / "summary.md").read_text() == "my notes"
    # A build's folder with a summary.json it did not write is refused before any work.
    built = corpus / "built"
    build.run_build([("a", manifest)], str(built), workers=2)
    (built / "summary.json").write_text('{"train": true}')
    with pytest.raises(BuildError, match=r"summary.json is not a build summary .*move it"):
        build.run_build([("a", manifest)], str(built), split="val", workers=2)
    assert not os.path.exists(built / "val_hashes.txt")
    # An empty folder (hidden files and a mount point's lost+found count as none), or
    # an interrupted build's, is fine.
    (corpus / "empty" / "lost+found").mkdir(parents=True)
    (corpus / "empty" / ".gitkeep").write_text("")
    assert build.run_build([("a", manifest)], str(corpus / "empty"), workers=2)["total"]


def test_a_layout_input_names_its_split_or_folds(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(build_inputs, "open_source",
                        lambda kind, path, split, **options: opened.append((kind, path, split)))
    for spec in ("esc50:data/ESC-50:fold1", "esc50:data/ESC-50:fold1,3",
                 "urbansound8k:data/us8k:folds1-4", "clotho:data/clotho"):
        build_inputs.open_input(spec, default_split="evaluation")
    assert opened == [("esc50", "data/ESC-50", "fold1"), ("esc50", "data/ESC-50", "fold1,3"),
                      ("urbansound8k", "data/us8k", "folds1-4"),
                      ("clotho", "data/clotho", "evaluation")]


def test_a_file_unreadable_for_want_of_permission_is_read_once_it_may_be(corpus, monkeypatch):
    # `chmod` leaves a file's size and modification time alone, so a cached "not
    # readable; check its permissions" would outlive the fix it asks for.
    from cacophony_jax.audio import io

    dog = str(corpus / "a" / "dog.wav")
    manifest = str(corpus / "a" / "m.jsonl")
    real = os.access
    monkeypatch.setattr(io.os, "access", lambda p, mode: str(p) != dog and real(p, mode))
    summary = build.run_build([("a", manifest)], str(corpus / "out"), workers=2)
    assert summary["sources"]["a"]["unreadable"] == 2
    monkeypatch.setattr(io.os, "access", real)
    summary = build.run_build([("a", manifest)], str(corpus / "out"), split="again", workers=2)
    assert summary["sources"]["a"]["unreadable"] == 1
    assert "a/dog" in {r["id"] for r in ArrayRecordSource(corpus / "out", "again").iter_metadata()}


def test_exclusion_ids_match_whatever_unicode_form_the_names_are_in(corpus):
    # A list made on macOS spells "é" decomposed (NFD); the files may be NFC.
    a = corpus / "a"
    _write(a / "caf\u00e9.wav", _clip(9))
    _jsonl(a / "u.jsonl", [{"audio": "caf\u00e9.wav", "caption": "x"},
                           {"audio": "dog.wav", "caption": "a dog"}])
    (corpus / "nfd.txt").write_text("cafe\u0301.wav\n", encoding="utf-8")
    summary = build.run_build([("a", str(a / "u.jsonl"))], str(corpus / "out"), workers=2,
                              exclude_ids=build_inputs.read_lines(str(corpus / "nfd.txt"), "ids"))
    assert summary["sources"]["a"]["overlap"] == 1 and summary["sources"]["a"]["clips"] == 1


def test_a_manifest_name_in_the_other_unicode_form_is_built_not_missing(corpus):
    # Training reads such a file (audio/io.py), so curate build hashes it too.
    a = corpus / "a"
    _write(a / "caf\u00e9.wav", _clip(9))  # NFC on disk; the manifest spells it NFD
    _jsonl(a / "u.jsonl", [{"audio": "cafe\u0301.wav", "caption": "a cafe"}])
    summary = build.run_build([("a", str(a / "u.jsonl"))], str(corpus / "out"), workers=2)
    assert summary["sources"]["a"]["missing"] == 0 and summary["sources"]["a"]["clips"] == 1

"""Caption cleaning: the rule-based cleaner and the resumable JSONL driver (the LLM
backend is tested in test_curate_llm.py)."""

import json
import logging
import os
import time

import pytest

from cacophony_jax.curate import clean, llm, rules, rules_text, rules_words
from tests.helpers import read_jsonl, write_jsonl

# (title, tags, description, expected caption): realistic messy metadata.
RULE_EXAMPLES = [
    ("Dog_Bark_Distant_01.wav", "dog, bark, distant, zoom-h4n, field-recording, 96khz",
     "A dog barking in the distance at night in a small village. Recorded with a Zoom H4n, "
     "24bit/96kHz. Licensed under CC-BY 4.0, please credit me! More sounds at "
     "https://example.com/user",
     "A dog barking in the distance at night in a small village."),
    # Title only: format words and the recorder go, two salient tags are added.
    ("Rain on tin roof (stereo, 44.1kHz)", ["rain", "roof", "metal", "storm", "thunder",
                                            "TascamDR40"], "",
     "Rain on tin roof, with storm and thunder."),
    # Nothing audible in title or description: fall back to the tags ("rain" is
    # dropped next to "heavy rain"; "nature" and "2019" say nothing).
    ("IMG_2031", "thunder, rain, heavy rain, nature, 2019",
     "Recorded on my balcony on 2019-06-12 at 23:40. Zoom H5, XY capsule. "
     "CC0 - do whatever you want.",
     "The sound of thunder and heavy rain."),
    # Markup, shouting punctuation, emoji, hashtags and handles.
    ("Seagulls @ harbour", "#seagulls #birds #sea",
     "<p>Seagulls screaming over the harbour while waves crash against the pier!!! \U0001f642 "
     "#nature @john_doe</p>",
     "Seagulls screaming over the harbour while waves crash against the pier."),
    # Lead-in, a trailing "recorded ..." clause, a take number; a count of sources stays.
    ("farm morning", "",
     "Field recording of 3 dogs barking and a rooster crowing on a farm, recorded at 5am "
     "with my Sony PCM-M10. Take 2.",
     "3 dogs barking and a rooster crowing on a farm."),
    ("KITCHEN", "", "FRYING ONIONS IN A PAN, OIL SIZZLING LOUDLY (RECORDED WITH ZOOM H6 AT "
     "48KHZ)", "Frying onions in a pan, oil sizzling loudly."),
    # A greeting is not a caption; "St." does not end the sentence.
    ("ChurchBells_Sunday", "bells, church, sunday",
     "Hi everyone! These are the bells of St. Mary's church ringing at noon on a Sunday. "
     "Enjoy!", "The bells of St. Mary's church ringing at noon on a Sunday."),
    # Sentences about the upload are passed over for the first one about a sound.
    ("", "", "Note: this was recorded in 2019. Any feedback is welcome. Heavy rain on a car "
     "roof.", "Heavy rain on a car roof."),
    # "zoom" the verb is not the recorder.
    ("Zoom recording", "", "A car zooms past on a wet road, then silence.",
     "A car zooms past on a wet road, then silence."),
    # Long sentences are cut at a comma.
    ("Trainstation", "train, station, announcement, crowd",
     "Busy train station in Munich with announcements, people talking, footsteps and trains "
     "arriving and departing on several platforms while a pigeon flutters overhead.",
     "Busy train station in Munich with announcements, people talking."),
    # Upload-page wording: quality tags and offers (not "breaks free").
    ("white noise static #2 [HD] FREE DOWNLOAD", "", "", "White noise static."),
    # A kind of noise is a sound; "noise" alone is a category.
    ("Pink noise 10 minutes", "noise", "", "Pink noise."),
    ("Noise", "", "Harsh noise from a broken amp.", "Harsh noise from a broken amp."),
    ("Dog barking loudly (HQ) - 320kbps - FREE SFX", "", "", "Dog barking loudly."),
    ("", "", "A bird breaks free from a cage, royalty-free, 1080p.",
     "A bird breaks free from a cage."),
]


@pytest.mark.parametrize(("title", "tags", "description", "expected"), RULE_EXAMPLES)
def test_rules_compose_caption(title, tags, description, expected):
    assert rules.compose_caption(title, description, tags) == expected


def test_rules_return_none_when_nothing_is_audible():
    caption = rules.compose_caption(
        "untitled_001.wav", "Recorded with Tascam DR-40 at 24/96. Licence: CC-BY. Visit "
        "www.mysite.org or mail me at foo@bar.com", "zoom h4n, 96khz, stereo, wav")
    assert caption is None


def test_rules_helpers():
    assert rules_text.split_tags("Dog-Bark, field_recording; #rain, 24bit, ZoomH4n, ,") == [
        "dog bark", "rain"]
    assert rules_text.split_tags("#seagulls #birds") == ["seagulls", "birds"]
    assert rules_text.scrub("<b>Rain</b> &amp; wind by @bob, see http://x.org/a or mail a@b.com") \
        == "Rain & wind by, see or mail"
    assert rules_words.has_sound("dogs barking") and not rules_words.has_sound("my new camera")


# Odd metadata that took seconds each while patterns were retried from every character
# of a long run, or dangling words were stripped one per pass over the whole text.
ODD_METADATA = ["a." * 5000, "( " * 5000 + "dog", "a" * 5000 + "@", "a-" * 5000 + ".wav",
                "dog " + "with " * 5000, "<" * 5000, "a.a" * 2000 + "@x.com",
                "zoom" + " " * 5000 + "h4", "dog" + " " * 5000 + "- barks", "1, " * 3000]


def test_rules_take_linear_time_on_odd_metadata():
    start = time.perf_counter()
    for text in ODD_METADATA:
        rules.compose_caption(text, text, text)
        rules.compose_caption("", "", [text, text])
        rules_text.scrub(text)  # what the LLM backend sees: the whole field
    # About 0.3 s on a 2-core CPU; the quadratic versions took over a minute in all, so
    # the generous bound only fails on a return to them, not on a slow machine.
    assert time.perf_counter() - start < 15.0


def test_rules_cut_long_fields_and_strip_dangling_words():
    assert rules.compose_caption("", "A dog barks. " + "x" * 3 * rules.MAX_FIELD_CHARS,
                                 None) == "A dog barks."
    assert rules.compose_caption("", "x " * rules.MAX_FIELD_CHARS + "A dog barks.", None) \
        is None  # past the cut
    assert rules.compose_caption("", "dog " + "with " * 100, None) == "Dog."
    assert rules_text.clean_text("with and rain on the roof of the") == "rain on the roof"
    assert rules_text.clean_text("rain on the roof. with the") == "rain on the roof."

@pytest.mark.parametrize(("description", "expected"), [
    ("( ( dog barks", "Dog barks."), ("[ dog barks", "Dog barks."),
    ("dog barks) loudly]", "Dog barks loudly."), ("( " * 22 + "dog barks", "Dog barks."),
    ("dog barks (far away", "Dog barks far away."),
    ("dog barks (far away)", "Dog barks (far away)."),
    ("dog barks [far (away] now", "Dog barks far away now."),
])
def test_rules_drop_unmatched_brackets(description, expected):
    assert rules.compose_caption("", description, None) == expected


def test_rules_caption_names_a_sound_after_the_cut():
    # The only sound word lies past the 20-word cut: the next candidate is taken.
    long = "quite " * 25 + "a dog barks."
    assert rules.compose_caption("", long + " Birds sing.", None) == "Birds sing."
    assert rules.compose_caption("Rain on roof", long, None) == "Rain on roof."
    assert rules.compose_caption("", long, "thunder") == "The sound of thunder."
    assert rules.compose_caption("", long, None) is None

def test_rules_backend_reports_bad_rows(tmp_path, caplog):
    src = tmp_path / "in" / "raw.jsonl"
    src.parent.mkdir()
    write_jsonl(src, [
        {"id": "a", "audio": "clips/a.flac", "title": "Dog barking", "tags": "dog",
         "description": "", "user": "bob"},
        '{"audio": "clips/b.flac", "title": ',  # line 2: cut-off JSON
        {"title": "Rain", "tags": ["rain"]},  # line 3: no audio
        "",  # blank: ignored
        {"audio": "clips/c.flac", "title": "x", "tags": 5},  # line 5: bad tags
        {"audio": "clips/d.flac", "title": "IMG_0001", "tags": "stereo",
         "description": "Recorded with a Zoom H6."},  # line 6: nothing audible
        {"id": "a", "audio": "clips/e.flac", "title": "Cat meowing"},  # line 7: duplicate
        {"id": 7, "audio": "/abs/f.wav", "title": "Thunder_roll.wav"},
        {"audio": "clips/g.flac", "title": " ", "tags": []},  # line 9: nothing to read
    ])
    out = tmp_path / "out" / "manifest.jsonl"
    with caplog.at_level(logging.WARNING):
        counts = clean.run_clean(str(src), str(out), progress=False)
    assert counts == dict(read=8, written=2, skipped=6, invalid=3, empty=2, duplicate=1,
                          rejected=0, resumed=0, cached=0, requested=0)
    for line in (2, 3, 5, 6, 7, 9):
        assert f"raw.jsonl line {line}:" in caplog.text
    assert "line 1:" not in caplog.text and "line 8:" not in caplog.text
    rows = read_jsonl(out)
    # Relative audio is rebased onto the output's folder; absolute stays.
    assert rows[0] == {"id": "a", "audio": "../in/clips/a.flac", "captions": ["Dog barking."],
                       "raw": {"title": "Dog barking", "tags": "dog", "description": "",
                               "user": "bob"}}
    assert rows[1]["id"] == "7" and rows[1]["audio"] == "/abs/f.wav"
    assert rows[1]["captions"] == ["Thunder roll."]


def test_rows_with_unicode_line_separators_and_a_bom_resume(tmp_path, caplog):
    # U+2028/U+2029/U+0085 stay unescaped in the output; only "\n" ends a row.
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": f"{k}.wav", "title": f"Rain{sep}on a roof {k}"}
                       for k, sep in enumerate(("\u2028", "\u2029", "\x85", " "))])
    # A byte-order mark is no bad row; a Latin-1 line is one, named, not a caption with
    # U+FFFD in it.
    src.write_bytes(b"\xef\xbb\xbf" + src.read_bytes()
                    + '{"audio": "5.wav", "title": "Caf\u00e9 noise"}\n'.encode("latin-1"))
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING):
        first = clean.run_clean(str(src), str(out), progress=False)
    assert first["written"] == 4 and first["invalid"] == 1
    assert "raw.jsonl line 5: not UTF-8 text (byte 0xe9 at byte 33)" in caplog.text
    assert "\u2028" in out.read_text(encoding="utf-8")
    again = clean.run_clean(str(src), str(out), progress=False)
    assert again["resumed"] == 4 and again["written"] == 0
    assert [r["id"] for r in read_jsonl(out)] == ["0.wav", "1.wav", "2.wav", "3.wav"]


def test_user_errors_are_clear(tmp_path, monkeypatch, capsys):
    with pytest.raises(clean.CleanError, match="does not exist"):
        clean.run_clean(str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl"))
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": "a.wav", "title": "Dog barking"}])
    with pytest.raises(clean.CleanError, match="unknown backend"):
        clean.run_clean(str(src), str(tmp_path / "o.jsonl"), backend="gpt")
    for var in (llm.ENV_BASE_URL, llm.ENV_MODEL, llm.ENV_API_KEY):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(clean.CleanError, match=llm.ENV_BASE_URL):
        clean.run_clean(str(src), str(tmp_path / "o.jsonl"), backend="llm", progress=False)
    with pytest.raises(clean.CleanError, match=llm.ENV_MODEL):
        clean.run_clean(str(src), str(tmp_path / "o.jsonl"), backend="llm",
                        base_url="http://127.0.0.1:1/v1", progress=False)
    url = "http://127.0.0.1:1/v1"
    for option, message in ((dict(workers=0), r"workers \(--workers\) must be at least 1"),
                            (dict(max_retries=-1), r"max_retries \(--max-retries\)"),
                            (dict(timeout_s=0.0), r"timeout_s \(--timeout\) must be positive"),
                            (dict(temperature=float("nan")), r"temperature .* got nan")):
        with pytest.raises(clean.CleanError, match=message):
            clean.run_clean(str(src), str(tmp_path / "o.jsonl"), backend="llm", base_url=url,
                            model="m", progress=False, **option)
    (tmp_path / "meta.csv").write_text("audio,title\na.wav,Dog\n")
    with pytest.raises(clean.CleanError, match="looks like a table; curate clean reads JSONL"):
        clean.run_clean(str(tmp_path / "meta.csv"), str(tmp_path / "o.jsonl"))
    for out in (tmp_path / "o.csv", tmp_path):
        with pytest.raises(clean.CleanError, match="must be a .jsonl file"):
            clean.run_clean(str(src), str(out))
    assert clean.main([str(src), str(tmp_path / "o.jsonl"), "--model", "m"]) == 2
    assert "--model only applies to --backend llm" in capsys.readouterr().err
    damaged = tmp_path / "damaged.jsonl"
    row = '{"id": "%s", "audio": "a.wav", "captions": [], "raw": {}}\n'
    damaged.write_text(row % "x" + "not json\n" + row % "y")
    with pytest.raises(clean.CleanError, match="line 2 is not a row of this tool"):
        clean.run_clean(str(src), str(damaged), progress=False)


def test_main_rules(tmp_path, capsys):
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": "a.wav", "title": "Owl_Hooting_Night.mp3", "tags": "owl"}])
    assert clean.main([str(src), str(tmp_path / "o.jsonl"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 1
    assert read_jsonl(tmp_path / "o.jsonl")[0]["captions"] == ["Owl hooting night."]
    assert clean.main([str(src), str(tmp_path / "o2.jsonl")]) == 0
    assert "clean: 1/1 rows (100%), written 1, skipped 0" in capsys.readouterr().err
    assert clean.main([str(tmp_path / "nope.jsonl"), str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_output_that_is_not_this_tools_manifest_is_left_unchanged(tmp_path):
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": "a.wav", "title": "Dog barking"}])
    user_files = {"meta.json": '{"important": "user data"}',  # no newline, valid JSON
                  "notes.jsonl": '{"id": "x", "audio": "x.wav", "captions": [], "raw": {}}\n'
                                 "some notes",
                  "other.jsonl": '{"id": "x"}\n{"id": "y"}\n',  # rows of another tool
                  "cut.jsonl": '{"important": "us',  # cut off, but not a row of this tool
                  # A complete object begun like a row, without the row's keys or newline.
                  "id_only.jsonl": '{"id": "x", "user": "important data"}'}
    for name, text in user_files.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(clean.CleanError, match=f"{name}( line .* is not a row of this "
                                                   "tool|.*they are not curate clean's rows)"
                                                   ".*--overwrite"):
            clean.run_clean(str(src), str(tmp_path / name), progress=False)
        assert (tmp_path / name).read_text() == text
    # A link to the input, or a second name of it, is the input.
    src.write_text('{"audio": "a.wav", "title": "Dog barking"}')  # no final newline
    before = src.read_bytes()
    (tmp_path / "link.jsonl").symlink_to("raw.jsonl")
    os.link(src, tmp_path / "hard.jsonl")
    for name in ("link.jsonl", "hard.jsonl"):
        with pytest.raises(clean.CleanError, match=f"{name} is the input"):
            clean.run_clean(str(src), str(tmp_path / name), progress=False)
    assert src.read_bytes() == before


def test_resume_keeps_a_complete_last_row_without_its_newline(tmp_path, caplog):
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": f"{k}.wav", "title": f"Dog barking {k}"} for k in range(3)])
    out = tmp_path / "out.jsonl"
    clean.run_clean(str(src), str(out), progress=False)
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:2]).rstrip("\n"))  # row 2 complete, its newline missing
    again = clean.run_clean(str(src), str(out), progress=False)
    assert again["resumed"] == 2 and again["written"] == 1 and out.read_text() == full
    out.write_text(lines[0][:12])  # killed while writing the first row
    with caplog.at_level(logging.WARNING):
        assert clean.run_clean(str(src), str(out), progress=False)["written"] == 3
    assert "dropping a partial last line" in caplog.text and out.read_text() == full


def test_folder_and_empty_inputs_are_refused(tmp_path):
    with pytest.raises(clean.CleanError, match="input .* is a folder; curate clean reads one "
                                               "JSONL file"):
        clean.run_clean(str(tmp_path), str(tmp_path / "o.jsonl"), progress=False)
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(clean.CleanError, match="input .*empty.jsonl is empty"):
        clean.run_clean(str(tmp_path / "empty.jsonl"), str(tmp_path / "o.jsonl"),
                        progress=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_an_output_is_only_continued_with_the_settings_it_was_begun_with(tmp_path, caplog):
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": f"{k}.wav", "title": f"Dog barking {k}"} for k in range(3)])
    out = tmp_path / "out.jsonl"
    clean.run_clean(str(src), str(out), progress=False)
    settings = tmp_path / "out.jsonl.settings.json"
    assert json.loads(settings.read_text()) == {"backend": "rules", "input": "raw.jsonl"}
    before = out.read_text()
    # Another backend would mix its captions with the rules' (refused before any request).
    with pytest.raises(clean.CleanError, match=r"begun with another setting: backend \('rules' "
                                               r"before, 'llm' now\).*--overwrite"):
        clean.run_clean(str(src), str(out), backend="llm", base_url="http://127.0.0.1:9/v1",
                        model="m", progress=False)
    other = tmp_path / "other.jsonl"
    other.write_bytes(src.read_bytes())
    with pytest.raises(clean.CleanError, match=r"input \('raw.jsonl' before, 'other.jsonl'"):
        clean.run_clean(str(other), str(out), progress=False)
    assert out.read_text() == before
    # An output of a version that kept no settings: continued, and its settings recorded.
    settings.unlink()
    with caplog.at_level(logging.WARNING):
        assert clean.run_clean(str(src), str(out), progress=False)["resumed"] == 3
    assert "has no" in caplog.text and settings.exists()
    # Sampled answers are cached per temperature; at 0 the key is the one of before.
    key = llm.CaptionCache.key
    assert key("m", "s", "u") == key("m", "s", "u", 0.0) != key("m", "s", "u", 0.7)


def test_outputs_an_editor_a_crash_or_a_link_touched_are_continued(tmp_path):
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": f"{k}.wav", "title": f"Dog barking {k}"} for k in range(3)])
    out = tmp_path / "out.jsonl"
    clean.run_clean(str(src), str(out), progress=False)
    full = out.read_bytes()
    first = full[:full.index(b"\n") + 1]
    for damaged in (b"\xef\xbb\xbf" + first,  # saved by an editor with a byte-order mark
                    first + b'{"i',  # cut right after the row began
                    first + b"\x00" * 8):  # a crash's zero padding
        out.write_bytes(damaged)
        assert clean.run_clean(str(src), str(out), progress=False)["written"] == 2
        assert out.read_bytes().endswith(full[len(first):])
    # An output given through a link: --overwrite replaces the file it names, not the link.
    (tmp_path / "real").mkdir()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "real" / "target.jsonl")
    for overwrite in (False, True):
        clean.run_clean(str(src), str(tmp_path / "link.jsonl"), overwrite=overwrite,
                        progress=False)
        assert (tmp_path / "link.jsonl").is_symlink()
        assert len(read_jsonl(tmp_path / "real" / "target.jsonl")) == 3

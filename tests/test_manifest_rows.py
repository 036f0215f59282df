"""Manifest rows that are not plain text, BOMs in side files, and label clean-up."""

import json
import logging
import os

import pytest

from cacophony_jax.data.manifest import ManifestError, ManifestSource
from cacophony_jax.data.sources import ClipSource, SourceError

# A JSON escape for a lone surrogate: json.loads accepts it, UTF-8 cannot hold it.
_SURROGATE_ROW = '{"id": "x", "audio": "a.wav", "captions": ["bad \\ud800"]}'


def test_a_lone_surrogate_in_a_jsonl_row_is_a_bad_row(tmp_path, caplog):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "ok.wav", "caption": "fine"}\n' + _SURROGATE_ROW + "\n"
                        '{"audio": "b.wav", "label": "dog\\udc00"}\n')
    with pytest.raises(ManifestError) as info:
        ManifestSource(manifest)
    message = str(info.value)
    assert str(manifest) in message and "2 bad row(s)" in message
    assert "line 2: \"captions\" 'bad \\ud800' is not valid text" in message
    assert "line 3: \"label\"" in message
    with caplog.at_level(logging.WARNING):
        source = ManifestSource(manifest, skip_bad_rows=True)
    assert len(source) == 1 and source.num_skipped == 2 and source.class_names == ()
    assert source[0]["id"] == "ok.wav" and "skipped 2 bad row(s)" in caplog.text


def test_bytes_that_are_not_utf8_in_a_csv_row_make_that_row_bad(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"audio,caption,label\na.wav,a bell,bell\nb.wav,caf\xe9,bell\n"
                         b"c.wav,rain,r\xff\n")
    with pytest.raises(ManifestError, match=r"(?s)2 bad row\(s\).*line 3: the caption column"
                                            r".*not valid text.*line 4: the label column"):
        ManifestSource(manifest)
    source = ManifestSource(manifest, skip_bad_rows=True)
    assert len(source) == 1 and source.num_skipped == 2 and source.class_names == ("bell",)


def test_clip_source_add_refuses_a_lone_surrogate_and_adds_nothing(tmp_path):
    source = ClipSource("s", str(tmp_path))
    with pytest.raises(SourceError, match="caption 'x\\\\ud800' is not valid text"):
        source.add("a.wav", ["fine", "x\ud800"], clip_id="a")
    source.add("b.wav", ["ok"])
    assert len(source) == 1 and source[0]["id"] == "b.wav" and source[0]["captions"] == ["ok"]


def test_a_byte_order_mark_in_classes_txt_is_not_part_of_the_first_name(tmp_path):
    (tmp_path / "classes.txt").write_bytes(b"\xef\xbb\xbfhi\nlo\n")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "label": "hi"}\n{"audio": "b.wav", "label": "lo"}\n')
    source = ManifestSource(manifest)
    assert source.class_names == ("hi", "lo") and source[0]["labels"] == [0]
    (tmp_path / "classes.txt").write_bytes(b"h\xefi\nlo\n")
    with pytest.raises(ManifestError, match="classes.txt is not UTF-8 text"):
        ManifestSource(manifest)


def test_jsonl_labels_are_stripped_deduplicated_and_empty_ones_dropped(tmp_path, caplog):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "label": [" a ", "a", "b"]}\n'
                        '{"audio": "b.wav", "label": "a"}\n'
                        '{"audio": "c.wav", "label": ""}\n'
                        '{"audio": "d.wav", "label": ["b", "  "]}\n')
    with caplog.at_level(logging.WARNING):
        source = ManifestSource(manifest)
    assert source.class_names == ("a", "b")
    assert [source[i]["labels"] for i in range(4)] == [[0, 1], [0], [], [1]]
    assert "2 row(s) have an empty label, which is dropped" in caplog.text
    (tmp_path / "classes.txt").write_text("b\na\n")
    assert ManifestSource(manifest)[0]["labels"] == [1, 0]  # " a " is in classes.txt


@pytest.mark.parametrize("skip", [False, True])
def test_a_json_array_or_object_is_named_as_such_not_as_bad_rows(tmp_path, skip):
    # A .json file written with json.dump: one document, not one object a line.
    rows = [{"audio": "a.wav", "caption": "a bell"}, {"audio": "b.wav", "caption": "rain"}]
    for name, text in (("pretty.json", json.dumps(rows, indent=2)),
                       ("compact.json", json.dumps(rows)),
                       ("wrapped.jsonl", json.dumps({"data": rows}, indent=1))):
        (tmp_path / name).write_text(text)
        with pytest.raises(ManifestError, match=rf"manifest .*{name} is one JSON document "
                                                r"\(an? (array|object)\), not one JSON object "
                                                r"per line: .*each clip's object on a line"):
            ManifestSource(tmp_path / name, skip_bad_rows=skip)


def test_a_csv_row_with_more_fields_than_the_header_is_a_bad_row(tmp_path):
    # An unquoted comma in a caption shifts the row's label: "a dog", " barking" as label.
    manifest = tmp_path / "m.csv"
    manifest.write_text("audio,caption,label\na.wav,a dog, barking,dog\nb.wav,rain,weather\n"
                        'c.wav,"quoted, fine",dog,\n')  # an empty trailing field is no harm
    with pytest.raises(ManifestError, match=r"(?s)1 bad row\(s\).*line 2: more fields than "
                                            r"the header .*unquoted comma.*quote"):
        ManifestSource(manifest)
    source = ManifestSource(manifest, skip_bad_rows=True)
    assert source.class_names == ("dog", "weather") and source.num_skipped == 1
    assert [source[i]["captions"] for i in range(2)] == [["rain"], ["quoted, fine"]]


def test_a_label_that_is_no_text_is_told_a_name_or_a_list_of_names_will_do(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "label": 3}\n{"audio": "b.wav", "label": null}\n')
    with pytest.raises(ManifestError, match=r'(?s)line 1: "label" must be a string or a list '
                                            r'of strings.*line 2: "label" must be a string'):
        ManifestSource(manifest)


def test_a_manifest_reached_through_a_link_reads_its_paths_from_where_it_is(tmp_path):
    # curate clean and caption write an output given through a link where the link
    # points, its audio paths relative to that folder: read back, they must resolve.
    from cacophony_jax.curate import clean

    (tmp_path / "clips").mkdir()
    (tmp_path / "raw.jsonl").write_text('{"audio": "clips/a.wav", "title": "Rain on a roof"}\n')
    (tmp_path / "data" / "deep").mkdir(parents=True)
    (tmp_path / "data" / "deep" / "real.jsonl").write_text("")
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "link.jsonl").symlink_to(tmp_path / "data" / "deep" / "real.jsonl")
    (tmp_path / "data" / "deep" / "classes.txt").write_text("rain\n")
    clean.run_clean(str(tmp_path / "raw.jsonl"), str(tmp_path / "here" / "link.jsonl"),
                    progress=False)
    source = ManifestSource(tmp_path / "here" / "link.jsonl")
    assert os.path.normpath(source[0]["audio_path"]) == os.path.realpath(
        tmp_path / "clips" / "a.wav")
    assert source.class_names == ("rain",)  # classes.txt is next to the file itself


def test_caption_keeps_a_linked_manifests_bad_rows_pointing_where_its_good_ones_do(tmp_path):
    from cacophony_jax.curate import caption_inputs

    (tmp_path / "data" / "clips").mkdir(parents=True)
    (tmp_path / "data" / "m.jsonl").write_text(
        '{"id": "a", "audio": "clips/a.wav"}\n'
        '{"id": "b", "audio": "clips/b.wav", "captions": 3}\n')  # a bad row, kept as it is
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.jsonl").symlink_to(tmp_path / "data" / "m.jsonl")
    out_dir = str(tmp_path / "out")
    records, _, bad, _ = caption_inputs.input_records(
        str(tmp_path / "elsewhere" / "link.jsonl"), ("wav",), out_dir)
    good = os.path.dirname(os.path.normpath(records[0]["audio_path"]))
    assert os.path.normpath(os.path.join(out_dir, bad[0]["audio"])) == os.path.join(good, "b.wav")


def test_a_linked_manifest_whose_files_are_beside_the_link_reads_them_there(tmp_path):
    # A Hugging Face cache snapshot: every file, the manifest too, links into blobs/.
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    (snap / "clips").mkdir(parents=True)
    blobs.mkdir()
    for blob, text in (("m", '{"audio": "clips/a.wav", "caption": "rain", "label": "rain"}\n'),
                       ("w", "not audio, but a file"), ("c", "rain\nwind\n")):
        (blobs / blob).write_text(text)
    for name, blob in (("m.jsonl", "m"), ("clips/a.wav", "w"), ("classes.txt", "c")):
        (snap / name).symlink_to(blobs / blob)
    source = ManifestSource(snap / "m.jsonl")
    assert source[0]["audio_path"] == str(snap / "clips" / "a.wav")
    assert source.class_names == ("rain", "wind")

"""What `curate caption` records next to its output and the outputs it will continue:
settings that must match, outputs it did not begin, settings of earlier versions."""

import json
import os

import pytest

from cacophony_jax.curate import caption, caption_inputs
from cacophony_jax.curate.caption_inputs import CaptionError
from tests.test_curate_caption import FailingCaptioner, FakeCaptioner, make_folder


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path)


def test_run_caption_refuses_outputs_it_did_not_begin_and_links_to_the_input(folder, tmp_path):
    model = FakeCaptioner()
    # Rows of another tool (curate clean) or a user's file: no settings next to them.
    for text in ('{"id": "clip0.wav", "audio": "a.wav", "captions": ["x"], "raw": {}}\n',
                 '{"important": "user data"}'):
        out = tmp_path / "theirs.jsonl"
        out.write_text(text)
        with pytest.raises(CaptionError, match=r"theirs.jsonl has rows but no .*theirs.jsonl"
                                               r".settings.json, and they are not curate "
                                               r"caption's rows \(no 'synthetic_captions'\): "
                                               r"curate caption did not begin it; nothing "
                                               r"was changed: choose another output, or pass "
                                               r"--overwrite to replace that file"):
            caption.run_caption(model, str(folder), str(out), num_captions=1)
        assert out.read_text() == text and not (tmp_path / "theirs.jsonl.settings.json").exists()
    # Its own rows begun by a version that kept no settings: continued, with a warning.
    out = tmp_path / "earlier.jsonl"
    caption.run_caption(model, str(folder), str(out), num_captions=1)
    os.remove(tmp_path / "earlier.jsonl.settings.json")
    with out.open("r+") as f:  # the last two rows were never written
        rows = f.readlines()
        f.seek(0)
        f.truncate()
        f.writelines(rows[:3])
    assert caption.run_caption(model, str(folder), str(out), num_captions=1)["resumed"] == 3
    assert (tmp_path / "earlier.jsonl.settings.json").exists()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "unlabeled/clip0.wav"}')
    (tmp_path / "link.jsonl").symlink_to("m.jsonl")
    with pytest.raises(CaptionError, match="link.jsonl is the input"):
        caption_inputs.check_request(str(manifest), str(tmp_path / "link.jsonl"), 1, "beam", 1)
    with pytest.raises(CaptionError, match="out.csv must be a .jsonl file"):
        caption_inputs.check_request(str(manifest), str(tmp_path / "out.csv"), 1, "beam", 1)
    assert manifest.read_text() == '{"audio": "unlabeled/clip0.wav"}'


def test_run_caption_overwrite_settings_follow_the_partial_output(folder, tmp_path):
    out = tmp_path / "captioned.jsonl"
    settings = tmp_path / "captioned.jsonl.settings.json"
    (tmp_path / "a.bin").write_text("a")
    (tmp_path / "b.bin").write_text("b")
    model = FakeCaptioner()
    model.bundle_path = str(tmp_path / "a.bin")
    caption.run_caption(model, str(folder), str(out), num_captions=1)
    old, old_settings = out.read_text(), settings.read_text()
    failing = FailingCaptioner(1)
    failing.bundle_path = str(tmp_path / "b.bin")
    with pytest.raises(RuntimeError, match="device lost"):
        caption.run_caption(failing, str(folder), str(out), num_captions=1, batch_size=2,
                            overwrite=True, workers=1)
    # The old output keeps the settings it was made with; the new ones are the partial's.
    assert out.read_text() == old and settings.read_text() == old_settings
    partial_settings = tmp_path / "captioned.jsonl.partial.settings.json"
    assert json.loads(partial_settings.read_text())["bundle"] != json.loads(old_settings)[
        "bundle"]
    # Continuing the partial output with a third bundle would mix two in it.
    (tmp_path / "c.bin").write_text("c")
    model.bundle_path = str(tmp_path / "c.bin")
    with pytest.raises(CaptionError, match=r"partial was begun with another bundle.*Delete "):
        caption.run_caption(model, str(folder), str(out), num_captions=1, overwrite=True)
    # The partial output given up, the old output continues with its own bundle only.
    os.remove(tmp_path / "captioned.jsonl.partial")
    model.bundle_path = str(tmp_path / "b.bin")
    with pytest.raises(CaptionError, match="begun with another bundle"):
        caption.run_caption(model, str(folder), str(out), num_captions=1)
    assert out.read_text() == old
    model.bundle_path = str(tmp_path / "a.bin")
    assert caption.run_caption(model, str(folder), str(out), num_captions=1)["resumed"] == 5
    assert not partial_settings.exists()
    # A complete --overwrite run brings its settings along.
    model.bundle_path = str(tmp_path / "b.bin")
    caption.run_caption(model, str(folder), str(out), num_captions=1, overwrite=True)
    assert not partial_settings.exists() and settings.read_text() != old_settings
    assert caption.run_caption(model, str(folder), str(out), num_captions=1)["resumed"] == 5
    # Killed after the partial output replaced the output, before its settings followed:
    # the settings left next to no partial output are the output's.
    from cacophony_jax import embedding_index

    newer = {**json.loads(settings.read_text()),
             "bundle": embedding_index.bundle_fingerprint(str(tmp_path / "c.bin"))}
    partial_settings.write_text(json.dumps(newer))
    later = os.path.getmtime(partial_settings) + 5
    os.utime(out, (later, later))
    model.bundle_path = str(tmp_path / "c.bin")
    assert caption.run_caption(model, str(folder), str(out), num_captions=1)["resumed"] == 5
    assert json.loads(settings.read_text()) == newer and not partial_settings.exists()


def test_settings_written_by_earlier_versions_are_understood(folder, tmp_path):
    """Outputs begun before today's settings: one without length_penalty was decoded
    with 0, and a bundle fingerprint taken over every file of the folder still names
    the bundle when other files were put next to it."""
    import json

    from cacophony_jax import embedding_index
    from cacophony_jax.curate.output_settings import settings_path

    bundle = tmp_path / "bundle"
    (bundle / "params").mkdir(parents=True)
    (bundle / "bundle.json").write_text("{}")
    (bundle / "params" / "x").write_text("w")
    (bundle / "README.txt").write_text("notes")  # not the bundle's own file
    model = FakeCaptioner()
    model.bundle_path = str(bundle)
    out = tmp_path / "captioned.jsonl"
    caption.run_caption(model, str(folder), str(out), num_captions=1, method="beam")
    recorded = tmp_path / "captioned.jsonl.settings.json"
    assert settings_path(str(out)) == str(recorded)
    old = json.loads(recorded.read_text())
    del old["length_penalty"]
    old["bundle"] = embedding_index.bundle_fingerprint(str(bundle), every_file=True)
    assert old["bundle"] != embedding_index.bundle_fingerprint(str(bundle))
    recorded.write_text(json.dumps(old))
    assert caption.run_caption(model, str(folder), str(out), num_captions=1,
                               method="beam")["resumed"] == 5
    with pytest.raises(CaptionError, match=r"length_penalty \(0.0 before, 1.0 now\)"):
        caption.run_caption(model, str(folder), str(out), num_captions=1, method="beam",
                            length_penalty=1.0)

"""Embedding index files: bundle fingerprints (only the bundle's own files count), bad files."""

import numpy as np
import pytest

from cacophony_jax import embedding_index
from cacophony_jax.embedding_index import IndexFileError, bundle_fingerprint, check_bundle


def _bundle(folder):
    (folder / "params" / "d").mkdir(parents=True)
    (folder / "bundle.json").write_text('{"format": "cacophony-bundle"}')
    (folder / "params" / "_METADATA").write_text("m")
    (folder / "params" / "d" / "0").write_bytes(b"\0" * 10)
    (folder / "tokenizer.json").write_text("{}")
    return str(folder)


def test_bundle_parts_are_the_bundle_formats_names():
    from cacophony_jax.convert import bundle as bundle_lib

    assert embedding_index.BUNDLE_PARTS == (bundle_lib.BUNDLE_JSON, bundle_lib.PARAMS_DIR,
                                            bundle_lib.TOKENIZER_JSON)


def test_other_files_in_a_bundle_folder_do_not_change_its_fingerprint(tmp_path):
    bundle = _bundle(tmp_path / "b")
    clean = bundle_fingerprint(bundle)
    assert clean == bundle_fingerprint(bundle, every_file=True)  # as earlier versions
    (tmp_path / "b" / "README.md").write_text("my model")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "b" / "params" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "b" / "ev1").mkdir()
    (tmp_path / "b" / "ev1" / "results.json").write_text("{}")
    assert bundle_fingerprint(bundle) == clean
    assert bundle_fingerprint(bundle, every_file=True) != clean
    (tmp_path / "b" / "params" / "d" / "0").write_bytes(b"\1" * 10)  # re-exported params
    assert bundle_fingerprint(bundle) != clean
    other = _bundle(tmp_path / "c")
    (tmp_path / "c" / "bundle.json").write_text('{"format": "cacophony-bundle", "x": 1}')
    assert bundle_fingerprint(other) != clean


def test_an_index_of_an_earlier_version_is_accepted(tmp_path):
    bundle = _bundle(tmp_path / "b")
    (tmp_path / "b" / "notes.txt").write_text("hashed by earlier versions")
    old = {"path": bundle, "fingerprint": bundle_fingerprint(bundle, every_file=True)}
    check_bundle("i.npz", old, bundle, bundle_fingerprint(bundle), model=None)
    check_bundle("i.npz", {"fingerprint": bundle_fingerprint(bundle)}, bundle,
                 bundle_fingerprint(bundle), model=None)
    with pytest.raises(IndexFileError, match="embeddings of different bundles"):
        check_bundle("i.npz", {"fingerprint": "0123456789abcdef"}, bundle,
                     bundle_fingerprint(bundle), model=None)


def test_what_is_not_an_index_is_named_as_such(tmp_path):
    (tmp_path / "results.json").write_text('{"a": 1}')
    np.save(tmp_path / "x.npy", np.zeros(3))
    np.savez(tmp_path / "objects.npz", paths=np.array([{"a": 1}], dtype=object),
             embeddings=np.zeros((1, 2)), bundle=np.asarray("{}"))
    cases = [(tmp_path, rf"^index {tmp_path} is a folder, not an index file; pass the .npz "
                        r"file the embed command wrote \(its --out\)$"),
             (tmp_path / "none.npz", "does not exist; create it with the embed command"),
             (tmp_path / "results.json", r"results.json is not an index written by the embed "
                                         r"command \(it is not an .npz file\); pass the .npz"),
             (tmp_path / "x.npy", r"x.npy is not an index written by the embed command \(it "
                                  r"is not an .npz file\)"),
             (tmp_path / "objects.npz", r"objects.npz is not an index written by the embed "
                                        r"command \(it holds Python objects\); rebuild it")]
    for path, message in cases:
        with pytest.raises(IndexFileError, match=message) as raised:
            embedding_index.read_index(str(path))
        assert "allow_pickle" not in str(raised.value)


def test_search_refuses_a_folder_that_is_no_bundle_before_hashing_it(tmp_path, monkeypatch,
                                                                     capsys):
    from cacophony_jax import cli

    data = tmp_path / "data"  # `--bundle data/` by mistake: a large dataset, not a bundle
    data.mkdir()
    (data / "clip.wav").write_bytes(b"\0" * 100)
    index = tmp_path / "index.npz"
    np.savez(index, paths=np.asarray(["/a.wav"]), embeddings=np.ones((1, 4), np.float32),
             bundle=np.asarray('{"fingerprint": "0123456789abcdef"}'))
    hashed = []
    monkeypatch.setattr(embedding_index, "bundle_fingerprint", lambda *a, **k: hashed.append(a))
    assert cli.main(["search", "a dog", "--index", str(index), "--bundle", str(data)]) == 2
    assert "is not an inference bundle (bundle.json is missing)" in capsys.readouterr().err
    assert not hashed

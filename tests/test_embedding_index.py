"""Bundle fingerprints of embedding indexes: only the bundle's own files count."""

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

"""Export never loses a user's files, never writes a damaged model, and explains refusals."""

import errno
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import serialization

from cacophony_jax import cli
from cacophony_jax.convert import bundle as bundle_lib
from cacophony_jax.convert import bundle_write, export, folder_replace, official
from cacophony_jax.convert.bundle import BundleError
from cacophony_jax.data.tokenizer import Tokenizer

CAPTIONS = ["a dog barks twice", "rain falls on a tin roof", "a car engine idles"] * 4


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = Tokenizer.train_bpe(CAPTIONS, 300)
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture
def mae(official_dir):
    return official_dir / "AudioMAE_tiny.ckpt"


def _cacophony(official_dir, tokenizer_file, out, **kwargs):
    return export.export_from_official(official_dir / "Cacophony_tiny.ckpt", out,
                                       tokenizer_path=tokenizer_file, text_length=40, **kwargs)


def _litter(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- --overwrite keeps what is not the bundle's -------------------------------------


def test_overwrite_refuses_a_bundle_folder_holding_other_files(official_dir, tokenizer_file,
                                                               mae, tmp_path, monkeypatch,
                                                               capsys):
    out = _cacophony(official_dir, tokenizer_file, tmp_path / "B")
    (out / "idx.npz").write_bytes(b"an index the user keeps here")
    (out / "notes").mkdir()
    before = (out / "bundle.json").read_text()
    loads = []
    monkeypatch.setattr(official, "read_flat", lambda path: loads.append(path) or {})
    with pytest.raises(BundleError, match=r"B holds files that are not part of the bundle "
                       r"\(idx.npz, notes\), which replacing it would delete; move them out "
                       r"of the folder first"):
        export.export_from_official(mae, out, overwrite=True)
    with pytest.raises(BundleError, match=r"\(idx.npz, notes\)"):
        export.export_from_checkpoint(tmp_path / "no-run", out, overwrite=True)
    assert loads == []  # refused before any work
    argv = ["export", "--official", str(mae), "--out", str(out), "--overwrite"]
    assert cli.main(argv) == 2
    assert "idx.npz" in capsys.readouterr().err
    assert (out / "idx.npz").read_bytes() == b"an index the user keeps here"
    assert (out / "bundle.json").read_text() == before
    assert _litter(tmp_path) == []
    # Once they are moved out, the bundle is replaced.
    monkeypatch.undo()
    (out / "idx.npz").unlink()
    (out / "notes").rmdir()
    export.export_from_official(mae, out, overwrite=True)
    assert bundle_lib.read_meta(out)["kind"] == "mae"


def test_a_file_at_out_is_refused_as_not_a_folder(mae, tmp_path):
    (tmp_path / "afile").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(BundleError, match="afile exists and is not a folder"):
            export.export_from_official(mae, tmp_path / "afile", overwrite=overwrite)
    assert (tmp_path / "afile").read_text() == "mine"


# ---- nothing non-finite is written ----------------------------------------------------


def test_a_damaged_official_file_is_refused(official_dir, tokenizer_file, tmp_path, capsys):
    raw = bytearray((official_dir / "Cacophony_tiny.ckpt").read_bytes())
    raw[1000:1010] = b"\xff" * 10
    damaged = tmp_path / "Cacophony.ckpt"
    damaged.write_bytes(bytes(raw))
    argv = ["export", "--official", str(damaged), "--tokenizer", str(tokenizer_file),
            "--text-length", "40", "--out", str(tmp_path / "B")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "is damaged: NaN or infinite values" in err and "download it again" in err
    assert not (tmp_path / "B").exists()


def test_write_bundle_refuses_non_finite_params(mae, tmp_path):
    config, params = official.load_official_mae(mae)
    params["decoder"]["mask_token"] = np.full_like(params["decoder"]["mask_token"], np.nan)
    for dtype in ("float32", "bfloat16"):
        with pytest.raises(BundleError, match=r"NaN or infinite values in "
                           r"\['decoder/mask_token'\]; their source is damaged"):
            bundle_write.write_bundle(tmp_path / "B", config=config, params=params,
                                      tokenizer=None, dtype=dtype, window_seconds=10.0,
                                      text_length=0, source={})
    assert list(tmp_path.iterdir()) == []


# ---- head counts the file cannot tell -------------------------------------------------


def _three_text_layers(official_dir, path):
    """The tiny release with a third text layer stacked on: no named variant has it."""
    tree = serialization.msgpack_restore((official_dir / "Cacophony_tiny.ckpt").read_bytes())

    def stack(node):
        return {k: stack(v) if isinstance(v, dict) else np.concatenate([v, v[:1]])
                for k, v in node.items()}

    encoder = tree["0"]["params"]["text_module"]["encoder"]
    encoder["layer"] = stack(encoder["layer"])
    path.write_bytes(serialization.msgpack_serialize(tree))
    return path


def test_text_heads_reach_the_loader_from_python_and_the_cli(official_dir, tokenizer_file,
                                                              mae, tmp_path, capsys):
    ckpt = _three_text_layers(official_dir, tmp_path / "three.ckpt")
    with pytest.raises(official.OfficialCheckpointError,
                       match=r"text tower head count cannot be read from '.*three.ckpt'.*"
                             r"--text-heads N on the export command"):
        export.export_from_official(ckpt, tmp_path / "B", tokenizer_path=tokenizer_file,
                                    text_length=40)
    out = export.export_from_official(ckpt, tmp_path / "B", tokenizer_path=tokenizer_file,
                                      text_length=40, text_heads=4, pool_heads=8)
    config = bundle_lib.model_config(bundle_lib.read_meta(out))
    assert (config.text.layers, config.text.heads, config.audio_pool_heads) == (3, 4, 8)
    base = ["export", "--official", str(ckpt), "--tokenizer", str(tokenizer_file),
            "--text-length", "40", "--out", str(tmp_path / "C")]
    assert cli.main([*base, "--text-heads", "2"]) == 0
    assert bundle_lib.model_config(bundle_lib.read_meta(tmp_path / "C")).text.heads == 2
    assert cli.main([*base, "--text-heads", "3", "--overwrite"]) == 2
    assert "--text-heads 3 (text_heads=) must be a whole number dividing" in \
        capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path), "--pool-heads", "8", "--out",
                     str(tmp_path / "D")]) == 2
    assert "--pool-heads only applies to --official" in capsys.readouterr().err
    with pytest.raises(BundleError, match="takes no text-heads .drop --text-heads."):
        export.export_from_official(mae, tmp_path / "E", text_heads=4)
    # Stage 2's init_from keeps only the audio encoder: the text heads do not matter.
    from cacophony_jax.train import encoder_init

    want = official.load_official_cacophony(ckpt, text_heads=4, pool_heads=8)[1]
    got = encoder_init._released(str(ckpt), None)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want["audio_encoder"]))


# ---- unusable --out folders -----------------------------------------------------------


def test_a_path_through_a_file_names_the_file(mae, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert cli.main(["export", "--official", str(mae), "--out",
                     str(tmp_path / "afile" / "x")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write the bundle {tmp_path}/afile/x (--out): "
                   f"{tmp_path}/afile is a file, not a folder; choose another folder\n")


def test_a_read_only_folder_names_it_and_not_a_temporary_one(mae, tmp_path, monkeypatch):
    def refuse(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", f"{dir}/.B.tmp-42qdxusb")

    monkeypatch.setattr(folder_replace.tempfile, "mkdtemp", refuse)
    with pytest.raises(BundleError) as info:
        export.export_from_official(mae, tmp_path / "B")
    assert str(info.value) == (f"cannot write the bundle {tmp_path}/B (--out): {tmp_path} is "
                               "on a read-only file system; choose a folder you can write to")


def test_an_empty_folder_is_written_into_not_replaced(mae, tmp_path, monkeypatch):
    # An empty mount point cannot be renamed: the bundle goes into the folder itself.
    out = tmp_path / "mnt"
    out.mkdir()
    inode = out.stat().st_ino
    rename = pathlib.Path.rename

    def no_moving_out(self, target):
        if pathlib.Path(self) == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", no_moving_out)
    export.export_from_official(mae, out, overwrite=True)
    assert out.stat().st_ino == inode
    assert sorted(os.listdir(out)) == ["bundle.json", "params"]
    assert bundle_lib.read_bundle(out)[0]["kind"] == "mae"
    assert _litter(tmp_path) == []
    # A bundle there cannot be moved aside: said so, the bundle kept, nothing left over.
    with pytest.raises(BundleError, match=r"mnt is in use \(a mount point, say\) and cannot "
                       r"be moved aside; empty it \(an empty folder is written into\)"):
        export.export_from_official(mae, out, overwrite=True)
    assert bundle_lib.read_bundle(out)[0]["kind"] == "mae"
    assert _litter(tmp_path) == [] and sorted(os.listdir(out)) == ["bundle.json", "params"]


def test_a_failed_write_into_an_empty_folder_leaves_it_empty(official_dir, tokenizer_file,
                                                             tmp_path, monkeypatch):
    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Tokenizer, "save", full)
    out = tmp_path / "B"
    out.mkdir()
    with pytest.raises(BundleError, match=r"B \(--out\): no space left for .*B; free some "
                                          r"space or choose another folder"):
        _cacophony(official_dir, tokenizer_file, out, overwrite=True)
    assert list(out.iterdir()) == [] and _litter(tmp_path) == []


def test_a_killed_write_into_an_empty_folder_is_cleaned_up_or_completed(
        mae, tmp_path):
    out = export.export_from_official(mae, tmp_path / "B")
    # Killed while writing: the hidden folder is removed, the empty folder written into.
    empty = tmp_path / "E"
    empty.mkdir()
    (empty / ".E.tmp-abcd1234" / "params").mkdir(parents=True)
    export.export_from_official(mae, empty, overwrite=True)
    assert sorted(os.listdir(empty)) == ["bundle.json", "params"]
    # Killed while moving a complete write up: the move is finished.
    moving = tmp_path / "M"
    (moving / ".M.tmp-abcd1234").mkdir(parents=True)
    (out / "params").rename(moving / "params")
    (out / "bundle.json").rename(moving / ".M.tmp-abcd1234" / "bundle.json")
    with pytest.raises(BundleError, match="already exists"):  # completed, so a bundle
        export.export_from_official(mae, moving)
    assert sorted(os.listdir(moving)) == ["bundle.json", "params"]
    assert bundle_lib.read_bundle(moving)[0]["kind"] == "mae"


# ---- links ----------------------------------------------------------------------------


def test_a_link_to_a_bundle_is_replaced_through(official_dir, tokenizer_file, mae, tmp_path):
    real = export.export_from_official(mae, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(BundleError, match="already exists"):
        _cacophony(official_dir, tokenizer_file, link)
    assert _cacophony(official_dir, tokenizer_file, link, overwrite=True) == link
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert bundle_lib.read_meta(real)["kind"] == "cacophony"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    # A link to a folder still to be made: the folder is made, the link kept.
    dangling = tmp_path / "later"
    dangling.symlink_to(tmp_path / "made")
    export.export_from_official(mae, dangling)
    assert dangling.is_symlink() and bundle_lib.read_meta(tmp_path / "made")["kind"] == "mae"


def test_a_msgpack_file_that_is_no_release_is_named_so_not_asked_for_a_tokenizer(tmp_path):
    other = tmp_path / "other_model.ckpt"  # some other Flax model's weights
    other.write_bytes(serialization.msgpack_serialize({"params": {"dense": np.zeros(3)}}))
    with pytest.raises(official.OfficialCheckpointError, match=r"is not an official "
                       r"Cacophony checkpoint: top-level keys \['dense'\]"):
        export.export_from_official(other, tmp_path / "b")
    assert not (tmp_path / "b").exists()

"""Inference bundles: export from training checkpoints and release files, read, refuse."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from cacophony_jax.convert import bundle as bundle_lib
from cacophony_jax.convert import export, official
from cacophony_jax.convert.bundle import BundleError
from cacophony_jax.data.tokenizer import Tokenizer
from cacophony_jax.models.stack import unstack_layers
from cacophony_jax.models.variants import cacophony_config, mae_config
from cacophony_jax.train import checkpoint_read, loop
from tests.helpers import tiny_config

CAPTIONS = ["a dog barks twice", "rain falls on a tin roof", "a car engine idles",
            "birds sing in the morning", "a door slams shut"] * 4


def tiny(task: str, steps: int):
    # Only the checkpoints matter here (no evaluation); the bundle must come out unrolled.
    return tiny_config(task, steps, **{"data.eval.kind": "", "train.checkpoint_every": 1,
                                       "model.scan": True})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step stage-2 run with checkpoints at steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("run")
    loop.run(tiny("cacophony", 2), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = Tokenizer.train_bpe(CAPTIONS, 500)
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def training_params(path, config, scan=True):
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
                            bundle_lib.abstract_params(config, scan=scan))
    return jax.device_get(checkpoint_read.restore_subtree(str(path), ("params",), abstract))


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_export_is_complete_and_bit_identical(run, tmp_path):
    out = export.export_from_checkpoint(run, tmp_path / "bundle")
    assert sorted(os.listdir(out)) == ["bundle.json", "params", "tokenizer.json"]
    meta, params, tok = bundle_lib.read_bundle(out)
    assert meta["format"] == "cacophony-bundle" and meta["version"] == 1
    assert meta["kind"] == "cacophony" and meta["dtype"] == "float32"
    assert meta["model"] == dataclasses.asdict(cacophony_config("tiny"))
    assert meta["window_seconds"] == 1.0 and meta["text_length"] == 16
    assert meta["frontend"] == dict(sample_rate=16000, window=400, hop=160, n_fft=512,
                                    n_mels=128, mel_fmax=8000.0, log_offset=1e-5,
                                    log_scale=0.2, log_shift=0.9)
    assert meta["source"]["step"] == 2 and meta["source"]["type"] == "checkpoint"
    run_tok = Tokenizer.load(run / "tokenizer.json")
    assert meta["tokenizer_fingerprint"] == run_tok.fingerprint == tok.fingerprint
    # Trained scanned, stored unrolled, values untouched.
    assert "block_0" in params["audio_encoder"] and "blocks" not in params["audio_encoder"]
    assert_same(params, unstack_layers(training_params(run, cacophony_config("tiny"))))


def test_step_selection(run, tmp_path):
    step1 = export.export_from_checkpoint(run / "checkpoints" / "1", tmp_path / "a")
    by_arg = export.export_from_checkpoint(run / "checkpoints", tmp_path / "b", step=1)
    newest = export.export_from_checkpoint(run / "checkpoints", tmp_path / "c")
    metas = [bundle_lib.read_meta(p)["source"]["step"] for p in (step1, by_arg, newest)]
    assert metas == [1, 1, 2]
    p1, p1b, p2 = (bundle_lib.read_bundle(p)[1] for p in (step1, by_arg, newest))
    assert_same(p1, p1b)
    a, b = p1["text_proj"]["kernel"], p2["text_proj"]["kernel"]
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # a training step happened
    with pytest.raises(BundleError, match=r"step 7 does not exist.*\[1, 2\]"):
        export.export_from_checkpoint(run, tmp_path / "d", step=7)


def test_a_damaged_newest_step_names_an_older_one(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    shutil.copy(run / "tokenizer.json", copy / "tokenizer.json")
    for path in (copy / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(BundleError, match=r"export an older one: --step 1 \(saved steps: \[1\]"):
        export.export_from_checkpoint(copy, tmp_path / "x")
    assert export.export_from_checkpoint(copy, tmp_path / "y", step=1).is_dir()


def test_a_step_with_non_finite_params_is_refused_naming_an_older_one(run, tmp_path,
                                                                      monkeypatch):
    real = checkpoint_read.restore_subtree

    def damaged(path, *args):  # step 2's files read back with a NaN in one kernel
        params = jax.device_get(real(path, *args))
        if path.endswith("/2"):
            kernel = params["text_proj"]["kernel"]
            params["text_proj"]["kernel"] = np.where(np.arange(kernel.size).reshape(
                kernel.shape) == 5, np.nan, kernel).astype(kernel.dtype)
        return params

    monkeypatch.setattr(checkpoint_read, "restore_subtree", damaged)
    with pytest.raises(BundleError, match=r"checkpoint step 2 in .* holds NaN or infinite "
                       r"parameters \(\['text_proj/kernel'\]\); its files are damaged: "
                       r"export an older step: --step 1 \(saved steps: \[1\]\)"):
        export.export_from_checkpoint(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert export.export_from_checkpoint(run, tmp_path / "y", step=1).is_dir()


def test_a_step_removed_by_a_running_job_during_export_falls_back(run, tmp_path,
                                                                   monkeypatch, caplog):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    shutil.copy(run / "tokenizer.json", copy / "tokenizer.json")
    real = checkpoint_read.restore_subtree

    def retention_strikes(path, *args):  # the job's keep_checkpoints removes step 2
        if path.endswith("/2"):
            shutil.rmtree(path)
        return real(path, *args)

    monkeypatch.setattr(checkpoint_read, "restore_subtree", retention_strikes)
    out = export.export_from_checkpoint(copy, tmp_path / "b")
    assert json.loads((out / "bundle.json").read_text())["source"]["step"] == 1
    assert "step 2 was removed while it was exported" in caplog.text
    # A step asked for by number is not swapped for another.
    shutil.copytree(run / "checkpoints" / "2", copy / "checkpoints" / "2")
    with pytest.raises(BundleError):
        export.export_from_checkpoint(copy, tmp_path / "c", step=2)


def test_bfloat16_bundle_stores_cast_params(run, tmp_path):
    f32 = bundle_lib.read_bundle(export.export_from_checkpoint(run, tmp_path / "f32"))[1]
    bf16 = bundle_lib.read_bundle(export.export_from_checkpoint(run, tmp_path / "bf16",
                                                            dtype="bfloat16"))[1]
    leaves = jax.tree.leaves(bf16)
    assert {str(x.dtype) for x in leaves} == {"bfloat16"}
    for x, y in zip(jax.tree.leaves(f32), leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(x).astype(y.dtype), np.asarray(y))
    with pytest.raises(BundleError, match="float16"):
        export.export_from_checkpoint(run, tmp_path / "f16", dtype="float16")


def test_official_exports_keep_the_converted_params(official_dir, tokenizer_file, tmp_path):
    ckpt = official_dir / "Cacophony_tiny.ckpt"
    out = export.export_from_official(ckpt, tmp_path / "caco", tokenizer_path=tokenizer_file,
                                      text_length=32, window_seconds=10.0)
    meta, params, tok = bundle_lib.read_bundle(out)
    config, converted = official.load_official_cacophony(ckpt)
    assert bundle_lib.model_config(meta) == config
    assert meta["source"] == {"type": "official", "file": "Cacophony_tiny.ckpt"}
    assert tok.fingerprint == Tokenizer.load(tokenizer_file).fingerprint
    assert_same(params, converted)

    out = export.export_from_official(official_dir / "AudioMAE_tiny.ckpt", tmp_path / "mae")
    meta, params, tok = bundle_lib.read_bundle(out)
    assert tok is None and sorted(os.listdir(out)) == ["bundle.json", "params"]
    assert meta["kind"] == "mae" and bundle_lib.model_config(meta) == mae_config("tiny")
    assert meta["text_length"] == 0 and meta["tokenizer_fingerprint"] == ""
    assert_same(params, official.load_official_mae(official_dir / "AudioMAE_tiny.ckpt")[1])


def test_export_refusals(official_dir, tokenizer_file, run, tmp_path):
    ckpt = official_dir / "Cacophony_tiny.ckpt"
    with pytest.raises(BundleError, match="--tokenizer, or tokenizer_path=.*vocab.json"):
        export.export_from_official(ckpt, tmp_path / "x")
    with pytest.raises(BundleError, match=r"text length 64 \(--text-length\) must be in \[2, 40\]"):
        export.export_from_official(ckpt, tmp_path / "x", tokenizer_path=tokenizer_file)
    with pytest.raises(BundleError, match="AudioMAE.*takes no tokenizer"):
        export.export_from_official(official_dir / "AudioMAE_tiny.ckpt", tmp_path / "x",
                                    tokenizer_path=tokenizer_file)
    with pytest.raises(BundleError, match="AudioMAE.*takes no text-length"):
        export.export_from_official(official_dir / "AudioMAE_tiny.ckpt", tmp_path / "x",
                                    text_length=16)
    with pytest.raises(BundleError, match="is a folder; --official takes a released .ckpt"):
        export.export_from_official(run, tmp_path / "x")
    with pytest.raises(BundleError, match="is a file; .*goes to --official"):
        export.export_from_checkpoint(ckpt, tmp_path / "x")
    with pytest.raises(BundleError, match="is the folder of step 1 but step 2 was asked for"):
        export.export_from_checkpoint(run / "checkpoints" / "1", tmp_path / "x", step=2)
    with pytest.raises(BundleError, match="no training checkpoints"):
        export.export_from_checkpoint(tmp_path, tmp_path / "x")
    with pytest.raises(BundleError, match="does not exist"):
        export.export_from_checkpoint(tmp_path / "missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # An existing bundle is only replaced on request; other folders never.
    mae = official_dir / "AudioMAE_tiny.ckpt"
    out = export.export_from_official(mae, tmp_path / "b")
    with pytest.raises(BundleError, match="already exists.*--overwrite .overwrite=True"):
        export.export_from_checkpoint(run, out)
    export.export_from_checkpoint(run, out, overwrite=True)
    assert bundle_lib.read_meta(out)["kind"] == "cacophony"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not an inference bundle"):
        export.export_from_official(mae, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    # No temporary folders are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "mine"]


def test_failed_write_leaves_nothing(official_dir, tokenizer_file, tmp_path, monkeypatch):
    def broken_save(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(Tokenizer, "save", broken_save)
    with pytest.raises(BundleError, match=r"cannot write the bundle .*b \(--out\): disk full"):
        export.export_from_official(official_dir / "Cacophony_tiny.ckpt", tmp_path / "b",
                                    tokenizer_path=tokenizer_file, text_length=16)
    assert list(tmp_path.iterdir()) == []


def test_killed_exports_leave_no_litter_and_no_lost_bundle(official_dir, tokenizer_file,
                                                            tmp_path):
    from cacophony_jax.embedding_index import bundle_fingerprint

    def official(out, window_seconds=1.0):
        return export.export_from_official(official_dir / "Cacophony_tiny.ckpt", out,
                                           tokenizer_path=tokenizer_file, text_length=16,
                                           window_seconds=window_seconds)

    out = official(tmp_path / "b")
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # readable like a plain folder
    fingerprint = bundle_fingerprint(str(out))
    # Only the bundle's own files are hashed, as earlier versions hashed every file.
    assert fingerprint == bundle_fingerprint(str(out), every_file=True)
    # A replace killed after moving the old bundle aside: the bundle is put back, and
    # half-written folders of killed writes are removed.
    aside = tmp_path / ".b.old-abcd_123"
    aside.mkdir()
    out.rename(aside / "bundle")
    (tmp_path / ".b.tmp-wxyz9876").mkdir()
    (tmp_path / ".b.old-v1.tmp-abcd1234").mkdir()  # bundle "b.old-v1"'s: not b's
    with pytest.raises(BundleError, match="already exists"):  # restored, so refused
        official(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.old-v1.tmp-abcd1234", "b"]
    assert bundle_fingerprint(str(out)) == fingerprint
    with pytest.raises(BundleError, match="not a finite number"):
        official(tmp_path / "c", window_seconds=float("inf"))
    with pytest.raises(BundleError, match=r"must be a number of seconds, got '10' \(str\)"):
        official(tmp_path / "c", window_seconds="10")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _edit_meta(bundle, **changes):
    meta = json.loads((bundle / "bundle.json").read_text())
    meta.update(changes)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    return meta


def test_read_bundle_errors(official_dir, tokenizer_file, tmp_path):
    with pytest.raises(BundleError, match="does not exist.*export"):
        bundle_lib.read_bundle(tmp_path / "nothing")
    with pytest.raises(BundleError, match="bundle.json is missing"):
        bundle_lib.read_bundle(tmp_path)

    def fresh(name):
        return export.export_from_official(
            official_dir / "Cacophony_tiny.ckpt", tmp_path / name,
            tokenizer_path=tokenizer_file, text_length=16)

    bundle = fresh("corrupt")
    (bundle / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt.*re-export"):
        bundle_lib.read_bundle(bundle)

    bundle = fresh("v2")
    _edit_meta(bundle, version=2)
    with pytest.raises(BundleError, match="version 2.*reads version 1"):
        bundle_lib.read_bundle(bundle)

    bundle = fresh("tok")
    Tokenizer.train_bpe(["completely different words here"] * 3, 300).save(
        bundle / "tokenizer.json")
    with pytest.raises(BundleError, match="bundle/tokenizer mismatch"):
        bundle_lib.read_bundle(bundle)

    bundle = fresh("shapes")
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["model"]["projection"] = 32
    _edit_meta(bundle, model=meta["model"])
    with pytest.raises(BundleError, match=r"do not fit the model config.*text_proj/kernel"):
        bundle_lib.read_bundle(bundle)

    bundle = fresh("noparams")
    for path in sorted((bundle / "params").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (bundle / "params").rmdir()
    with pytest.raises(BundleError, match="cannot read the params"):
        bundle_lib.read_bundle(bundle)


@pytest.mark.slow
def test_stage1_checkpoint_exports_a_mae_bundle(tmp_path):
    config = tiny("mae", 2)
    loop.run(config, str(tmp_path / "run"))
    out = export.export_from_checkpoint(tmp_path / "run", tmp_path / "bundle")
    meta, params, tok = bundle_lib.read_bundle(out)
    assert meta["kind"] == "mae" and tok is None and meta["window_seconds"] == 1.0
    assert_same(params, unstack_layers(training_params(tmp_path / "run", mae_config("tiny"))))


def test_training_keeps_its_tokenizer_and_export_reads_that_copy(
        run, tokenizer_file, tmp_path, monkeypatch):
    from etils import epath

    from cacophony_jax.train import init

    # A run configured with tokenizer.path keeps a copy in its workdir ...
    config = tiny("cacophony", 1)
    config.tokenizer.path = str(tokenizer_file)
    workdir = tmp_path / "w"
    workdir.mkdir()
    trained_with = init.prepare_tokenizer(config, epath.Path(workdir), None)
    assert not (workdir / "tokenizer.json").exists()  # not before the run is known to fit
    init.keep_tokenizer(trained_with, epath.Path(workdir))
    assert Tokenizer.load(workdir / "tokenizer.json").fingerprint == trained_with.fingerprint
    # ... so a resume whose path now holds another tokenizer is refused, naming both.
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    other = Tokenizer.train_bpe(CAPTIONS[:3], 300).save(tmp_path / "other.json")
    config.tokenizer.path = str(other)
    with pytest.raises(ValueError, match=f"not the tokenizer this workdir was trained with.*"
                                         f"{trained_with.fingerprint}"):
        init.prepare_tokenizer(config, epath.Path(workdir), None)
    # Export reads the workdir's copy, not the config's path as it reads today.
    real = export._training_config

    def pointing_elsewhere(*args):
        train_config = real(*args)
        train_config["tokenizer"]["path"] = str(other)
        return train_config

    monkeypatch.setattr(export, "_training_config", pointing_elsewhere)
    out = export.export_from_checkpoint(run, tmp_path / "bundle")
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["tokenizer_fingerprint"] == Tokenizer.load(run / "tokenizer.json").fingerprint


@pytest.mark.parametrize("changes, message", [
    ({"window_seconds": 0}, r"window of 0 s \(window_seconds in .*bundle.json\) is shorter "
                            r"than one 16-frame patch \(0.16 s\); re-export the bundle"),
    ({"window_seconds": "10"}, r"must be a number of seconds, got '10' \(str\); re-export"),
    ({"window_seconds": None}, r"must be a number of seconds, got None"),
    ({"window_seconds": float("nan")}, r"window of nan s .* not a finite number; re-export"),
    ({"text_length": -5}, r"text length -5 \(text_length in .*bundle.json\) must be in "
                          r"\[2, 40\].*; re-export the bundle"),
    ({"text_length": 41}, r"text length 41 .* must be in \[2, 40\]"),
    ({"text_length": 16.5}, r"text length \(text_length in .*\) must be a whole number"),
    ({"text_length": True}, r"must be a whole number of tokens, got True \(bool\)"),
    ({"dtype": "float16"}, r"dtype 'float16' .* is damaged; re-export the bundle"),
    ({"tokenizer_fingerprint": 3}, r"tokenizer_fingerprint 3 \(a string\) is damaged"),
    ({"model": {"audio": 1}}, r"model config in bundle.json is not valid.*re-export"),
    ({"kind": "mae", "model": "mae"}, r"text_length 16 must be 0 for an AudioMAE bundle"),
])
def test_a_damaged_bundle_json_names_the_field_and_says_re_export(tmp_path, changes, message):
    import dataclasses

    from cacophony_jax.models import variants

    meta = {"format": bundle_lib.FORMAT, "version": bundle_lib.VERSION, "kind": "cacophony",
            "model": dataclasses.asdict(variants.cacophony_config("tiny")), "dtype": "float32",
            "frontend": bundle_lib.frontend_settings(), "window_seconds": 1.0,
            "text_length": 16, "tokenizer_fingerprint": "abc", "source": {}}
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    assert bundle_lib.read_meta(tmp_path)["text_length"] == 16
    if changes.get("model") == "mae":
        changes["model"] = dataclasses.asdict(variants.mae_config("tiny"))
        meta.update(changes)
        (tmp_path / "bundle.json").write_text(json.dumps({**meta, "text_length": 0}))
        assert bundle_lib.read_meta(tmp_path)["kind"] == "mae"
    meta.update(changes)
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        bundle_lib.read_meta(tmp_path)

"""Export never loses a user's files, never writes a damaged model, and explains refusals."""

import numpy as np
import pytest
from flax import serialization

from cacophony_jax import cli
from cacophony_jax.convert import bundle as bundle_lib
from cacophony_jax.convert import export, official
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
            bundle_lib.write_bundle(tmp_path / "B", config=config, params=params,
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

"""Export never loses a user's files, never writes a damaged model, and explains refusals."""

import numpy as np
import pytest

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

"""benchmarks/attention_kernels.py: its attention calls and its rows on a CPU."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention_kernels


def _reference(q, k, v, lengths, causal):
    """Softmax attention written out, keys past each length and (causal) ahead masked."""
    scores = np.einsum("bqhd,bshd->bhqs", q, k) / math.sqrt(q.shape[-1])
    keep = np.arange(k.shape[1])[None, None, None, :] < lengths[:, None, None, None]
    if causal:
        keep = keep & np.tril(np.ones((q.shape[1], k.shape[1]), bool))
    scores = np.where(keep, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqs,bshd->bqhd", weights, v)


@pytest.mark.parametrize("causal", [False, True])
def test_the_xla_call_is_attention_over_each_examples_first_keys(causal):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, 6, 2, 8)).astype(np.float32) for _ in range(3))
    lengths = np.array([6, 4, 1], np.int32)
    call = attention_kernels.attention_fn("xla", 8, 16, causal)
    got = np.asarray(call(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths)))
    np.testing.assert_allclose(got, _reference(q, k, v, lengths, causal), rtol=1e-5, atol=1e-5)


def test_shapes_parse_and_bad_ones_name_the_form():
    assert attention_kernels.parse_shape("text:64:64:12:64:causal") == dict(
        name="text", q=64, s=64, heads=12, head_dim=64, causal=True)
    with pytest.raises(SystemExit, match="NAME:Q:S:HEADS:HEAD_DIM"):
        attention_kernels.parse_shape("text:64:64:12")
    with pytest.raises(SystemExit, match="NAME:Q:S:HEADS:HEAD_DIM"):
        attention_kernels.parse_shape("text:64:64:12:64:sideways")


def test_a_cpu_run_times_xla_and_reports_cudnn_as_skipped(tmp_path, capsys):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the rows of a machine without cuDNN")
    rows_file = tmp_path / "rows.jsonl"
    code = attention_kernels.main(["--shape", "tiny:4:4:2:8", "--batch", "2", "--repeats", "2",
                                   "--warmup", "1", "--kernels", "xla,cudnn,cudnn-pad",
                                   "--pad-to", "16", "--json", str(rows_file)])
    assert code == 0
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["kernel"] for r in rows] == ["xla", "cudnn", "cudnn-pad"]
    assert rows[0]["ms"] > 0 and rows[0]["tflops"] > 0 and "skipped" not in rows[0]
    assert all("skipped" in r for r in rows[1:])
    assert rows[2]["pad_to"] == 16
    out = capsys.readouterr().out
    assert "| tiny | xla | 8 |" in out and "| tiny | cudnn | 8 | skipped" in out


def test_an_unknown_kernel_is_refused():
    with pytest.raises(SystemExit, match="unknown"):
        attention_kernels.main(["--kernels", "xla,flash"])

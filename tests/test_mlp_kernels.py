"""benchmarks/mlp_kernels.py: its MLP gradients and its rows on a CPU."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import mlp_kernels


def test_the_timed_gradients_are_the_silu_mlps():
    rng = np.random.default_rng(0)
    x, ct = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    w1, b1 = rng.standard_normal((4, 6)), rng.standard_normal(6)
    w2, b2 = rng.standard_normal((6, 4)), rng.standard_normal(4)
    got = mlp_kernels.mlp_grads(jax.nn.silu)(*(jnp.asarray(a, jnp.float32)
                                               for a in (x, w1, b1, w2, b2, ct)))
    # The same gradients written out: SiLU(h) = h s(h), SiLU'(h) = s(h) (1 + h (1 - s(h))).
    h = x @ w1 + b1
    s = 1 / (1 + np.exp(-h))
    dh = (ct @ w2.T) * s * (1 + h * (1 - s))
    want = (dh @ w1.T, x.T @ dh, dh.sum(0), (h * s).T @ ct, ct.sum(0))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)


def test_a_cpu_run_times_the_xla_rows_and_reports_mgpu_as_skipped(tmp_path, capsys):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the rows of a machine without a Hopper GPU")
    rows_file = tmp_path / "rows.jsonl"
    code = mlp_kernels.main(["--batch", "2", "--positions", "8", "--width", "16", "--hidden",
                             "32", "--repeats", "2", "--warmup", "1", "--json", str(rows_file)])
    assert code == 0
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["kernel"] for r in rows] == ["xla-mlp", "xla-linear", "xla-dot", "mgpu",
                                           "xla-dot", "mgpu"]
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows if r["kernel"] != "mgpu")
    assert rows[0]["flops"] == 6 * 2 * 16 * 16 * 32
    assert [(r["k"], r["n"]) for r in rows[2:]] == [(16, 32), (16, 32), (32, 16), (32, 16)]
    assert all("Hopper" in r["skipped"] for r in rows if r["kernel"] == "mgpu")
    out = capsys.readouterr().out
    assert "| 16x16->32 | xla-mlp |" in out and "the activation costs" in out


def test_an_unknown_kernel_is_refused():
    with pytest.raises(SystemExit, match="unknown"):
        mlp_kernels.main(["--kernels", "xla-mlp,triton"])

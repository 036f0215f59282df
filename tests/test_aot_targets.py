"""Compiles for real TPU and GPU compilers where their packages are installed.

Neither libtpu nor the CUDA plugin is in requirements.txt (they are large, and CI
has no use for them), so these skip there; `pip install "jax[tpu]==<version>"` or
`"jax[cuda12]==<version>"` enables them. No TPU or GPU is needed either way.
"""

import importlib.util

import jax
import pytest

from benchmarks import aot_compile, compile_targets, train_step
from cacophony_jax.models.variants import mae_config

TINY = ["--variant", "tiny", "--per-device-batch", "2", "--clip-seconds", "1"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _installed("libtpu"), reason="libtpu is not installed")
def test_tpu_topology_compile(monkeypatch):
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    rows = aot_compile.main(["--target", "tpu:v5e:2x2", "--mesh", "1x4", "--stage", "mae",
                             "--device-memory-gb", "16", *TINY])
    (row,) = rows
    assert row["device"] == "TPU v5 lite" and row["mesh"] == {"data": 1, "fsdp": 4}
    assert not row["stand_in"]
    assert row["fits"] and row["memory"]["temp"] > 0
    config = train_step.make_config("mae", "tiny", 8, clip_seconds=1.0)
    assert row["flops_per_example"] == train_step.model_flops_per_example(config)


@pytest.mark.skipif(_installed("libtpu"), reason="libtpu is installed: no stand-in")
def test_tpu_target_without_libtpu_is_a_marked_cpu_stand_in(capsys):
    """Without libtpu a TPU target compiles on CPU devices; the warning, the verdict
    and the row all say that it is a stand-in, not XLA:TPU. (8 chips: the stand-in
    sets the CPU device count, and the tests' processes have 8 devices.)"""
    rows = aot_compile.main(["--target", "tpu:v5e:2x4", "--mesh", "1x8", "--stage", "mae",
                             "--remat", "full", *TINY])
    (row,) = rows
    out = capsys.readouterr().out
    assert "without libtpu" in out and 'pip install "jax[tpu]==' in out
    assert row["stand_in"] and row["target"] == "tpu:v5e:2x4" and row["device"] == "cpu"
    assert row["budget_bytes"] == 16e9  # the v5e chip's HBM
    verdict = next(line for line in out.splitlines() if "total per device" in line)
    assert "fits in 16.0 GB" in verdict
    assert verdict.endswith("(CPU stand-in for tpu:v5e:2x4, not the TPU compiler: its "
                            "temporaries differ from XLA:TPU's)")
    # XLA:CPU barely changes its temporaries with remat: the report says so.
    assert "remat=full on the CPU stand-in" in out and "cannot show what remat saves" in out


def test_target_wording_and_a_bad_topology_with_libtpu(monkeypatch):
    # With libtpu installed, a topology it rejects is an error, not a stand-in.
    monkeypatch.setattr(compile_targets, "_installed", lambda module: True)
    with pytest.raises(aot_compile.TargetError, match="check the topology name"):
        aot_compile.target_devices("tpu:v99:3x3", 1)
    # Real targets have no note; the plain CPU target is a stand-in too.
    assert aot_compile.stand_in_note({"stand_in": False, "target": "gpu:h100"}) == ""
    assert "CPU stand-in, not a GPU/TPU compiler" in aot_compile.stand_in_note(
        {"stand_in": True, "target": "cpu"})


@pytest.mark.skipif(not _installed("jax_plugins.xla_cuda12"),
                    reason="the CUDA plugin is not installed")
def test_gpu_compile_without_a_gpu_with_cudnn_attention():
    rows = aot_compile.main(["--target", "gpu:h100:8", "--mesh", "2x4", "--stage", "cacophony",
                             "--attention", "cudnn", *TINY])
    (row,) = rows
    assert row["device"] == "NVIDIA H100 80GB HBM3" and row["attention"] == "cudnn"
    assert not row["stand_in"] and "stand-in" not in aot_compile.format_row(row)
    assert row["fits"] and row["memory"]["temp"] > 0
    assert row["xla_flops_per_example"] is None  # XLA:GPU has no cost analysis here
    assert row["flops_per_example"] > 0
    assert row["fused_attention_calls"] > 0 and row["gemm_bf16_share"] > 0.5


@pytest.mark.skipif(not _installed("jax_plugins.xla_cuda12"),
                    reason="the CUDA plugin is not installed")
def test_gpu_compiled_products_are_the_traced_model_flops():
    """With XLA attention every model product is a cuBLAS call or a dot in the compile.

    The compile may hold a few small products twice (0.2 % more at this tiny size;
    the base step agrees to 0.1 GFLOP of 360).
    """
    rows = aot_compile.main(["--target", "gpu:h100", "--mesh", "1x1", "--stage", "cacophony",
                             "--attention", "xla", *TINY])
    (row,) = rows
    assert row["gemm_flops_per_example"] == pytest.approx(row["flops_per_example"], rel=0.01)
    assert row["fused_attention_calls"] == 0


@pytest.mark.skipif(not _installed("jax_plugins.xla_cuda12"),
                    reason="the CUDA plugin is not installed")
def test_gpu_step_updates_the_parameters_in_place():
    """The step's update writes the parameters and optimiser state without copies.

    A reduction over the new parameters inside the step made XLA:GPU copy most of
    them into their donated buffers (RESULTS.md section 7).
    """
    rows = aot_compile.main(["--target", "gpu:h100", "--mesh", "1x1", "--stage", "mae",
                             "--attention", "xla", *TINY])
    (row,) = rows
    config = train_step.make_config("mae", "tiny", 8, clip_seconds=1.0)
    built = train_step.build_step(config)
    arrays = len(jax.tree.leaves(built.plan.abstract.params))
    assert row["kernels"]["product"] > 0 and row["kernels"].get("copy", 0) < arrays / 4


@pytest.mark.skipif(not _installed("jax_plugins.xla_cuda12"),
                    reason="the CUDA plugin is not installed")
def test_gpu_compiles_the_pallas_layer_norms_on_an_fsdp_mesh():
    """model.fused_norm: XLA:GPU compiles the Triton kernels (two per LayerNorm of
    the audio blocks, one each way), run per device under FSDP."""
    rows = aot_compile.main(["--target", "gpu:h100:8", "--mesh", "1x8", "--stage", "mae",
                             "--fused-norm", *TINY])
    (row,) = rows
    tiny = mae_config("tiny")
    norms = 2 * (tiny.encoder.layers + tiny.decoder.layers)
    assert row["fused_norm"] and row["fits"]
    assert row["kernels"]["pallas"] == 2 * norms

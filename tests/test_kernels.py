"""Kernel counts and bytes of a compiled step, read from its HLO text."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import kernels

# Entry-computation lines of the forms XLA:GPU writes; a fused computation before it
# must not be read.
GPU_HLO = "\n".join([
    "%fused_add (p: bf16[1024,1024]) -> bf16[1024,1024] {",
    "  %p = bf16[1024,1024]{1,0} parameter(0)",
    "  ROOT %a = bf16[1024,1024]{1,0} add(%p, %p)",
    "}",
    "",
    "ENTRY %main (x: bf16[256,64], w: bf16[64,192], g: f32[1000]) -> bf16[256,192] {",
    "  %x = bf16[256,64]{1,0} parameter(0)",
    "  %w = bf16[64,192]{1,0} parameter(1)",
    "  %g = f32[1000]{0} parameter(2)",
    '  %mm = (bf16[256,192]{1,0}, s8[4194304]{0}) custom-call(%x, %w), '
    'custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/q/dot_general"}',
    "  %y = bf16[256,192]{1,0} get-tuple-element(%mm), index=0",
    "  %f = bf16[256,192]{1,0} fusion(%y, %y), kind=kLoop, calls=%fused_add, "
    'metadata={op_name="jit(step)/gelu/mul"}',
    "  %t = bf16[192,256]{0,1} copy(%f)",
    '  %ar = f32[1000]{0} all-reduce-start(%g), replica_groups={}, to_apply=%sum',
    "  %ard = f32[1000]{0} all-reduce-done(%ar)",
    '  %att = (bf16[2,8,16,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x, %x), '
    'custom_call_target="__cudnn$fmhaScaleBiasSoftmax"',
    "  ROOT %out = (bf16[192,256]{0,1}, f32[1000]{0}) tuple(%t, %ard)",
    "}",
    "",
])


def test_categories_counts_and_bytes():
    summary = kernels.summarize(GPU_HLO)
    assert summary.counts == {"product": 1, "attention": 1, "fusion": 1, "copy": 1,
                              "collective": 1}
    y = 256 * 192 * 2
    # The product reads x and w and writes y plus its workspace.
    assert summary.bytes["product"] == 256 * 64 * 2 + 64 * 192 * 2 + y + 4194304
    assert summary.bytes["fusion"] == 2 * y  # y read once (listed twice), f written
    assert summary.bytes["copy"] == 2 * y
    assert summary.bytes["collective"] == 2 * 4000  # -done is not another kernel
    assert summary.non_product_bytes() == 4 * y + 8000
    assert summary.largest[0] == (2 * y, "fusion", "jit(step)/gelu/mul")
    # Products at 1 TFLOP/s plus the other bytes at 1 GB/s.
    assert kernels.floor_seconds(summary, 1e12, 1e12, 1e9) == pytest.approx(
        1.0 + (4 * y + 8000) / 1e9)


def test_triton_gemm_fusions_are_products():
    for kind in ("__triton_gemm", "__triton_nested_gemm_fusion"):
        attrs = f'kind=kCustom, backend_config={{"fusion_backend_config":{{"kind":"{kind}"}}}}'
        assert kernels.category("fusion", attrs) == "product"
    assert kernels.category("fusion", 'kind=kCustom, backend_config={"fusion_backend_config":'
                                      '{"kind":"__triton"}}') == "fusion"


def test_pallas_kernels_have_their_own_category():
    assert kernels.category("custom-call", 'custom_call_target="__gpu$xla.gpu.triton"') \
        == "pallas"
    assert kernels.category("custom-call", 'custom_call_target="my_library_call"') == "other"


def test_no_entry_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        kernels.summarize("HloModule m\n")


def test_a_real_compile():
    step = jax.jit(lambda a, b: jnp.tanh(a @ b) * 2.0)
    a = jnp.ones((64, 32), jnp.float32)
    b = jnp.ones((32, 16), jnp.float32)
    summary = kernels.summarize(step.lower(a, b).compile().as_text())
    assert summary.kernels >= 1
    assert sum(summary.bytes.values()) >= (64 * 32 + 32 * 16 + 64 * 16) * 4


def test_op_groups():
    assert kernels.op_group(
        "jit(constrained)/transpose(jvp(MAE))/decoder/block_3/mlp/wi/reduce_sum"
    ) == "bwd/decoder/block_N/mlp"
    assert kernels.op_group("jit(step)/jvp(Cacophony)/Cacophony.encode_audio/audio_encoder/"
                            "block_11/attn/add", 3) == "fwd/Cacophony.encode_audio/audio_encoder"
    groups = kernels.by_group(GPU_HLO)
    assert list(groups) == ["fusion gelu/mul", "copy copy bf16[192,256]",
                            "collective all-reduce-start f32[1000]"]
    assert groups["fusion gelu/mul"] == (1, 2 * 256 * 192 * 2)


def test_command_line_one_step_and_a_comparison(tmp_path, capsys):
    first = tmp_path / "a.hlo.txt"
    first.write_text(GPU_HLO)
    second = tmp_path / "b.hlo.txt"
    # The same step without its copy.
    second.write_text(GPU_HLO.replace("  %t = bf16[192,256]{0,1} copy(%f)\n", "").replace(
        "tuple(%t, %ard)", "tuple(%f, %ard)"))
    rows = kernels.main([str(first)])
    assert rows[0] == ("fusion gelu/mul", 1, 2 * 256 * 192 * 2)
    rows = kernels.main([str(first), str(second)])
    assert rows == [("copy copy bf16[192,256]", -1, -2 * 256 * 192 * 2)]
    out = capsys.readouterr().out
    assert "5 kernels" in out and "4 kernels" in out
    with pytest.raises(ValueError, match="cannot read"):
        kernels.main([str(tmp_path / "missing.txt")])

"""Reading matrix products and their dtypes from compiled HLO text."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gemms

# Lines of the forms XLA:GPU writes (a cuBLASLt call with its workspace in a tuple,
# its dimension numbers in the backend config; a cuDNN attention call; a plain dot).
GPU_HLO = "\n".join([
    "  %p0 = bf16[256,64]{1,0} parameter(0)",
    "  %p1 = bf16[64,192]{1,0} parameter(1)",
    "  %p2 = f32[4,80,400]{2,1,0} parameter(2)",
    "  %p3 = f32[400,64]{1,0} parameter(3)",
    '  %custom-call.1 = (bf16[256,192]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1), '
    'custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/query/dot_general"}'
    ', backend_config={"gemm_backend_config":{"dot_dimension_numbers":{'
    '"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],'
    '"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}',
    '  %dot.2 = f32[4,80,64]{2,1,0} dot(%p2, %p3), lhs_contracting_dims={2}, '
    'rhs_contracting_dims={0}, metadata={op_name="jit(step)/bfm,mk->bfk/dot_general"}',
    '  %fmha = (bf16[2,8,16,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), '
    'custom_call_target="__cudnn$fmhaScaleBiasSoftmax", backend_config={}',
])


def test_products_by_dtype_with_their_names():
    summary = gemms.summarize(GPU_HLO)
    cublas, dot = 2 * 256 * 192 * 64, 2 * 4 * 80 * 64 * 400
    assert summary.by_dtype == {"bf16xbf16->bf16": cublas, "f32xf32->f32": dot}
    assert summary.share("bf16") == pytest.approx(cublas / (cublas + dot))
    assert summary.largest_other == [("f32xf32->f32", "jit(step)/bfm,mk->bfk/dot_general", dot)]
    assert summary.fused_attention_calls == 1


def test_a_real_compile_counts_the_batched_product():
    a, b = jnp.ones((2, 3, 4), jnp.float32), jnp.ones((2, 4, 5), jnp.float32)
    step = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))
    summary = gemms.summarize(step.lower(a, b).compile().as_text())
    assert summary.total == 2 * 2 * 3 * 5 * 4 and summary.share("f32") == 1.0

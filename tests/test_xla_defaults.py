"""The XLA options training runs with unless the user sets them."""

import os
import subprocess
import sys

from cacophony_jax import xla_defaults


def test_defaults_are_added_unless_the_user_names_the_option():
    assert xla_defaults.with_defaults("") == "--xla_gpu_enable_triton_gemm=false"
    assert xla_defaults.with_defaults("--xla_dump_to=/tmp/d") == (
        "--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=false")
    # The user's own value wins, whatever it is, and nothing is doubled.
    for own in ("--xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_triton_gemm"):
        assert xla_defaults.with_defaults(f"--a=1 {own}") == f"--a=1 {own}"
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
    xla_defaults.apply(env)
    assert env == {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
    env = {}
    xla_defaults.apply(env)
    assert env == {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}


def test_training_entry_point_sets_them_before_jax_starts():
    """Importing `main` (what `python -m cacophony_jax.main` runs first) puts the
    defaults into XLA_FLAGS, and JAX still starts with them (on CPU the GPU option is
    accepted and unused)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("import os, cacophony_jax.main, jax; jax.numpy.ones(2).block_until_ready(); "
            "print(os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["--xla_gpu_enable_triton_gemm=false"]

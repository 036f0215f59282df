"""XLA options this project runs with unless the user's XLA_FLAGS sets them.

They must be in the environment before JAX starts its backends: `main` and
`benchmarks/train_step.py` apply them at import. Each one is a GPU option (the CPU
and TPU compilers do not use it) chosen by measurement (benchmarks/RESULTS.md,
section 12):

- ``--xla_gpu_enable_triton_gemm=false``: matrix products from cuBLAS only, not
  XLA's autotuned Triton GEMM fusions. On one H100 the `base` steps at batch 256
  took 2.4 % (stage 1) and 6.8 % (stage 2) less time with it.

To keep XLA's own default, set the flag yourself, e.g.
``XLA_FLAGS=--xla_gpu_enable_triton_gemm=true``.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def with_defaults(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) plus each default whose option it does not name."""
    named = {f.split("=", 1)[0] for f in flags.split()}
    added = [f for f in DEFAULT_XLA_FLAGS if f.split("=", 1)[0] not in named]
    return " ".join([*flags.split(), *added])


def apply(environ: MutableMapping[str, str] | None = None) -> None:
    """Adds the defaults to XLA_FLAGS in `environ` (os.environ if None)."""
    environ = os.environ if environ is None else environ
    environ["XLA_FLAGS"] = with_defaults(environ.get("XLA_FLAGS", ""))

"""Test set-up: 8 simulated CPU devices and parsed absl flags, before JAX starts."""

import os
import sys

# Must happen before JAX initialises its backends: every test sees 8 CPU devices so
# the sharded code paths ('data' x 'fsdp' meshes) run for real on one machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Many tests train the same tiny steps: a compilation cache for this pytest process
# (not its subprocesses, which never share it) compiles each of them once.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_CACHE = tempfile.mkdtemp(prefix="cacophony-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Grain and Orbax read absl flags; under pytest nobody parses them.
if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)

import pathlib  # noqa: E402

import pytest  # noqa: E402

# Reference data shipped with the tests (official-release numerics; see its README).
OFFICIAL_FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "official"


@pytest.fixture(scope="session")
def official_dir() -> pathlib.Path:
    """Folder with the official reference checkpoints and input/output pairs."""
    return OFFICIAL_FIXTURES


@pytest.fixture(scope="session")
def inference_bundles(official_dir, tmp_path_factory):
    """(cacophony, mae) bundles of the official tiny checkpoints (`export_bundles`),
    exported once for the inference tests; tests only read them."""
    from tests.test_inference import export_bundles

    return export_bundles(official_dir, tmp_path_factory.mktemp("bundles"))

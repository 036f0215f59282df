"""Two local processes x 4 CPU devices train, checkpoint, and restore onto 1 x 8."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import ROOT, read_metrics, restore_params, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_restore_on_one(tmp_path):
    port, workdir, out = str(free_port()), tmp_path / "run", tmp_path / "params.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "tests/multihost_driver.py", str(i), port,
                               str(workdir), str(out)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-4000:]
    # Both processes stopped on process 1's failure, and on its different config.
    assert "agree: process 1 of 2 failed a check: its disk lacks data/train.jsonl" in outputs[0]
    assert "agree: its disk lacks data/train.jsonl" in outputs[1]
    for text in outputs:
        assert ("process 1's config differs from process 0's: config.optim.learning_rate "
                "(0.001 on process 0, 0.05 on process 1)") in text, text
        assert "same run: " in text
        assert "--workdir ('runs/a' on process 0, 'runs/b' on process 1)" in text, text
        assert "num_workers" not in text.split("recipe: ")[-1]
        assert "done" in text
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # Each process saved its own Grain iterator state.
    data_iter = workdir / "checkpoints" / "3" / "data_iter"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_iter))
    saved = np.load(out)
    config = tiny_config("mae", 3, **{"train.checkpoint_every": 3, "mesh.fsdp": 2})
    params = restore_params(config, workdir)  # this process: 1 process x 8 devices
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sorted(flat) == sorted(saved.files)
    for key, value in flat.items():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)

"""Shared test helpers: seconds-sized training configs and reading a run's results."""

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cacophony_jax import tasks
from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.parallel import partition
from cacophony_jax.train import checkpoint_read
from configs import cacophony as cacophony_config
from configs import mae as mae_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(task: str, steps: int, **overrides):
    """A seconds-sized config of `task` ("mae" or "cacophony") on the embedded corpus.

    Args:
      task: the stage.
      steps: training steps.
      **overrides: dotted config keys -> values, e.g. **{"train.checkpoint_every": 1}.

    Returns:
      The locked config.
    """
    config = (mae_config if task == "mae" else cacophony_config).get_config(f"tiny,steps={steps}")
    config.unlock()
    config.audio.clip_seconds = config.audio.eval_clip_seconds = 1.0
    config.data.synthetic_train_size, config.data.synthetic_eval_size = 48, 8
    config.data.global_batch_size = config.data.eval_batch_size = 8
    config.data.read_threads = 2
    config.optim.warmup_steps = 1
    config.train.log_every = 1
    config.train.checkpoint_every = 5
    if task == "cacophony":
        config.data.text_length = 16
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.lock()
    return config


def assert_trees_equal(a, b):
    """Every leaf of two trees is bitwise equal."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def read_metrics(workdir):
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def restore_params(config, workdir):
    """The saved parameters of a run, as numpy arrays on this host."""
    return jax.device_get(restore_params_sharded(config, workdir))


def restore_params_sharded(config, workdir):
    """The saved parameters of a run, placed on this process's mesh."""
    mesh = mesh_lib.make_mesh(config.mesh)
    task = tasks.build(config, tokenizer_for(config, workdir))
    boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    abstract, shardings = partition.param_shardings(
        boxed, mesh, partition.rules_from_config(config.sharding_rules))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return checkpoint_read.restore_subtree(workdir, ("params",), abstract)


def tokenizer_for(config, workdir):
    """A stage-2 run's tokenizer (None for stage 1)."""
    if config.task != "cacophony":
        return None
    from cacophony_jax.data import tokenizer
    return tokenizer.Tokenizer.load(os.path.join(workdir, "tokenizer.json"))


def cudnn_stand_in(calls: list, kernels: list | None = None) -> Callable:
    """Checks the rules cuDNN's flash attention sets, then computes with XLA.

    The rules: a mask (bias) of full [B|1, H|1, Q, S] extent, even Q and S when
    there is one (training with a bias) or key lengths instead (the padding kernel:
    int32 [B], no mask; causal or not), and more than one query row. `kernels`, if
    given, gets the kernel each cuDNN call would run: "bias", "padding" or
    "padding_causal".
    """
    real = jax.nn.dot_product_attention

    def attention(query, key, value, mask=None, implementation=None, **kwargs):
        if implementation == "cudnn":
            batch_size, q_len, heads, _ = query.shape
            assert q_len > 1
            kernel = "bias"
            if kwargs.get("key_value_seq_lengths") is not None:  # the padding kernel
                assert mask is None and q_len % 2 == 0 and key.shape[1] % 2 == 0
                lengths = kwargs["key_value_seq_lengths"]
                assert lengths.shape == (batch_size,) and lengths.dtype == jnp.int32
                kernel = "padding_causal" if kwargs.get("is_causal") else "padding"
            if mask is not None:
                assert mask.ndim == 4 and mask.shape[2:] == (q_len, key.shape[1])
                assert mask.shape[0] in (1, batch_size) and mask.shape[1] in (1, heads)
                assert q_len % 2 == 0 and key.shape[1] % 2 == 0
            if kernels is not None:
                kernels.append(kernel)
        calls.append(implementation)
        return real(query, key, value, mask=mask, implementation="xla", **kwargs)

    return attention


def write_jsonl(path, rows):
    """Writes rows (dicts, or raw strings for broken lines) one a line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def read_jsonl(path):
    """The rows of a JSONL file (only "\n" ends a row, as in the tools' outputs)."""
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def write_tone(path, k, samples=8000):
    """A 16 kHz int16 WAV at `path` (folders made): a sine of 700 (k + 1) Hz."""
    import soundfile

    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = np.arange(samples) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 700 * (k + 1) * t) * 32767).astype(
        np.int16), 16000)

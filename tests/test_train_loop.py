"""The train step and loop on their own: state initialisation, the sharded step against
one device, what the loop reads from the device, profiling, and stopping on divergence."""

import os
import threading

import jax
import ml_collections
import numpy as np
import pytest

from cacophony_jax import tasks
from cacophony_jax.optim import optimizer
from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.parallel import partition
from cacophony_jax.train import checks, loop
from cacophony_jax.train import state as state_lib
from cacophony_jax.train import step as step_lib
from tests.helpers import assert_trees_equal, tiny_config


def test_state_is_initialised_with_the_threefry_kernel_setting_then_restored():
    """On a GPU the setting turns the initialisers' threefry hashes into kernel calls
    (78 s -> 5 s of compile for Cacophony base); it must not leak into the step."""
    config = tiny_config("mae", 2)
    task = tasks.build(config, None)
    tx, _ = optimizer.make_optimizer(config.optim, config.train.steps)
    mesh = mesh_lib.make_mesh(config.mesh)
    plan = state_lib.plan_state(task.init_params, tx, mesh,
                                partition.rules_from_config(config.sharding_rules))
    seen = []

    def spy(key):
        seen.append(jax.config.jax_threefry_gpu_kernel_lowering)
        return task.init_params(key)

    state = state_lib.create_state(spy, tx, plan, seed=0)
    assert seen == [True] and not jax.config.jax_threefry_gpu_kernel_lowering
    plain = jax.jit(lambda k: task.init_params(jax.random.split(k)[0]))(
        jax.random.PRNGKey(0))
    assert_trees_equal(state.params, jax.tree.map(lambda b: b.unbox(), plain,
                                                  is_leaf=lambda x: hasattr(x, "unbox")))

    def broken(key):
        raise RuntimeError("init failed")

    with pytest.raises(RuntimeError, match="init failed"):
        state_lib.create_state(broken, tx, plan, seed=0)
    assert not jax.config.jax_threefry_gpu_kernel_lowering


@pytest.mark.slow
def test_sharded_step_matches_single_device():
    config = tiny_config("cacophony", 10, **{"tokenizer.vocab_size": 0})

    class Tok:
        vocab_size = 500

    task = tasks.build(config, Tok())
    tx, schedule = optimizer.make_optimizer(config.optim, config.train.steps)
    rules = partition.rules_from_config(config.sharding_rules)
    rng = np.random.default_rng(0)
    batch = {
        "audio": rng.integers(-3000, 3000, (8, 16000)).astype(np.int16),
        "audio_len": np.asarray([16000, 9000, 16000, 4000, 16000, 16000, 12000, 16000],
                                np.int32),
        "text_ids": rng.integers(3, 500, (8, 16)).astype(np.int32),
        "text_mask": np.ones((8, 16), np.int32),
        "valid": np.ones(8, np.float32),
    }
    results = []
    for shape, devices in (((1, 1), jax.devices()[:1]), ((2, 4), jax.devices())):
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=shape[0],
                                                                 fsdp=shape[1])), devices)
        plan = state_lib.plan_state(task.init_params, tx, mesh, rules)
        state = state_lib.create_state(task.init_params, tx, plan, seed=0)
        step = step_lib.jit_train_step(task, tx, schedule, plan, mesh,
                                       {k: v.shape for k, v in batch.items()}, rules)
        losses = []
        for _ in range(2):
            state, metrics = step(state, jax.device_put(
                batch, {k: mesh_lib.batch_sharding(mesh, v.ndim) for k, v in batch.items()}))
            losses.append([float(metrics["loss"]), float(metrics["grad_norm"])])
        metrics = {"loss": np.asarray(losses)}
        if shape == (2, 4):
            kernel = jax.tree.leaves(state.params["audio_encoder"])[0]
            assert len(kernel.sharding.device_set) == 8
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m8, p8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    # Adam divides by sqrt(v): a coordinate whose gradient is pure rounding noise
    # (e.g. ~1e-10) still moves by up to the learning rate (5e-4 here), in a
    # direction that depends on reduction order; so parameters agree to a fraction
    # of the learning rate, while loss and gradient norm agree to float precision.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1.5e-4)


def test_loop_reads_device_values_only_when_it_logs(tmp_path, monkeypatch, caplog):
    """Between log steps the loop only dispatches: no value comes back to the host.

    Every read of a device value (float(), .item(), .tolist(), jax.device_get) goes
    through `jax.Array._value`, and waits through `block_until_ready`; both are
    recorded with the number of steps dispatched so far. (np.asarray on a CPU array
    reads the buffer directly and is not seen.) The step also donates the old state.
    """
    array_type = type(jax.numpy.zeros(1))
    main = threading.main_thread()
    dispatched, reads = [0], []
    value, wait = array_type._value, array_type.block_until_ready

    def recording_value(self):
        if threading.current_thread() is main:
            reads.append(dispatched[0])
        return value.fget(self)

    def recording_wait(self):
        if threading.current_thread() is main:
            reads.append(dispatched[0])
        return wait(self)

    real_jit = step_lib.jit_train_step

    def counting_jit(*args, **kwargs):
        step = real_jit(*args, **kwargs)

        def counted(state, batch):
            out = step(state, batch)
            assert all(x.is_deleted() for x in jax.tree.leaves(state)), "state not donated"
            dispatched[0] += 1
            return out
        return counted

    monkeypatch.setattr(step_lib, "jit_train_step", counting_jit)
    monkeypatch.setattr(array_type, "_value", property(recording_value))
    monkeypatch.setattr(array_type, "block_until_ready", recording_wait)
    config = tiny_config("cacophony", 9, **{"train.log_every": 4, "data.eval.kind": "",
                                            "train.checkpoint_every": 100,
                                            "data.synthetic_train_size": 6})
    loop.run(config, str(tmp_path))
    assert dispatched[0] == 9
    # Six records, batches of eight: said once, with what it means for the loss.
    assert caplog.text.count("the training set has 6 records, fewer than a batch (8)") == 1
    assert "count as each other's negatives" in caplog.text
    # Init reads the step (0); the loop logs after steps 1, 4 and 8 and logs and
    # checkpoints after 9.
    assert {1, 4, 8, 9} <= set(reads) <= {0, 1, 4, 8, 9}, sorted(set(reads))


@pytest.mark.slow
def test_profile_steps_writes_a_trace_of_the_chosen_steps(tmp_path, caplog, monkeypatch):
    config = tiny_config("mae", 7, **{"train.profile_steps": 2, "data.eval.kind": ""})
    with caplog.at_level("INFO"):
        loop.run(config, str(tmp_path))
    traces = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert "profiler trace of steps 4-5" in caplog.text
    # A trace that cannot be written (e.g. an unreachable bucket) does not stop training.
    def fail(*args, **kwargs):
        raise RuntimeError("cannot write the trace")

    monkeypatch.setattr(jax.profiler, "stop_trace", fail)
    loop.run(tiny_config("mae", 7, **{"train.profile_steps": 2, "data.eval.kind": ""}),
             str(tmp_path / "again"))
    assert "the profiler trace could not be written" in caplog.text
    assert (tmp_path / "again" / "checkpoints" / "7").is_dir()
    # Processes of one run (maybe on one host, whose name names the files) trace apart.
    from cacophony_jax.train import host

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert host.Profiler(tmp_path / "p", 2, 0, 10).directory == tmp_path / "p" / "process_1"


def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
    config = tiny_config("mae", 5, **{"optim.learning_rate": float("nan"),
                                      "train.checkpoint_every": 1})
    with pytest.raises(ValueError, match="config.optim.learning_rate=nan must be a number"):
        loop.run(config, str(tmp_path))
    monkeypatch.setattr(checks, "check_config", lambda config: None)  # diverge anyway
    with pytest.raises(FloatingPointError, match="by step 1 .*no checkpoint had been saved"):
        loop.run(config, str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")


def test_a_diverged_state_is_never_saved(tmp_path, monkeypatch):
    jit_train_step = step_lib.jit_train_step

    def poisoned(*args, **kwargs):  # the parameters turn to NaN after step 3
        train_step = jit_train_step(*args, **kwargs)

        def run(state, batch):
            state, outputs = train_step(state, batch)
            if int(state.step) == 3:
                state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
            return state, outputs
        return run

    monkeypatch.setattr(step_lib, "jit_train_step", poisoned)
    # Logged at step 1 only: the save at step 4 is what checks.
    config = tiny_config("mae", 6, **{"train.log_every": 100, "train.checkpoint_every": 2,
                                      "data.eval.kind": ""})
    with pytest.raises(FloatingPointError, match="by step 4 .*newest checkpoint, step 2"):
        loop.run(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_mae_evaluation_masks_a_clip_the_same_way_in_any_row():
    """The eval batch size (or the number of processes) moves clips to other rows;
    each clip's mask is keyed by its id, so the reconstruction error stays the same."""
    import flax.linen as nn

    results = []
    for batch in (8, 16):  # clip 8 is row 0 of the second batch, then row 8 of one
        config = tiny_config("mae", 1, **{"data.eval_batch_size": batch,
                                          "data.synthetic_eval_size": 12})
        task = tasks.build(config, None)
        params = nn.unbox(task.init_params(jax.random.key(0)))
        results.append(task.evaluator(mesh_lib.make_mesh(config.mesh))(params))
    assert results[0]["eval/num_clips"] == results[1]["eval/num_clips"] == 12
    assert results[0]["eval/mse"] == pytest.approx(results[1]["eval/mse"], rel=1e-6)


def test_training_evaluation_scores_the_captions_inference_shows(monkeypatch):
    """In-training evaluation scores what `inference` would show for the generated ids
    (`Tokenizer.captions`: printable, a caption cut at its length limit ending at its
    last whole word), not the raw decode, so `eval` on the same weights agrees."""
    import flax.linen as nn

    from cacophony_jax.data import to_global
    from cacophony_jax.data.tokenizer import Tokenizer
    from cacophony_jax.tasks import cacophony as cacophony_task

    tok = Tokenizer.train_bpe(["a dog barks twice at night", "rain falls on a tin roof",
                               "a car engine idles in the street"], 300)
    config = tiny_config("cacophony", 1, **{"tokenizer.vocab_size": tok.vocab_size,
                                            "eval.caption_clips": 8, "eval.caption_max_len": 6,
                                            "data.synthetic_eval_size": 8})
    task = tasks.build(config, tok)
    generated = {}
    real_fn = task.embed_and_caption_fn

    def recording_fn(max_len, tokenizer=None):
        inner = real_fn(max_len, tokenizer)

        def run(params, batch):
            emb, ids = inner(params, batch)
            for i, row in zip(to_global.to_host(batch["example_id"]), to_global.to_host(ids),
                              strict=True):
                generated[int(i)] = row
            return emb, ids
        return run

    scored = {}

    def recording_scores(predictions, texts):
        scored.update(predictions)
        return {}

    monkeypatch.setattr(task, "embed_and_caption_fn", recording_fn)
    monkeypatch.setattr(cacophony_task, "caption_scores", recording_scores)
    params = nn.unbox(task.init_params(jax.random.key(0)))
    task.evaluator(mesh_lib.make_mesh(config.mesh), tok)(params)
    assert scored and set(scored) <= set(generated)
    keys = sorted(scored)
    ids = np.stack([generated[k] for k in keys])
    assert [scored[k] for k in keys] == tok.captions(ids)
    assert [scored[k] for k in keys] != tok.decode(ids)  # the raw decode differs here

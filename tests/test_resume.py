"""Resume: a crashed or stopped run continues bitwise identically, unreadable
checkpoints are skipped, kept and moved aside, and evaluations cut off by a stop are
done on the rerun (a full disk: test_full_disk.py)."""

import json
import logging
import os
import signal

import numpy as np
import pytest

from cacophony_jax.tasks import common as task_common
from cacophony_jax.train import checkpoint, host, loop
from cacophony_jax.train import step as step_lib
from tests.helpers import assert_trees_equal, read_metrics, restore_params, tiny_config


def _manifest_with_broken_files(root):
    import soundfile

    rows = []
    for k in range(10):
        tone = (8000 * np.sin(np.arange(16000) * (0.05 + 0.02 * k))).astype(np.int16)
        soundfile.write(root / f"t{k}.wav", tone, 16000, subtype="PCM_16")
        rows.append({"audio": f"t{k}.wav", "caption": f"tone number {k}"})
    (root / "junk.wav").write_bytes(b"RIFF....WAVEjunk")
    rows[3:3] = [{"audio": "missing.wav", "caption": "gone"},
                 {"audio": "junk.wav", "caption": "junk"}]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(root / "train.jsonl")


def _crashing_jit(at_call):
    """`step.jit_train_step` whose compiled steps raise on their `at_call`-th call, as a
    crash would (each run's calls counted from 1)."""
    real = step_lib.jit_train_step

    def make(*args, **kwargs):
        step = real(*args, **kwargs)
        calls = {"n": 0}

        def wrapped(state, batch):
            calls["n"] += 1
            if calls["n"] == at_call:
                raise RuntimeError("simulated crash")
            return step(state, batch)
        return wrapped
    return make


@pytest.mark.slow
def test_interrupted_run_resumes_bitwise_identically(tmp_path, monkeypatch):
    # Unreadable files in the data: the resumed run skips the same draws, and its
    # count of them carries on from the checkpoint.
    straight = tiny_config("mae", 12, **{"train.checkpoint_every": 6, "train.log_every": 3,
                                         "data.train.kind": "manifest",
                                         "data.train.path": _manifest_with_broken_files(tmp_path)})
    loop.run(straight, str(tmp_path / "a"))

    real_jit = step_lib.jit_train_step
    # After the step-6 checkpoint, before step 12.
    monkeypatch.setattr(step_lib, "jit_train_step", _crashing_jit(9))
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.run(straight, str(tmp_path / "b"))
    monkeypatch.setattr(step_lib, "jit_train_step", real_jit)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["6"]
    # And a stop signal arrives during the resumed run's last evaluation: training is
    # complete and saved, the run ends as stopped (a recipe would start no later stage).
    from cacophony_jax.tasks.mae import MAETask

    real_evaluator = MAETask.evaluator

    def evaluator(self, mesh, tokenizer=None):
        evaluate = real_evaluator(self, mesh, tokenizer)

        def signalled(params):
            os.kill(os.getpid(), signal.SIGTERM)
            return evaluate(params)
        return signalled

    monkeypatch.setattr(MAETask, "evaluator", evaluator)
    with pytest.raises(host.StopRequestedError, match="stopped at step 12 after signal 15"):
        loop.run(straight, str(tmp_path / "b"))
    assert "eval/mse" in read_metrics(tmp_path / "b")[-1]
    assert_trees_equal(restore_params(straight, tmp_path / "a"),
                       restore_params(straight, tmp_path / "b"))
    key = ("loss", "data/failed_records", "data/examples_seen", "data/epochs")
    rows_a = {r["step"]: tuple(r[k] for k in key) for r in read_metrics(tmp_path / "a")
              if "loss" in r}
    rows_b = [(r["step"], tuple(r[k] for k in key)) for r in read_metrics(tmp_path / "b")
              if "loss" in r]
    # Steps 7-8 ran twice; rows from before the crash were replaced, not repeated. Rows
    # are 3-step means: the resumed run's equal the uninterrupted run's, and it adds
    # one for its first step (7).
    assert [row for row in rows_b if row[0] != 7] == sorted(rows_a.items())
    assert [step for step, _ in rows_b] == [1, 3, 6, 7, 9, 12]
    assert 0 < rows_a[6][1] < rows_a[12][1]
    assert rows_a[12][2] == 12 * straight.data.global_batch_size
    clips = len(task_common.open_train_source(straight))
    assert rows_a[12][3] == pytest.approx(rows_a[12][2] / clips)


@pytest.mark.slow
def test_a_position_that_cannot_be_restored_is_taken_from_the_step(tmp_path, monkeypatch,
                                                                    caplog):
    # As when data.num_workers or the number of processes changed between the runs:
    # the saved position does not fit, and the input continues from the step's batch
    # (the same batches as the uninterrupted run), not from the start of the data; and
    # a later resume of that run continues from its own position, not from the
    # start of the stream it counted from.
    config = tiny_config("mae", 12, **{"train.checkpoint_every": 4, "train.log_every": 2})
    loop.run(config, str(tmp_path / "a"))
    real_jit = step_lib.jit_train_step
    # Step 6 of a fresh run, step 10 of one resumed at 4.
    monkeypatch.setattr(step_lib, "jit_train_step", _crashing_jit(6))
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.run(config, str(tmp_path / "b"))
    saved = tmp_path / "b" / "checkpoints" / "4" / "data_iter"
    for name in os.listdir(saved):  # saved "by another number of processes"
        os.rename(saved / name, saved / name.replace("-of-1", "-of-2"))
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="simulated"):
        loop.run(config, str(tmp_path / "b"))
    assert "as many batches as step 4 implies" in caplog.text
    monkeypatch.setattr(step_lib, "jit_train_step", real_jit)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loop.run(config, str(tmp_path / "b"))  # from step 8's own saved position
    assert "not restored" not in caplog.text
    assert_trees_equal(restore_params(config, tmp_path / "a"),
                       restore_params(config, tmp_path / "b"))
    def losses(workdir):  # the rows at multiples of log_every (the first step's aside)
        return {r["step"]: r["loss"] for r in read_metrics(workdir)
                if "loss" in r and r["step"] % 2 == 0}

    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 6


def test_a_position_saved_with_another_batch_or_worker_count_is_not_set():
    # Grain would accept some such states (another worker count) and fail later, and
    # another global batch moves every host's rows: the loop places the input instead,
    # by the examples drawn, which the saved counters still tell.
    class Iterator:
        def __init__(self):
            self.states = []

        def set_state(self, state):
            self.states.append(state)

    saved = {"next_index": 40, checkpoint.COUNTERS_KEY: {
        "examples_seen": 80, "failed_records": 2, "global_batch_size": 8, "num_workers": 0}}
    for expect in ({"global_batch_size": 16, "num_workers": 0},
                   {"global_batch_size": 8, "num_workers": 4}):
        target = checkpoint.IteratorTarget(Iterator(), expect=expect)
        with pytest.raises(checkpoint.CheckpointError, match="it was saved with data"):
            target.set_state(json.dumps(saved))
        assert not target.restored and not target.iterator.states
        assert target.counters["examples_seen"] == 80  # the totals still hold
    target = checkpoint.IteratorTarget(Iterator(), expect={"global_batch_size": 8,
                                                           "num_workers": 0})
    target.set_state(json.dumps(saved))
    assert target.restored and target.iterator.states == [{"next_index": 40}]


def test_counters_carry_on_when_a_steps_input_position_is_lost(tmp_path, caplog,
                                                                 monkeypatch):
    # The step's metadata keeps them too: data/failed_records does not restart at 0.
    import shutil

    import jax

    class Iterator:
        def set_state(self, state):
            raise AssertionError("no saved position to set")

    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((2,), np.float32, sharding=cpu)}
    counters = {"failed_records": 32, "examples_seen": 160, "first_batch": 0}
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    try:  # step 10 as saved before the counters were kept in the metadata
        ckpt.save(10, {"w": np.ones(2, np.float32)}, None, {"task": "mae"})
        ckpt.save(20, {"w": np.ones(2, np.float32)}, {"next_index": 40}, {"task": "mae"},
                  counters=counters)
    finally:
        ckpt.close()
    shutil.rmtree(tmp_path / "20" / "data_iter")
    for step, want in ((20, counters), (10, {})):
        reader = checkpoint.Checkpointer(tmp_path, async_save=False)
        try:
            target = checkpoint.IteratorTarget(Iterator())
            assert reader.restore(abstract, target, step=step)[1] == step
        finally:
            reader.close()
        assert not target.restored and target.counters == want
    assert "the input position saved at step 20 was not restored" in caplog.text
    # Another process takes the shared totals, not the first process's own count.
    monkeypatch.setattr(checkpoint.jax, "process_index", lambda: 1)
    reader = checkpoint.Checkpointer(tmp_path, async_save=False)
    try:
        target = checkpoint.IteratorTarget(Iterator())
        reader.restore(abstract, target, step=20)
    finally:
        reader.close()
    assert target.counters == {"examples_seen": 160, "first_batch": 0}


def test_a_position_placed_by_the_step_counts_examples_when_the_batch_changed():
    class Saved:
        def __init__(self, batch):
            self.batch = batch

        def saved_config(self, step):
            return {"data": {"global_batch_size": self.batch}} if self.batch else None

    assert loop._batches_drawn(Saved(8), 10, 8) == 10
    assert loop._batches_drawn(Saved(8), 10, 16) == 5  # 80 examples drawn
    assert loop._batches_drawn(Saved(8), 10, 12) == 6  # 72: 8 drawn again, none skipped
    assert loop._batches_drawn(Saved(None), 10, 12) == 10  # no saved config: by the step


@pytest.mark.slow
def test_unreadable_checkpoint_is_skipped_and_kept(tmp_path, caplog):
    config = tiny_config("mae", 10)
    loop.run(config, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["10", "5"]
    for dirpath, _, files in os.walk(ckpts / "10" / "state"):
        for name in files:  # corrupt every file of the newest state
            with open(os.path.join(dirpath, name), "wb") as f:
                f.write(b"garbage")
    longer = tiny_config("mae", 10, **{"train.steps": 12, "data.synthetic_train_size": 40,
                                       "seed": 3})
    loop.run(longer, str(tmp_path))
    assert "unreadable" in caplog.text
    # Other data, another shuffle.
    assert "resuming with config.data.synthetic_train_size (48 -> 40), config.seed (0 -> 3)" \
        in caplog.text
    # Moved aside at once (out of the keep-N count), not when step 10 is saved again.
    assert caplog.text.index("moved unreadable") < caplog.text.index("resuming with config")
    assert "resuming with config.train.steps (10 -> 12): the learning-rate schedule from " \
           "step 6 on is the new one" in caplog.text
    names = sorted(os.listdir(ckpts))
    # Step 10 was saved again; the unreadable one was moved aside, not overwritten.
    assert {"10.corrupt-0", "10", "12"} <= set(names)
    kept = [p for p in (ckpts / "10.corrupt-0" / "state").rglob("*") if p.is_file()]
    assert kept and all(p.read_bytes() == b"garbage" for p in kept)
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps[-7:] == [6, 7, 8, 9, 10, 11, 12]  # resumed from step 5


@pytest.mark.slow  # trains, damages and resumes (about 20 s on 2 cores)
def test_a_damaged_input_position_falls_back_to_an_older_step(tmp_path, caplog):
    config = tiny_config("mae", 10)
    loop.run(config, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    position = ckpts / "10" / "data_iter" / "process_0-of-1.json"
    position.write_text(position.read_text()[:20])  # cut off mid-write, say
    loop.run(tiny_config("mae", 10, **{"train.steps": 12}), str(tmp_path))
    assert "input-pipeline position" in caplog.text and "damaged" in caplog.text
    # Resumed exactly from step 5 (not from 10 with a fresh pass over the data); the
    # damaged step is kept aside.
    assert "10.corrupt-0" in os.listdir(ckpts)
    assert "schedule from step 6 on is the new one" in caplog.text  # resumed at step 5
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_a_position_damaged_on_another_process_makes_every_process_go_back(
        tmp_path, caplog, monkeypatch):
    from cacophony_jax.train import agree

    loop.run(tiny_config("mae", 10), str(tmp_path))
    real = agree.agree

    def two_processes(stage, error):  # process 1 finds step 10's position damaged
        if stage == "reading step 10's input positions":
            raise agree.OtherProcessError(f"process 1 of 2 failed {stage}: damaged")
        real(stage, error)

    monkeypatch.setattr(agree, "agree", two_processes)
    loop.run(tiny_config("mae", 10, **{"train.steps": 12}), str(tmp_path))
    assert "process 1 of 2 failed reading step 10's input positions" in caplog.text
    assert "schedule from step 6 on is the new one" in caplog.text  # resumed at step 5
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps == list(range(1, 13))


def test_a_final_evaluation_cut_off_by_a_kill_is_logged_on_the_rerun(tmp_path, caplog,
                                                                      monkeypatch):
    config = tiny_config("mae", 4)
    loop.run(config, str(tmp_path))
    path = tmp_path / "metrics.jsonl"

    def eval_rows():
        return [r for r in read_metrics(tmp_path) if "eval/mse" in r]

    assert [r["step"] for r in eval_rows()] == [4]
    # Killed during the final evaluation: step 4 was saved, its eval row never written.
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if "eval/mse" not in line))
    loop.run(config, str(tmp_path))  # "already trained": evaluates, and now logs it
    assert [r["step"] for r in eval_rows()] == [4]
    prefetchers, real = [], host.Prefetcher
    monkeypatch.setattr(host, "Prefetcher", lambda *a: prefetchers.append(a) or real(*a))
    loop.run(config, str(tmp_path))  # once only, however often it is rerun
    assert [r["step"] for r in eval_rows()] == [4]
    assert not prefetchers  # a finished run reads no training data
    # Evaluated again on another set: no second row at the step (TensorBoard would show
    # the step twice); the run's result is the new evaluation, and the change is named.
    logged = eval_rows()[0]
    with caplog.at_level(logging.WARNING):
        again = loop.run(tiny_config("mae", 4, **{"data.synthetic_eval_size": 12}),
                         str(tmp_path))
    assert eval_rows() == [logged] and again["eval/num_clips"] == 12 != logged["eval/num_clips"]
    assert "evaluated step 4 again and got other values" in caplog.text
    caplog.clear()
    # A rerun of the finished run with other settings trains nothing: config.json stays
    # the one it trained with, and no "resuming with ..." warning says otherwise.
    saved = (tmp_path / "config.json").read_text()
    loop.run(tiny_config("mae", 2, **{"optim.learning_rate": 0.5}), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved
    assert "resuming with" not in caplog.text


def test_an_evaluation_skipped_by_a_stop_is_done_on_the_rerun(tmp_path, monkeypatch):
    config = tiny_config("mae", 4, **{"train.eval_every": 2, "train.checkpoint_every": 2})
    real_jit = step_lib.jit_train_step

    def signalling_jit(*args, **kwargs):
        step, calls = real_jit(*args, **kwargs), [0]

        def wrapped(state, batch):
            calls[0] += 1
            if calls[0] == 2:  # stopped at step 2, an evaluation step: saved, not evaluated
                os.kill(os.getpid(), signal.SIGTERM)
            return step(state, batch)
        return wrapped

    monkeypatch.setattr(step_lib, "jit_train_step", signalling_jit)
    with pytest.raises(host.StopRequestedError, match="stopped at step 2"):
        loop.run(config, str(tmp_path))
    monkeypatch.setattr(step_lib, "jit_train_step", real_jit)
    assert not [r for r in read_metrics(tmp_path) if "eval/mse" in r]
    for _ in range(2):  # the resumed run, then a rerun of the finished one
        loop.run(config, str(tmp_path))
        assert [r["step"] for r in read_metrics(tmp_path) if "eval/mse" in r] == [2, 4]

"""Reruns of a finished run: they evaluate again but open no training data (no input
pipeline, no decoding of files, no skip warnings), in a recipe stage by stage."""

import logging

import pytest

from cacophony_jax.data import pipeline
from cacophony_jax.data.synthetic import write_corpus
from cacophony_jax.tasks import common
from cacophony_jax.train import loop, stages
from tests.helpers import assert_trees_equal, read_metrics, restore_params, tiny_config


def _spy_on_data(monkeypatch):
    """Records the data blocks opened ("train"/"eval", with the stage's task) and the
    training pipelines built from then on."""
    opened, pipelines = [], []
    real_open, real_dataset = common.open_block, pipeline.train_dataset
    monkeypatch.setattr(common, "open_block", lambda config, which, *a, **kw: (
        opened.append((config.task, which)), real_open(config, which, *a, **kw))[1])
    monkeypatch.setattr(pipeline, "train_dataset", lambda *a, **kw: (
        pipelines.append(a), real_dataset(*a, **kw))[1])
    return opened, pipelines


@pytest.mark.slow  # trains a run, then reruns it (about 20 s on 2 cores)
def test_a_rerun_of_a_finished_run_reads_no_training_data(tmp_path, caplog, monkeypatch):
    manifest = write_corpus(tmp_path / "data", "train", 16, 1.0)
    config = tiny_config("mae", 2, **{"data.train.kind": "manifest",
                                      "data.train.path": str(manifest)})
    workdir = str(tmp_path / "run")
    stages.run(config, workdir)
    for wav in (tmp_path / "data" / "audio").iterdir():  # broken since: never read again
        wav.write_bytes(b"RIFF....WAVEjunk")
    opened, pipelines = _spy_on_data(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = stages.run(config, workdir)
    assert not pipelines and ("mae", "train") not in opened
    assert "skipping record" not in caplog.text and "cannot decode" not in caplog.text
    # It still evaluates the finished run again (its evaluation set is opened).
    assert ("mae", "eval") in opened and again["mae"]["eval/num_clips"] == 8
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == [1, 2]


@pytest.mark.slow  # trains a stage-2 run, then reruns it (about 30 s on 2 cores)
def test_a_run_resumed_from_a_finished_one_reads_no_training_data(tmp_path, monkeypatch):
    from cacophony_jax.train import init

    manifest = write_corpus(tmp_path / "data", "train", 16, 1.0)
    config = tiny_config("cacophony", 2, **{"data.train.kind": "manifest",
                                            "data.train.path": str(manifest)})
    stages.run(config, str(tmp_path / "first"))
    resumed = tiny_config("cacophony", 2, **{"data.train.kind": "manifest",
                                             "data.train.path": str(manifest),
                                             "train.resume": str(tmp_path / "first")})
    assert init.finished(resumed, tmp_path / "second")
    longer = tiny_config("cacophony", 3, **{"train.resume": str(tmp_path / "first")})
    assert not init.finished(longer, tmp_path / "second")  # step 3 is still to train
    missing = tiny_config("cacophony", 2, **{"train.resume": str(tmp_path / "nowhere")})
    assert not init.finished(missing, tmp_path / "second")  # restoring says what is wrong
    (tmp_path / "first" / "tokenizer.json").rename(tmp_path / "tokenizer.kept")
    assert not init.finished(resumed, tmp_path / "second")  # its tokenizer needs the data
    (tmp_path / "tokenizer.kept").rename(tmp_path / "first" / "tokenizer.json")
    opened, pipelines = _spy_on_data(monkeypatch)
    again = stages.run(resumed, str(tmp_path / "second"))
    assert not pipelines and ("cacophony", "train") not in opened
    assert ("cacophony", "eval") in opened and "eval/num_clips" in again["cacophony"]


def test_a_finished_run_whose_last_step_is_unreadable_trains_it_again(tmp_path, caplog,
                                                                      monkeypatch):
    config = tiny_config("mae", 4, **{"train.checkpoint_every": 2})
    loop.run(config, str(tmp_path))
    trained = restore_params(config, str(tmp_path))
    for path in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    opened, pipelines = _spy_on_data(monkeypatch)
    loop.run(config, str(tmp_path))
    assert "unreadable" in caplog.text and ("mae", "train") in opened and pipelines
    # From step 2's saved input position: the same batches, the same weights.
    assert "was not restored" not in caplog.text
    assert_trees_equal(restore_params(config, str(tmp_path)), trained)
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r][-2:] == [3, 4]


def test_a_recipe_opens_the_training_data_of_its_unfinished_stages_only(tmp_path,
                                                                       monkeypatch):
    from configs import quickstart

    monkeypatch.setattr(stages.loop, "run", lambda stage, workdir: {})
    opened, _ = _spy_on_data(monkeypatch)
    (tmp_path / "mae" / "checkpoints" / "2").mkdir(parents=True)  # stage 1 has finished
    stages.run(quickstart.get_config("steps1=2,steps2=2"), str(tmp_path))
    # Stage 1 evaluates nothing (data.eval.kind is ''): it opens no data at all.
    assert opened == [("cacophony", "train"), ("cacophony", "eval")]
    opened.clear()
    (tmp_path / "cacophony" / "checkpoints" / "2").mkdir(parents=True)
    stages.run(quickstart.get_config("steps1=2,steps2=2"), str(tmp_path))
    assert opened == [("cacophony", "eval")]  # checked up front: the rerun evaluates on it


def test_a_restored_input_position_starts_prefetching_only_when_asked(tmp_path):
    # Grain's restore starts the iterator's prefetching (decoding files, starting
    # workers); a run that turns out to have nothing to train must not.
    import jax
    import numpy as np

    from cacophony_jax.train import checkpoint

    class Iterator:
        def __init__(self):
            self.calls = []

        def set_state(self, state):
            self.calls.append("set_state")

        def start_prefetch(self):
            self.calls.append("start_prefetch")

    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((2,), np.float32, sharding=cpu)}
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    try:
        ckpt.save(4, {"w": np.ones(2, np.float32)}, {"next_index": 8}, {"task": "mae"})
        target = checkpoint.IteratorTarget(Iterator())
        assert ckpt.restore(abstract, target)[1] == 4
    finally:
        ckpt.close()
    assert target.restored and target.iterator.calls == ["set_state"]
    target.prefetch()  # the loop's call, once it knows it trains
    assert target.iterator.calls == ["set_state", "start_prefetch"]
    fresh = checkpoint.IteratorTarget(Iterator())
    fresh.prefetch()  # no restored position: it starts on the first batch as ever
    assert fresh.iterator.calls == []

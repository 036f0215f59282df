"""The training system end to end: stages and start points (checks before a run are in
test_train_checks.py, the step and loop in test_train_loop.py, resume in test_resume.py)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from cacophony_jax import tasks
from cacophony_jax.models import stack
from cacophony_jax.optim import optimizer
from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.parallel import partition
from cacophony_jax.train import checkpoint, encoder_init, flops, loop, stages
from cacophony_jax.train import init as init_lib
from cacophony_jax.train import state as state_lib
from tests.helpers import (
    assert_trees_equal,
    read_metrics,
    restore_params,
    tiny_config,
    tokenizer_for,
)


@pytest.mark.slow
def test_stage1_then_stage2_through_the_stage_runner(tmp_path, caplog):
    mae = tiny_config("mae", 4, **{"data.eval.kind": "", "train.log_update_norm": True})
    caco = tiny_config("cacophony", 4, **{"train.init_from": str(tmp_path / "mae"),
                                          "eval.caption_clips": 4, "train.peak_tflops": 0.5})
    stages.run(mae, str(tmp_path / "mae"))
    results = stages.run(caco, str(tmp_path / "caco"))
    rows = read_metrics(tmp_path / "caco")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert {"loss/contrastive", "loss/caption", "grad_norm", "learning_rate", "param_norm",
            "perf/first_step_seconds"} <= set(rows[0])
    assert "update_norm" not in rows[0]  # only with train.log_update_norm
    mae_rows = [r for r in read_metrics(tmp_path / "mae") if "loss" in r]
    assert [r["update_norm"] > 0 for r in mae_rows] == [False, True, True, True]  # lr 0 first
    # param_norm is the logged step's parameters' norm: the last one is the saved one's.
    saved = restore_params(mae, tmp_path / "mae")
    np.testing.assert_allclose(
        mae_rows[-1]["param_norm"],
        np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(saved))),
        rtol=1e-5)
    assert "perf/input_wait_fraction" in rows[1] and "perf/steps_per_sec" not in rows[0]
    metrics = results["cacophony"]
    assert 0 <= metrics["eval/t2a_R@10"] <= 100 and "eval/zeroshot_top1" in metrics
    assert 0 <= metrics["eval/caption_names_class"] <= 100
    assert "eval/caption_CIDEr-D" in metrics
    assert os.path.isdir(tmp_path / "caco" / "checkpoints" / "4")
    assert os.path.exists(tmp_path / "caco" / "tensorboard")
    # Stage 2 starts from stage 1's encoder exactly (the rest is freshly initialised).
    task = tasks.build(caco, tokenizer_for(caco, tmp_path / "caco"))
    tx, schedule = optimizer.make_optimizer(caco.optim, caco.train.steps)
    mesh = mesh_lib.make_mesh(caco.mesh)
    plan = state_lib.plan_state(task.init_params, tx, mesh,
                                partition.rules_from_config(caco.sharding_rules))
    # The logged model TFLOP/s is the counted step FLOPs per device times steps/s;
    # MFU divides it by train.peak_tflops.
    length = caco.data.text_length
    shapes = {"audio": (8, 16000), "audio_len": (8,), "valid": (8,),
              "text_ids": (8, length), "text_mask": (8, length)}
    per_device = flops.step_model_flops(caco, tokenizer_for(caco, tmp_path / "caco"), tx,
                                        schedule, plan, mesh, shapes) / mesh.devices.size
    for row in (r for r in rows if "perf/steps_per_sec" in r):
        assert row["perf/model_tflops_per_device"] * 1e12 == pytest.approx(
            per_device * row["perf/steps_per_sec"], rel=1e-6)
        assert row["perf/mfu"] == pytest.approx(row["perf/model_tflops_per_device"] / 0.5)
    def start_from(config, task, plan):  # a fresh workdir
        empty = checkpoint.Checkpointer(tmp_path / "empty", async_save=False)
        try:
            return init_lib.restore_or_init(config, task, tx, plan, empty, None)
        finally:
            empty.close()

    start = start_from(caco, task, plan)
    assert_trees_equal(start.params["audio_encoder"],
                       restore_params(mae, tmp_path / "mae")["encoder"])
    # A scanned stage 2 gets the same encoder, its blocks stacked.
    scanned = tiny_config("cacophony", 4, **{"train.init_from": str(tmp_path / "mae"),
                                             "model.scan": True})
    scanned_task = tasks.build(scanned, tokenizer_for(caco, tmp_path / "caco"))
    scanned_plan = state_lib.plan_state(scanned_task.init_params, tx, mesh,
                                        partition.rules_from_config(caco.sharding_rules))
    start = start_from(scanned, scanned_task, scanned_plan)
    assert "blocks" in start.params["audio_encoder"]
    assert_trees_equal(start.params["audio_encoder"],
                       stack.stack_layers(restore_params(mae, tmp_path / "mae")["encoder"]))
    # A newer unreadable checkpoint of the stage-1 run: the encoder comes from step 4.
    copied = tmp_path / "mae2" / "checkpoints"
    shutil.copytree(tmp_path / "mae" / "checkpoints", copied)
    shutil.copytree(copied / "4", copied / "9")
    for path in (copied / "9" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    from_older = tiny_config("cacophony", 4, **{"train.init_from": str(tmp_path / "mae2")})
    assert_trees_equal(start_from(from_older, task, plan).params["audio_encoder"],
                       restore_params(mae, tmp_path / "mae")["encoder"])
    # The step noted as the start is the one read, not the unreadable newest.
    noted = json.loads((tmp_path / encoder_init.START_FILE).read_text())
    assert noted == {"init_from": str((tmp_path / "mae2").resolve()), "step": 4}
    # A stage-1 run that had not finished (its newest step is 2 of 4) is warned about.
    unfinished = tmp_path / "mae3" / "checkpoints"
    shutil.copytree(tmp_path / "mae" / "checkpoints" / "4", unfinished / "2")
    with caplog.at_level("WARNING"):
        start_from(tiny_config("cacophony", 4, **{"train.init_from": str(unfinished)}),
                   task, plan)
    assert "from step 2 of" in caplog.text and "configured for 4 steps" in caplog.text
    # An older step named on purpose, of a run that went on past it, is not "unfinished".
    shutil.copytree(tmp_path / "mae" / "checkpoints" / "4", unfinished / "4")
    caplog.clear()
    with caplog.at_level("WARNING"):
        start_from(tiny_config("cacophony", 4, **{"train.init_from": str(unfinished / "2")}),
                   task, plan)
    assert "had not finished" not in caplog.text
    # A stage-1 run of another size is refused from its saved config, before any read.
    base = tiny_config("cacophony", 4, **{"train.init_from": str(tmp_path / "mae"),
                                          "model.variant": "base"})
    with pytest.raises(checkpoint.CheckpointError, match="is a model.variant='tiny' run"):
        encoder_init.audio_encoder(base, None)
    # The wrong kind of run is refused before any training, naming what to use instead.
    wrong = [
        ("cacophony", {"train.init_from": str(tmp_path / "caco")}, "empty", "stage-1 .mae. run"),
        ("cacophony", {"train.resume": str(tmp_path / "mae")}, "empty",
         "'mae' run, this is a 'cacophony' run .to start stage 2 .*init_from"),
        ("cacophony", {}, "mae/checkpoints", "belong to a 'mae' run.*another --workdir"),
        ("mae", {}, "mae/checkpoints", r"none of the checkpoints .* \(steps \[4\]\) fits"),
        ("mae", {"optim.accum_steps": 2}, "mae/checkpoints",
         r"it changes config.optim.accum_steps \(1 -> 2\), which the saved state"),
        ("mae", {"optim.accum_steps": 2, "train.resume": str(tmp_path / "mae")}, "empty",
         r"holds no checkpoint that fits this run: this run changes config.optim.accum_steps"),
    ]
    for stage, overrides, folder, message in wrong:
        config = tiny_config(stage, 4, **overrides)
        # The "mae" cases offer a mae run's checkpoints a Cacophony state, so nothing
        # fits; the message lists the state fields the two configs set differently.
        # Writable, as a run opens its workdir: checkpoints that do not fit this config
        # must be refused, not moved aside as unreadable.
        reader = checkpoint.Checkpointer(tmp_path / folder, async_save=False)
        caplog.clear()
        try:
            with pytest.raises(checkpoint.CheckpointError, match=message):
                init_lib.restore_or_init(config, task, tx, plan, reader, None)
        finally:
            reader.close()
        if "accum_steps" in overrides and "train.resume" not in overrides:
            # Refused from the saved configs, without calling each step "unreadable".
            assert "unreadable" not in caplog.text
    assert sorted(os.listdir(tmp_path / "mae" / "checkpoints")) == ["4"]  # left as it was
    # A change of a listed field that keeps the state's shapes resumes (with a warning).
    gentler = tiny_config("mae", 4, **{"optim.clip_norm": 0.5})
    mae_task = tasks.build(gentler, None)
    mae_tx, _ = optimizer.make_optimizer(gentler.optim, gentler.train.steps)
    mae_plan = state_lib.plan_state(mae_task.init_params, mae_tx, mesh,
                                    partition.rules_from_config(gentler.sharding_rules))
    reader = checkpoint.Checkpointer(tmp_path / "mae" / "checkpoints", async_save=False)
    try:
        state = init_lib.restore_or_init(gentler, mae_task, mae_tx, mae_plan, reader, None)
    finally:
        reader.close()
    assert int(state.step) == 4 and "config.optim.clip_norm (1.0 -> 0.5)" in caplog.text
    # Through the loop, a refused run leaves the workdir's config.json alone too.
    before = (tmp_path / "caco" / "config.json").read_text()
    with pytest.raises(checkpoint.CheckpointError, match="another --workdir"):
        loop.run(tiny_config("mae", 4), str(tmp_path / "caco"))
    assert (tmp_path / "caco" / "config.json").read_text() == before
    # A stage-2 config on a stage-1 workdir says so first (not that its tokenizer is
    # missing: a stage-1 run has none).
    with pytest.raises(checkpoint.CheckpointError, match="belong to a 'mae' run.*another"):
        loop.run(tiny_config("cacophony", 4), str(tmp_path / "mae"))
    # A recipe's later stage started from a stage-2 run is refused before stage 1 trains.
    from configs import quickstart

    recipe = quickstart.get_config("steps1=2,steps2=2")
    with recipe.unlocked():
        recipe.stages.cacophony.train.init_from = str(tmp_path / "caco")
    with pytest.raises(ValueError, match=r"^stage 'cacophony' \(--config.stages.cacophony.\*\): "
                                         r"config.train.init_from: .*caco' is a checkpoint of "
                                         r"a 'cacophony' run, not of a 'mae' run"):
        stages.run(recipe, str(tmp_path / "recipe"))
    assert not (tmp_path / "recipe").exists()


def test_unreadable_eval_clips_are_left_out_and_the_run_is_saved(tmp_path, monkeypatch):
    import soundfile

    rows = []
    for k in range(6):
        tone = (8000 * np.sin(np.arange(16000) * (0.05 + 0.02 * k))).astype(np.int16)
        soundfile.write(tmp_path / f"t{k}.wav", tone, 16000, subtype="PCM_16")
        rows.append({"audio": f"t{k}.wav", "captions": [f"tone number {k}"]})
    rows.insert(2, {"audio": "missing.wav", "captions": ["gone"]})
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = tiny_config("cacophony", 2, **{"data.eval.kind": "manifest",
                                            "data.eval.path": str(tmp_path / "eval.jsonl")})
    monkeypatch.chdir(tmp_path)
    final = loop.run(config, "run")  # a relative workdir, as in the README's commands
    assert final["eval/num_clips"] == 6 and final["eval/skipped_clips"] == 1
    assert 0 <= final["eval/t2a_R@1"] <= 100
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")


@pytest.mark.slow
def test_sam_and_accumulation_are_config_switches(tmp_path):
    plain = tiny_config("mae", 2, **{"data.eval.kind": ""})
    sam = tiny_config("mae", 2, **{"data.eval.kind": "", "optim.sam.enabled": True,
                                   "optim.accum_steps": 2})
    loop.run(plain, str(tmp_path / "plain"))
    loop.run(sam, str(tmp_path / "sam"))
    a, b = (restore_params(c, tmp_path / n) for c, n in ((plain, "plain"), (sam, "sam")))
    # Same data and start; SAM's perturbed gradient (and accumulation) move the
    # parameters elsewhere, and training stays finite.
    assert any(not np.array_equal(x, y)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "sam") if "loss" in r)


def test_a_failed_write_names_its_file_and_keeps_the_old_one(tmp_path):
    import errno

    from cacophony_jax import atomic_write

    target = tmp_path / "results.json"
    target.write_text("old")
    full = pytest.raises(OSError, match=r"No space left on device: '.*results.json'")
    with full as caught, atomic_write.replacing(target) as f:
        f.write("new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a full disk's flush
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_a_signal_between_two_stages_starts_no_later_stage(tmp_path, monkeypatch):
    import signal

    ran = []

    def one_stage(stage, workdir):  # stands in for training: the signal comes as it ends
        ran.append(os.path.basename(workdir))
        os.kill(os.getpid(), signal.SIGINT)
        return {}

    _recipe_stops_after_stage_1(one_stage, ran, signal.SIGINT, tmp_path, monkeypatch)


def _recipe_stops_after_stage_1(one_stage, ran, signum, tmp_path, monkeypatch):
    """Runs the quickstart recipe with `one_stage` as every stage's training: it must stop
    (StopRequestedError for `signum`) after stage 1, with the signal handler restored."""
    import signal

    from etils import epath

    from cacophony_jax.train import host, loop
    from configs import quickstart

    monkeypatch.setattr(loop, "run", one_stage)
    before = signal.getsignal(signum)
    with pytest.raises(host.StopRequestedError, match=f"after signal {int(signum)}"):
        stages._run_stages(quickstart.get_config(), epath.Path(tmp_path))
    assert ran == ["mae"] and signal.getsignal(signum) is before


@pytest.mark.parametrize("when", ["as the stage starts", "as its loop ends"])
def test_a_signal_during_a_stage_outside_its_loop_stops_the_recipe(when, tmp_path,
                                                                    monkeypatch):
    """A stage opens its data (and trains a tokenizer) before its loop takes the signals
    over, and closes its files after giving them back: a stop asked for then is not
    lost in between."""
    import signal

    from cacophony_jax.train import host

    ran, seen = [], []

    def one_stage(stage, workdir):  # stands in for loop.run's hold on the signals
        ran.append(os.path.basename(workdir))
        if when == "as the stage starts":
            os.kill(os.getpid(), signal.SIGTERM)
        stopper = host.StopSignal()
        try:
            seen.append(stopper.agreed())
            if stopper.agreed():
                raise host.StopRequestedError(1, stopper.signum)
            if when == "as its loop ends":
                os.kill(os.getpid(), signal.SIGTERM)
        finally:
            stopper.restore()
        return {}

    _recipe_stops_after_stage_1(one_stage, ran, signal.SIGTERM, tmp_path, monkeypatch)
    assert seen == [when == "as the stage starts"]

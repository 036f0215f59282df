"""Checks before a run: bad settings, paths and data are refused before anything trains."""

import json
import logging
import os

import pytest

from cacophony_jax.train import checks, loop, stages
from tests.helpers import tiny_config


def test_remote_paths_are_refused_with_the_mount_to_use(tmp_path):
    with pytest.raises(ValueError, match=r"--workdir='gs://b/run' is not a file-system path.*"
                                         r"gcsfuse --implicit-dirs --rename-dir-limit=100000 "
                                         r"b /mnt/gcs/b"):
        stages.run(tiny_config("mae", 2), "gs://b/run")
    config = tiny_config("mae", 2, **{"data.train.kind": "manifest",
                                      "data.train.path": "gs://data/train.jsonl"})
    with pytest.raises(ValueError, match="config.data.train.path='gs://data/train.jsonl'"):
        stages.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    # A missing optional tokenizer path says it is optional.
    config = tiny_config("cacophony", 2, **{"tokenizer.path": str(tmp_path / "roberta-base")})
    with pytest.raises(ValueError, match="roberta-base' does not exist .*it is optional: leave "
                                         "it out to train a byte-level BPE"):
        stages.run(config, str(tmp_path / "w"))


def test_a_run_opens_its_data_up_front_and_warns_once(tmp_path, caplog, monkeypatch):
    from cacophony_jax.tasks import common
    from configs import quickstart

    rows = [{"audio": f"{i}.wav", "caption": "a dog barks", "captoins": "x"} for i in range(4)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = quickstart.get_config()
    with config.unlocked():
        for name in config.stage_order:
            config.stages[name].data.train.update(kind="manifest", path=str(tmp_path / "m.jsonl"))
    # Each stage opens its data again when it trains (here: only that).
    monkeypatch.setattr(stages.loop, "run", lambda stage, workdir: (
        common.open_train_source(stage), common.open_eval_source(stage), {})[-1])
    opens = []
    real_open = common.sources.open_source
    monkeypatch.setattr(common.sources, "open_source",
                        lambda kind, **kw: (opens.append(kind), real_open(kind, **kw))[1])
    with caplog.at_level(logging.WARNING):
        stages.run(config, str(tmp_path / "w"))
        # Shown when the recipe opened both stages' data up front, not again per stage.
        said = [r.getMessage() for r in caplog.records
                if "'captoins' is not read" in r.getMessage()]
        assert len(said) == 2
        logging.warning(said[0])  # the filter left with the recipe
        assert caplog.text.count("'captoins' is not read") == 3
    # A malformed message passes the filter (the handler reports it), raising nothing.
    malformed = logging.LogRecord("x", logging.WARNING, "f.py", 1, "%d files", ("x",), None)
    assert stages._ShownWarnings().filter(malformed)
    # The first stage trains on the sources checked up front; the second (hours later)
    # opens its own again.
    first, second = ([stage.data.train.kind] + [stage.data.eval.kind] * bool(stage.data.eval.kind)
                     for stage in (config.stages[n] for n in config.stage_order))
    assert opens == first + second + second
    # One stage: its data is checked up front too (every process of a run agrees on a
    # failure there), then trained on.
    opens.clear()
    stages.run(config.stages[config.stage_order[0]], str(tmp_path / "one"))
    assert opens == first


def test_a_wrong_config_string_names_its_form():
    from configs import mae, quickstart

    with pytest.raises(ValueError, match=r"'step' in 'tiny,step=3'.*:tiny\|base,steps=N,batch=N"):
        mae.get_config("tiny,step=3")
    with pytest.raises(ValueError, match=r"after the file as :steps1=N,steps2=N$"):
        quickstart.get_config("steps=3")


def test_counts_that_cannot_work_are_rejected_before_anything_runs(tmp_path):
    from configs import quickstart

    config = quickstart.get_config()
    last = config.stage_order[-1]
    with config.unlocked():
        config.stages[last].train.keep_checkpoints = 0
    with pytest.raises(ValueError, match=rf"stage '{last}' .*: config.train.keep_checkpoints=0"):
        stages.run(config, str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()  # stage 1 did not start
    with pytest.raises(ValueError, match="--workdir is empty"):
        stages.run(quickstart.get_config(), " ")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"--workdir .*afile/sub cannot be created \(Not a dir"):
        stages.run(quickstart.get_config(), str(tmp_path / "afile" / "sub"))
    # Stage 2's mistakes, paths included, stop the recipe before stage 1 trains.
    for key, value, message in (
            ("loss.kind", "sigmoid", "needs config.model.sigmoid_bias=True"),
            ("loss.kind", "infonce", r"config.loss.kind='infonce' is not one of"),
            ("model.remat", "partial", "config.model.remat='partial' is not one of"),
            ("data.text_length", 1, "config.data.text_length=1 must be a number >= 2"),
            ("data.text_length", 41, "more than the tiny text tower's 40 positions"),
            ("eval.caption_max_len", 64, r"caption_max_len=64 must be 0 \(the text length\) "
             r"or in \[2, 40\]"),
            ("optim.max_logit_scale", -1.0, "max_logit_scale=-1.0 must be a number >= 0"),
            ("loss.chunk_size", 7, "config.loss.chunk_size=7 must divide"),
            ("tokenizer.path", "no/such/tok", "config.tokenizer.path='no/such/tok' does not"),
            ("data.eval.kind", "esc50", "config.data.eval.kind='esc50' reads files"),
            ("optim.learning_rate", -1e-3, "learning_rate=-0.001 must be a number >= 0"),
            ("optim.b2", 2.0, r"config.optim.b2=2.0 must be in \[0, 1\)"),
            ("model.drop_path", 1.5, "drop_path=1.5 must be in"),
            ("data.synthetic_prob", 3.0, "synthetic_prob=3.0 must be in"),
            ("sharding_rules", (("batch", ("data", "fsdpp")),), r"maps 'batch' to \['fsdpp'\]")):
        config = quickstart.get_config()
        with config.unlocked():
            target = config.stages[last]
            *parents, leaf = key.split(".")
            for part in parents:
                target = target[part]
            target[leaf] = value
        with pytest.raises(ValueError, match=rf"stage '{last}' .*{message}"):
            stages.run(config, str(tmp_path / "q"))
        assert not (tmp_path / "q").exists()
    # Stage 2's data is opened too (its lists, not its audio): a manifest without the
    # columns, a split a layout lacks.
    (tmp_path / "rows.jsonl").write_text('{"path": "a.wav", "text": "a dog"}\n')
    (tmp_path / "ac").mkdir()
    for block, settings, message in (
            ("train", dict(kind="manifest", path=str(tmp_path / "rows.jsonl")),
             r"config.data.train \(kind='manifest', .*has no usable rows"),
            ("eval", dict(kind="audiocaps", path=str(tmp_path / "ac"), split="dev"),
             r"config.data.eval \(kind='audiocaps', .*split='dev'\): AudioCaps has splits")):
        config = quickstart.get_config()
        with config.unlocked():
            config.stages[last].data[block].update(settings)
        with pytest.raises(ValueError, match=rf"stage '{last}' .*{message}"):
            stages.run(config, str(tmp_path / "q"))
        assert not (tmp_path / "q").exists()
    # The recipe's summary: chance is k / clips, at most 100 %.
    table = stages.summary({"s": {"eval/num_clips": 8.0, "eval/t2a_R@1": 50.0,
                                  "eval/t2a_R@10": 100.0}})
    assert "| s | t2a_R@1 | 50 | 12.5 |" in table and "| s | t2a_R@10 | 100 | 100 |" in table
    # One stage's settings that would fail late, or be ignored, are refused up front.
    for task, overrides, message in (
            ("mae", {"mesh.fsdp": 0}, r"config.mesh.fsdp=0 must be a device count >= 1"),
            ("mae", {"mesh.data": -1, "mesh.fsdp": -1}, "both -1"),
            ("mae", {"audio.max_patches": 1}, "max_patches=1 is stage 2's patch dropout"),
            ("mae", {"data.synthetic_eval_size": -3}, "synthetic_eval_size=-3 must be"),
            ("mae", {"data.synthetic_eval_size": 0}, "eval.kind='' turns evaluation off"),
            ("cacophony", {"tokenizer.vocab_size": -5}, "vocab_size=-5 must be 0"),
            ("cacophony", {"tokenizer.vocab_size": 5000}, "tower's 500 embedding rows"),
            ("cacophony", {"eval.caption_clips": -5}, "caption_clips=-5 must be a number"),
            ("mae", {"seed": -1}, r"config.seed=-1 must be a number >= 0"),
            ("mae", {"audio.clip_seconds": 1e6}, r"clip_seconds=1000000.0 must be in \[0.16, "
             r"600\]"),
            ("mae", {"sharding_rules": ((1, 2),)}, r"entry \(1, 2\) must be \(logical"),
            ("mae", {"sharding_rules": (("batch", ("data", "data")),)}, "a mesh axis twice"),
            ("mae", {"sharding_rules": (("mlp", None), ("mlp", "fsdp"))},
             r"more than one entry for \['mlp'\]"),
            ("mae", {"sharding_rules": (("batch", "data"),)},
             r"no entry for \['length', 'act_embed', 'embed',")):
        with pytest.raises(ValueError, match=message):
            checks.check_config(tiny_config(task, 2, **overrides))
    from configs import mae as mae_config

    for arg in ("tiny,steps=abc", "tiny,steps=0", "tiny,batch=-2"):
        with pytest.raises(ValueError, match=r"must be a positive whole number"):
            mae_config.get_config(arg)
    # Accumulation spans steps: each step's front end still sees the whole batch.
    with pytest.raises(ValueError, match=r"frontend_sub_batches=3 must divide config.data."
                                         r"global_batch_size \(8\)"):
        checks.check_config(tiny_config("mae", 2, **{"audio.frontend_sub_batches": 3}))
    checks.check_config(tiny_config("mae", 2, **{"audio.frontend_sub_batches": 8,
                                               "optim.accum_steps": 2}))
    with pytest.raises(ValueError, match="config.train.log_every=0 must be a number >= 1"):
        loop.run(tiny_config("mae", 2, **{"train.log_every": 0}), str(tmp_path / "m"))
    with pytest.raises(ValueError, match="dtype=float16 does not run on CPU"):
        loop.run(tiny_config("mae", 2, **{"model.dtype": "float16"}), str(tmp_path / "m"))
    with pytest.raises(ValueError, match="attention=cudnn takes bfloat16 or float16 inputs"):
        loop.run(tiny_config("mae", 2, **{"model.attention": "cudnn"}), str(tmp_path / "m"))
    with pytest.raises(ValueError, match="cuDNN's fused attention, which needs NVIDIA GPUs"):
        loop.run(tiny_config("mae", 2, **{"model.attention": "cudnn",
                                          "model.dtype": "bfloat16"}), str(tmp_path / "m"))


def test_a_later_stages_start_point_and_captions_are_checked_before_stage_1(
        tmp_path, official_dir, monkeypatch):
    from configs import quickstart

    (tmp_path / "nocap.jsonl").write_text(json.dumps({"audio": "a.wav", "label": "dog"}) + "\n")
    released = str(official_dir / "AudioMAE_tiny.ckpt")
    trained = []  # (where a stage would train)
    monkeypatch.setattr(stages.loop, "run", lambda stage, workdir: trained.append(workdir) or {})
    for settings, message in (
            ({"train.init_from": str(tmp_path / "nocap.jsonl")},
             r"config.train.init_from: .*nocap.jsonl is a file but not a released checkpoint"),
            ({"train.init_from": released, "model.variant": "base"},
             r"config.train.init_from: .*AudioMAE_tiny.ckpt holds an audio encoder of width "
             r"64 that does not fit this run's model.variant='base'"),
            ({"data.train.kind": "manifest", "data.train.path": str(tmp_path / "nocap.jsonl")},
             r"training source 'nocap' has no captions .*`curate caption`")):
        config = quickstart.get_config()
        with config.unlocked():
            config.stages.cacophony.update_from_flattened_dict(settings)
        with pytest.raises(ValueError, match=r"^stage 'cacophony' \(--config.stages."
                                             rf"cacophony.\*\): {message}"):
            stages.run(config, str(tmp_path / "q"))
        assert not (tmp_path / "q").exists() and not trained  # stage 1 did not start
    # A start point that fits passes, and the stages then train.
    config = quickstart.get_config()
    with config.unlocked():
        config.stages.cacophony.train.init_from = released
    stages.run(config, str(tmp_path / "q"))
    assert [os.path.basename(w) for w in trained] == ["mae", "cacophony"]


def test_previous_as_a_single_stages_start_point_is_named_before_anything_runs(
        tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(stages.loop, "run", lambda stage, workdir: trained.append(workdir) or {})
    single = tiny_config("cacophony", 2, **{"train.init_from": "previous"})
    with pytest.raises(ValueError, match=r"^config.train.init_from='previous' names the stage "
                                         r"before .* give the path of a stage-1 run"):
        stages.run(single, str(tmp_path / "s"))
    assert not trained and not (tmp_path / "s").exists()

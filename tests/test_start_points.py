"""Where a run's tokenizer and stage 2's audio encoder come from: the workdir's copy,
a resumed run's, a fresh BPE; a stage-1 run, a released checkpoint, a bundle."""

import os

import jax
import numpy as np
import pytest

from cacophony_jax.convert import export, official
from cacophony_jax.data.tokenizer import Tokenizer
from cacophony_jax.train import checkpoint
from tests.helpers import tiny_config
from tests.test_export import CAPTIONS, assert_same, tiny


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = Tokenizer.train_bpe(CAPTIONS, 500)
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_a_run_resumed_from_another_workdir_keeps_that_runs_tokenizer(tokenizer_file, tmp_path,
                                                                       caplog):
    from etils import epath

    from cacophony_jax.train import init

    # Run A trained with its own tokenizer; run B continues A's checkpoint elsewhere.
    a = tmp_path / "a"
    (a / "checkpoints" / "20").mkdir(parents=True)
    (a / "config.json").write_text("{}")
    Tokenizer.load(tokenizer_file).save(a / "tokenizer.json")
    config = tiny("cacophony", 1)
    config.tokenizer.path = ""
    (tmp_path / "b").mkdir()

    class Captions:  # what a new BPE would be trained on: other captions
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"captions": [CAPTIONS[i] + " entirely different words"]}

    for resume in (a, a / "checkpoints", a / "checkpoints" / "20"):
        config.train.resume = str(resume)
        tok = init.prepare_tokenizer(config, epath.Path(tmp_path / "b"), Captions())
        assert tok.fingerprint == Tokenizer.load(a / "tokenizer.json").fingerprint, resume
    # A resumed run that kept none: a new tokenizer, with a warning saying what to pass.
    (a / "tokenizer.json").unlink()
    init.prepare_tokenizer(config, epath.Path(tmp_path / "b"), Captions())
    assert "kept no tokenizer.json, so a new tokenizer is trained" in caplog.text


def test_a_vocabulary_smaller_than_asked_is_reported(tmp_path, caplog):
    from etils import epath

    from cacophony_jax.train import init

    config = tiny("cacophony", 1)
    config.tokenizer.path = ""

    class Captions:
        def __len__(self):
            return len(CAPTIONS)

        def __getitem__(self, i):
            return {"captions": [CAPTIONS[i]]}

    config.tokenizer.vocab_size = 5000
    with caplog.at_level("INFO"):
        tok = init.prepare_tokenizer(config, epath.Path(tmp_path), Captions())
    assert tok.vocab_size < 5000
    warned = [r for r in caplog.records if "not the 5000 asked for" in r.getMessage()]
    assert warned and warned[0].levelname == "WARNING"
    caplog.clear()
    config.tokenizer.vocab_size = tok.vocab_size  # what the captions can give: no message
    with caplog.at_level("INFO"):
        init.prepare_tokenizer(config, epath.Path(tmp_path), Captions())
    assert "asked for" not in caplog.text


def test_training_data_without_captions_is_named_before_a_tokenizer_is_asked_for(tmp_path):
    from etils import epath

    from cacophony_jax.train import init

    config = tiny("cacophony", 1)
    config.tokenizer.path = ""

    class Labels:  # labelled clips, no captions: a tokenizer path would not help
        name = "labels"

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"label": ["dog"]}

    with pytest.raises(ValueError, match=r"training source 'labels' has no captions .*add "
                                         r"them \(`curate clean`"):
        init.prepare_tokenizer(config, epath.Path(tmp_path), Labels())


def test_stage2_starts_from_released_files_and_bundles(official_dir, tokenizer_file, tmp_path):
    from cacophony_jax import tasks
    from cacophony_jax.models.stack import stack_layers
    from cacophony_jax.optim import optimizer
    from cacophony_jax.parallel import mesh as mesh_lib
    from cacophony_jax.parallel import partition
    from cacophony_jax.train import init
    from cacophony_jax.train import state as state_lib

    mae_ckpt, caco_ckpt = official_dir / "AudioMAE_tiny.ckpt", official_dir / "Cacophony_tiny.ckpt"
    want_mae = official.load_official_mae(mae_ckpt)[1]["encoder"]
    want_caco = official.load_official_cacophony(caco_ckpt)[1]["audio_encoder"]
    bundle = export.export_from_official(caco_ckpt, tmp_path / "b", tokenizer_path=tokenizer_file,
                                         text_length=16)
    mesh = mesh_lib.make_mesh(tiny_config("cacophony", 1).mesh)
    empty = checkpoint.Checkpointer(tmp_path / "empty", async_save=False)
    try:
        for path, want, scan in ((mae_ckpt, want_mae, False), (caco_ckpt, want_caco, True),
                                 (bundle, want_caco, False)):
            config = tiny_config("cacophony", 2, **{"train.init_from": str(path),
                                                    "model.scan": scan})
            task = tasks.build(config, Tokenizer.load(tokenizer_file))
            tx, _ = optimizer.make_optimizer(config.optim, config.train.steps)
            plan = state_lib.plan_state(task.init_params, tx, mesh,
                                        partition.rules_from_config(config.sharding_rules))
            state = init.restore_or_init(config, task, tx, plan, empty, None)
            assert_same(jax.device_get(state.params["audio_encoder"]),
                        stack_layers(want) if scan else want)
        # A file that is not a release checkpoint, and an encoder of another size.
        from cacophony_jax.train import encoder_init

        (tmp_path / "notes.txt").write_text("hello")
        config = tiny_config("cacophony", 1, **{"train.init_from": str(tmp_path / "notes.txt")})
        with pytest.raises(checkpoint.CheckpointError, match="not a released checkpoint"):
            encoder_init.audio_encoder(config, plan)
        # Released files are not training checkpoints: stage 1 and train.resume say so.
        config = tiny_config("cacophony", 1, **{"train.resume": str(mae_ckpt)})
        with pytest.raises(checkpoint.CheckpointError,
                           match=r"is a file, not a training checkpoint.*train.init_from"):
            init.restore_or_init(config, task, tx, plan, empty, None)
        config = tiny_config("mae", 1, **{"train.init_from": str(mae_ckpt)})
        with pytest.raises(ValueError, match="stage 1 starts from random weights"):
            init.restore_or_init(config, task, tx, plan, empty, None)
        wider = jax.tree.map(lambda a: np.zeros(a.shape[:-1] + (2 * a.shape[-1],)), want_mae)
        with pytest.raises(checkpoint.CheckpointError,
                           match="does not fit this run's model.variant='tiny'"):
            encoder_init._place(wider, config, plan, "wide.ckpt")
    finally:
        empty.close()


def test_a_tokenizer_kept_by_an_attempt_without_checkpoints_is_not_reused(tmp_path, caplog):
    from etils import epath

    from cacophony_jax.train import init

    class Captions:
        def __init__(self, words):
            self.words = words

        def __len__(self):
            return len(CAPTIONS)

        def __getitem__(self, i):
            return {"captions": [f"{CAPTIONS[i]} {self.words}"]}

    config = tiny("cacophony", 1)
    config.tokenizer.path = ""
    workdir = epath.Path(tmp_path)
    # A first attempt kept its tokenizer, then failed before saving a checkpoint.
    first = init.prepare_tokenizer(config, workdir, Captions("zebra quokka"))
    init.keep_tokenizer(first, workdir)
    with caplog.at_level("INFO"):
        second = init.prepare_tokenizer(config, workdir, Captions("violin trumpet"))
    assert second.fingerprint != first.fingerprint
    assert "kept by an attempt that saved no checkpoint" in caplog.text
    init.keep_tokenizer(second, workdir)
    assert Tokenizer.load(tmp_path / "tokenizer.json").fingerprint == second.fingerprint
    # Once a checkpoint exists, the kept tokenizer is the run's.
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    third = init.prepare_tokenizer(config, workdir, Captions("drum bass"))
    init.keep_tokenizer(third, workdir)
    assert third.fingerprint == second.fingerprint
    assert Tokenizer.load(tmp_path / "tokenizer.json").fingerprint == second.fingerprint
    # Checkpoints without their tokenizer (copied without it): refused, not retrained.
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="holds checkpoints but not the tokenizer.json they "
                                         "were trained with"):
        init.prepare_tokenizer(config, workdir, Captions("drum bass"))
    config.tokenizer.path = str(tmp_path / "elsewhere.json")
    second.save(config.tokenizer.path)  # given as the path: used
    assert init.prepare_tokenizer(config, workdir, Captions("x")).fingerprint == \
        second.fingerprint


def test_a_stage2_run_says_when_its_stage1_run_has_trained_on(tmp_path, caplog):
    from cacophony_jax.train import encoder_init

    (tmp_path / "mae" / "checkpoints" / "40").mkdir(parents=True)
    (tmp_path / "caco").mkdir()
    config = tiny("cacophony", 1)
    config.train.init_from = str(tmp_path / "mae")
    encoder_init.record_start(config, tmp_path / "caco", 40)  # started from step 40
    with caplog.at_level("WARNING"):
        encoder_init.check_start(config, tmp_path / "caco")
        assert "started from step" not in caplog.text  # stage 1 unchanged: nothing said
        (tmp_path / "mae" / "checkpoints" / "60").mkdir()  # stage 1 made longer, rerun
        encoder_init.check_start(config, tmp_path / "caco")
    assert (f"started from step 40 of {tmp_path / 'mae'}, which now holds step 60"
            in caplog.text)
    # A released file or a bundle as the start: nothing to note.
    (tmp_path / "AudioMAE.ckpt").write_bytes(b"weights")
    (tmp_path / "bundle" / "params").mkdir(parents=True)
    (tmp_path / "bundle" / "bundle.json").write_text("{}")
    (tmp_path / "other").mkdir()
    for start in ("AudioMAE.ckpt", "bundle"):
        config.train.init_from = str(tmp_path / start)
        encoder_init.record_start(config, tmp_path / "other", None)
        assert not os.listdir(tmp_path / "other")
    # Named as a step folder: that step, and a resume compares it with that step.
    config.train.init_from = str(tmp_path / "mae" / "checkpoints" / "40")
    (tmp_path / "mae" / "checkpoints" / "40" / "state").mkdir()
    encoder_init.record_start(config, tmp_path / "other", 40)
    assert '"step": 40' in (tmp_path / "other" / encoder_init.START_FILE).read_text()
    caplog.clear()
    with caplog.at_level("WARNING"):
        encoder_init.check_start(config, tmp_path / "other")
    assert "started from step" not in caplog.text

r"""The README's first command: both stages and evaluation on the embedded corpus.

  python -m cacophony_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Sized for a 2-core CPU: stage 1 (MAE) then stage 2 (contrastive + captioning,
audio encoder initialised from stage 1), each on the synthetic sound-scene corpus,
printing text->audio / audio->text recall and zero-shot accuracy on held-out clips.
"""

from configs import cacophony, common, mae


def get_config(arg: str | None = None):
    """Returns the two-stage quickstart recipe; `arg` may set steps1/steps2."""
    arg = common.parse_arg(arg, steps1=500, steps2=2000)
    # The step counts go through the stage configs, which shorten a warmup longer than
    # half the run.
    stage1 = mae.get_config(f"tiny,steps={arg.steps1}")
    stage2 = cacophony.get_config(f"tiny,steps={arg.steps2}")
    for stage in (stage1, stage2):
        stage.unlock()
        stage.audio.clip_seconds = 2.0
        stage.audio.eval_clip_seconds = 2.0
        stage.data.synthetic_train_size = 4000
        stage.data.synthetic_eval_size = 200
        stage.data.global_batch_size = 32
        stage.data.eval_batch_size = 40
        stage.train.log_every = 25
        stage.train.checkpoint_every = 500
        stage.audio.frontend_sub_batches = 8  # 4 clips of 2 s (8 s of audio) per piece
    stage1.train.steps = arg.steps1  # explicit: 0 is refused, not taken as "unset"
    stage1.data.eval.kind = ""  # reconstruction loss is logged during training
    stage2.train.steps = arg.steps2
    # All the tiny text tower's positions; every caption of the embedded corpus fits
    # (with the tokenizer trained on it), so no captioning target is cut.
    stage2.data.text_length = 40
    stage2.train.init_from = "previous"
    stage2.eval.caption_clips = 100  # greedy captions of held-out clips, scored
    for stage in (stage1, stage2):
        stage.lock()
    config = common.mlc.ConfigDict()
    config.stage_order = ("mae", "cacophony")  # run in this order, each in workdir/<name>
    config.stages = common.mlc.ConfigDict(dict(mae=stage1, cacophony=stage2))
    config.lock()
    return config

r"""Stage 2: contrastive audio-text training with a captioning decoder (CoCa-style).

  python -m cacophony_jax.main --config=configs/cacophony.py:tiny --workdir=runs/caco
  python -m cacophony_jax.main --config=configs/cacophony.py:base --workdir=DIR \
      --config.train.init_from=STAGE1_WORKDIR/checkpoints \
      --config.tokenizer.path=ROBERTA_DIR --config.optim.sam.enabled=true

The argument is 'variant[,steps=N][,batch=N]'. The audio encoder starts from a
stage-1 checkpoint (`train.init_from`); the text tower optionally from local RoBERTa
weights (`tokenizer.roberta_weights`). Settings not confirmed from the paper follow
CoCa (caption weight 2.0) and SAM (rho 0.05). The `base` batch (1024), peak learning
rate (1e-4), warmup (2,000 steps) and length (100k steps) are this project's choices;
the paper does not state them.
"""

from configs import common


def get_config(arg: str | None = None):
    """Returns the stage-2 config for the variant named in `arg`."""
    arg = common.parse_arg(arg, variant="tiny", steps=0, batch=0)
    tiny = arg.variant == "tiny"
    config = common.mlc.ConfigDict()
    config.task = "cacophony"
    config.seed = 0
    config.model = common.model_block(arg.variant, "float32" if tiny else "bfloat16")
    config.model.sigmoid_bias = False  # adds the learned bias the sigmoid loss needs
    config.audio = common.audio_block(clip_seconds=4.0 if tiny else 10.0, max_patches=0)
    config.loss = common.mlc.ConfigDict(dict(
        kind="softmax",  # softmax (InfoNCE) | sigmoid (needs model.sigmoid_bias)
        contrastive_weight=1.0,
        caption_weight=2.0,
        chunk_size=0,  # > 0: blockwise contrastive loss for very large batches
    ))
    batch = arg.batch or (16 if tiny else 1024)
    config.data = common.data_block(batch, train_size=2000 if tiny else 100_000,
                                    eval_size=64 if tiny else 1000)
    if tiny:
        config.data.text_length = 32  # the tiny text tower has 40 positions
    config.tokenizer = common.tokenizer_block()
    config.mesh = common.mesh_block()
    config.sharding_rules = common.sharding_rules()
    steps = arg.steps or (200 if tiny else 100_000)
    config.optim = common.optim_block(lr=5e-4 if tiny else 1e-4,
                                      warmup=20 if tiny else 2000, b2=0.98, steps=steps)
    config.train = common.train_block(steps)
    if not tiny:
        config.train.checkpoint_every = 2000
        config.train.log_every = 100
        config.train.eval_every = 5000
    config.eval = common.mlc.ConfigDict(dict(
        caption_clips=0,  # clips to caption at evaluation, rounded up to whole evaluation
        # batches (0 = skip captioning metrics)
        caption_max_len=0,  # decoded tokens per caption (0 = data.text_length)
    ))
    config.lock()
    return config

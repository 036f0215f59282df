r"""Stage 1: masked-autoencoder pre-pretraining of the spectrogram ViT.

  python -m cacophony_jax.main --config=configs/mae.py:tiny --workdir=runs/mae
  python -m cacophony_jax.main --config=configs/mae.py:base --workdir=/mnt/gcs/bucket/mae \
      --config.data.train.kind=array_record --config.data.train.path=/mnt/gcs/bucket/data

The argument is 'variant[,steps=N][,batch=N]'. Settings not confirmed from the paper
follow AudioMAE (mask ratio 0.8, b2 0.95, no normalised target). The `base` batch
(512), peak learning rate (4e-4: AudioMAE's base rate 2e-4 x 512 / 256), warmup (4,000
steps) and length (200k steps) are this project's choices; the paper does not state them.
"""

from configs import common


def get_config(arg: str | None = None):
    """Returns the stage-1 config for the variant named in `arg`."""
    arg = common.parse_arg(arg, variant="tiny", steps=0, batch=0)
    tiny = arg.variant == "tiny"
    config = common.mlc.ConfigDict()
    config.task = "mae"
    config.seed = 0
    config.model = common.model_block(arg.variant, "float32" if tiny else "bfloat16")
    config.audio = common.audio_block(clip_seconds=4.0 if tiny else 10.0, max_patches=0)
    config.mae = common.mlc.ConfigDict(dict(
        mask_ratio=0.8,  # share of valid patches hidden from the encoder
        norm_target=False,  # predict per-patch normalised spectrogram values
    ))
    batch = arg.batch or (16 if tiny else 512)
    config.data = common.data_block(batch, train_size=2000 if tiny else 100_000,
                                    eval_size=64 if tiny else 1000)
    config.tokenizer = common.tokenizer_block()  # unused by stage 1
    config.mesh = common.mesh_block()
    config.sharding_rules = common.sharding_rules()
    steps = arg.steps or (200 if tiny else 200_000)
    config.optim = common.optim_block(lr=1e-3 if tiny else 4e-4,
                                      warmup=20 if tiny else 4000, b2=0.95, steps=steps)
    config.train = common.train_block(steps)
    if not tiny:
        config.train.checkpoint_every = 2000
        config.train.log_every = 100
        config.train.eval_every = 5000
    config.lock()
    return config

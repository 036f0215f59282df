"""Config blocks shared by every task, and the config-string parser.

Configs are plain `ml_collections.ConfigDict`s built by `get_config(arg)`. The
argument after the colon in `--config=configs/mae.py:tiny` picks a variant and may
carry overrides, e.g. `configs/mae.py:tiny,steps=50`. Every field is documented
once, where it is defined; code reads fields directly (no defaults in code).
This module imports nothing from the package.
"""

from __future__ import annotations

import math

import ml_collections as mlc

VARIANTS = ("tiny", "base")


def parse_arg(arg: str | None, **known: object) -> mlc.ConfigDict:
    """Parses 'variant,key=value,...' into a ConfigDict of `known` fields.

    Args:
      arg: the string after ':' in --config (None or '' -> all defaults).
      **known: the accepted keys and their defaults; `variant` is the bare word.

    Returns:
      A ConfigDict with every key of `known`, typed like its default.
    """
    out = mlc.ConfigDict(dict(known))
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            key, value = "variant", part
        if key not in known:
            raise ValueError(
                f"unknown config argument {key!r} in {arg!r}; known: {sorted(known)}, "
                f"written after the file as :{_form(known)}"
            )
        default = known[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            if not value.strip().isdigit() or int(value) < 1:
                raise ValueError(f"config argument {key}={value!r} in {arg!r} must be a "
                                 "positive whole number (leave it out for the default)")
            out[key] = int(value)
        elif isinstance(default, float):
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"config argument {key}={value!r} in {arg!r} must be a "
                                 "number") from None
        else:
            out[key] = value
    if "variant" in out and out.variant not in VARIANTS:
        raise ValueError(f"unknown variant {out.variant!r}; choose one of {VARIANTS}")
    return out


def _form(known: dict) -> str:
    """The config string's shape for these fields, e.g. 'tiny,steps=N,batch=N'."""
    parts = ["|".join(VARIANTS)] if "variant" in known else []
    parts += [f"{k}=N" if isinstance(v, (int, float)) and not isinstance(v, bool) else
              f"{k}=VALUE" for k, v in known.items() if k != "variant"]
    return ",".join(parts)


def model_block(variant: str, dtype: str) -> mlc.ConfigDict:
    """The model block: sizes come from the named variant (models/variants.py)."""
    return mlc.ConfigDict(dict(
        variant=variant,  # 'tiny' (tests, quickstart) or 'base' (the paper)
        dtype=dtype,  # compute dtype; parameters are always float32
        scan=False,  # nn.scan over the block stacks (faster compiles at depth)
        remat="none",  # 'none' | 'full' | 'dots' | 'minimal' activation checkpointing
        drop_path=0.0,  # stochastic depth rate of the audio encoder
        attention="xla",  # xla | cudnn (fused, GPU; much less memory) | auto (JAX picks; XLA now)
        # One matrix product for a self-attention's query, key and value projections
        # (and a cross-attention's key and value); same parameters and results.
        fuse_qkv=False,
        # The audio blocks' LayerNorms as Pallas (Triton) kernels on GPUs, one pass each
        # way with the residual gradient added in; same parameters. Elsewhere the
        # kernels are interpreted (slow): turn it on for GPU runs only.
        fused_norm=False,
    ))


def audio_block(clip_seconds: float, max_patches: int) -> mlc.ConfigDict:
    """Clip length and patch dropout (the front end itself is fixed: the release's)."""
    return mlc.ConfigDict(dict(
        clip_seconds=clip_seconds,  # training crop/pad length
        eval_clip_seconds=clip_seconds,  # evaluation crop/pad length (from the start)
        max_patches=max_patches,  # patch dropout: keep this many patches (0 = all)
        # Front end in this many interleaved pieces of the global batch (same result; it
        # must divide the training and evaluation batches); on CPU
        # pieces of about 10 s of audio keep the DFT in cache (RESULTS.md 1c: one 10 s
        # clip per piece), on GPU/TPU leave it at 1.
        frontend_sub_batches=1,
    ))


def source_block(kind: str, path: str = "", split: str = "train") -> mlc.ConfigDict:
    """Where examples come from (see cacophony_jax/data/sources.py)."""
    return mlc.ConfigDict(dict(
        kind=kind,  # synthetic|manifest|array_record|audiocaps|clotho|esc50|urbansound8k|''
        path=path,  # manifest file or dataset folder ('' for synthetic)
        split=split,  # split name for the public layouts / array_record
    ))


def data_block(batch_size: int, train_size: int, eval_size: int) -> mlc.ConfigDict:
    """Input pipeline settings; the default data is the embedded synthetic corpus."""
    return mlc.ConfigDict(dict(
        train=source_block("synthetic", split="train"),
        eval=source_block("synthetic", split="eval"),  # kind '' disables evaluation
        # More sets evaluated alongside `eval`, "KIND:PATH[:SPLIT],..." (split default
        # 'eval'), e.g. "clotho:/data/clotho,esc50:/data/ESC-50"; their metrics are
        # logged as eval_<kind>/... (a second set of one kind as eval_<kind>_2/...).
        extra_evals="",
        synthetic_train_size=train_size,  # clips in the synthetic training split
        synthetic_eval_size=eval_size,  # clips in the synthetic evaluation split
        synthetic_seed=0,  # corpus seed (independent of the training seed)
        global_batch_size=batch_size,  # examples per step over all hosts
        eval_batch_size=batch_size,  # examples per evaluation batch over all hosts
        text_length=64,  # tokens per caption including bos/eos
        synthetic_prob=0.0,  # chance of training on a synthetic caption when a clip has one
        num_workers=0,  # Grain worker processes per host (0 = in-process threads)
        read_threads=4,  # Grain reader threads per process
        prefetch_batches=2,  # batches prepared ahead on the host
        skip_bad_rows=True,  # manifests: skip and count malformed rows instead of failing
    ))


def tokenizer_block() -> mlc.ConfigDict:
    """Text tokenisation (stage 2) and optional pretrained text weights."""
    return mlc.ConfigDict(dict(
        # tokenizer.json file or RoBERTa folder; '' trains a byte-level BPE on the
        # training captions and stores it in the workdir.
        path="",
        vocab_size=0,  # BPE vocabulary when training one (0 = the model's vocabulary)
        roberta_weights="",  # optional HF RoBERTa model.safetensors for the text tower
    ))


def mesh_block() -> mlc.ConfigDict:
    """Device mesh; -1 takes the remaining devices."""
    return mlc.ConfigDict(dict(data=-1, fsdp=1))


def sharding_rules() -> tuple:
    """Logical axis -> mesh axes. FSDP shards the 'embed' dimension of parameters."""
    return (
        # Activations: the batch over every device, length and width whole.
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("act_embed", None),
        # Parameters.
        ("embed", "fsdp"),
        ("mlp", None),
        ("heads", None),
        ("kv", None),
        ("vocab", None),
        ("layers", None),
    )


def optim_block(lr: float, warmup: int, b2: float, steps: int) -> mlc.ConfigDict:
    """AdamW with linear warmup + cosine decay, clipping and optional SAM.

    ``warmup`` is the recipe's; a run shorter than twice that many ``steps`` (a smoke
    test, say ``:tiny,steps=10``) warms up for half its steps instead. The rule follows
    the config argument's ``steps=N``; ``--config.optim.warmup_steps`` sets it directly.
    """
    return mlc.ConfigDict(dict(
        learning_rate=lr,  # peak learning rate
        warmup_steps=min(warmup, steps // 2),  # linear from 0
        schedule="cosine",  # cosine | linear | constant after warmup
        min_lr_ratio=0.0,  # final learning rate as a fraction of the peak
        b1=0.9,
        b2=b2,
        eps=1e-8,
        weight_decay=0.05,
        # Parameters whose '/'-joined path matches (re.search) get no weight decay:
        # biases, norm scales, embedding tables, pooling queries, the logit scale/bias.
        # The MAE decoder's mask_token is decayed, as in MAE and AudioMAE (their rule
        # exempts 1-d parameters, and their mask token is [1, 1, D]).
        decay_exclude=(r"(^|/)(bias|scale|embedding|freq_table|type_embed|query|"
                       r"logit_scale|logit_bias)$"),
        clip_norm=1.0,  # global-norm clipping (0 = off)
        # Ceiling of a `logit_scale` parameter: ln 100, so the contrastive temperature
        # stays >= 0.01 as in CLIP; updates never take it above (0 = no ceiling).
        max_logit_scale=math.log(100),
        freeze="",  # regex of parameter paths to keep frozen ('' = none)
        accum_steps=1,  # gradient accumulation (optax.MultiSteps) when > 1
        sam=mlc.ConfigDict(dict(
            enabled=False,  # sharpness-aware minimisation (two gradients per step)
            rho=0.05,
            adaptive=False,  # ASAM
        )),
    ))


def train_block(steps: int) -> mlc.ConfigDict:
    """Loop length, logging, evaluation and checkpoint cadence, and resumption."""
    return mlc.ConfigDict(dict(
        steps=steps,  # total train steps (batches); optim.accum_steps of them make an update
        log_every=10,  # console/TensorBoard/JSONL metrics: means over N steps
        # Also log each step's update norm (on GPU ~300 more kernels per MAE base step).
        log_update_norm=False,
        eval_every=0,  # evaluate every N steps (0 = only at the end)
        checkpoint_every=500,  # save every N steps (and at the end, and on SIGTERM)
        keep_checkpoints=3,  # newest checkpoints kept
        async_checkpoints=True,  # write checkpoints in the background
        resume="",  # a checkpoint folder (or step folder) to continue from
        init_from="",  # stage 2: a stage-1 run, released .ckpt or bundle: its audio encoder
        # ('previous' in a multi-stage config: the stage before)
        # Profiler trace of this many steps, from the 4th step of a run (after compiling
        # and input warm-up), into workdir/profile (TensorBoard profile plugin, Perfetto).
        profile_steps=0,
        # Per-device peak TFLOP/s for the logged MFU (perf/mfu); 0 = the dense bf16
        # datasheet value for H100/H200/A100 and TPU v4/v5e/v5p/v6e (none on CPU).
        peak_tflops=0.0,
    ))

"""Does fused attention give the XLA step's loss and gradients? Run once per GPU type.

Computes each stage's training loss and its gradients for the same initial
parameters, batches and randomness (patch masks, dropout) twice, once with
`model.attention=xla` and once with the fused kernel (`cudnn` by default), and
compares them. cuDNN's flash attention has its own shape rules (see
`models/attention_ops.py`), which the project pads and broadcasts around; this is the check on
real hardware that the result is the same up to bf16 rounding.

Usage (on a GPU):

    python benchmarks/attention_parity.py --stage mae,cacophony --variant base --batch 16

The verdict uses `--rtol` on the relative difference of the losses and on the median,
over parameter arrays, of |g_fused - g_xla| / |g_xla| (the whole-tree figure is
printed too). Gradients are the sensitive part: at initialisation the loss barely
depends on which positions attend to which, and a few large arrays (embeddings)
dominate the whole-tree norm, while the median array's gradient does move. Dropping
every attention mask gives a median of about 0.1 on the tiny models (tested); bf16
rounding should stay well under the default 2e-2, a heuristic line, not a proof.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import report, train_step  # noqa: E402
from cacophony_jax.data import to_global  # noqa: E402
from cacophony_jax.parallel import partition  # noqa: E402
from cacophony_jax.train import state as state_lib  # noqa: E402
from cacophony_jax.train import step as step_lib  # noqa: E402


def _loss_and_grads(stage: str, args: argparse.Namespace, attention: str, params=None):
    """Loss and gradients of the initial parameters on `args.batches` random batches.

    Returns (per batch: (loss, gradient arrays)), the compute dtype and the parameters
    (initialised here unless given: both attention kinds share one set).
    """
    config = train_step.make_config(stage, args.variant, args.batch, dtype=args.dtype,
                                    clip_seconds=args.clip_seconds, attention=attention)
    built = train_step.build_step(config)
    if params is None:
        params = state_lib.create_state(built.task.init_params, built.tx, built.plan,
                                        config.seed).params
    print(f"{stage}: loss and gradients with {attention} attention (compiling)",
          flush=True)
    rules = partition.rules_from_config(config.sharding_rules)

    def loss_and_grads(params, batch, rng):
        loss_fn = step_lib.step_loss_fn(built.task, batch, rng)
        return jax.value_and_grad(lambda p: loss_fn(p)[0])(params)

    loss_and_grads = jax.jit(step_lib.with_rules(loss_and_grads, built.mesh, rules))

    out = []
    for seed in range(args.batches):
        batch = to_global.to_global(train_step.random_batch(built, seed), built.mesh)
        loss, grads = loss_and_grads(params, batch, jax.random.PRNGKey(seed))
        out.append((float(loss), [np.asarray(g, np.float64)
                                  for g in jax.tree.leaves(jax.device_get(grads))]))
    return out, config.model.dtype, params


def compare(stage: str, args: argparse.Namespace) -> dict:
    """One row: the largest relative differences of losses and gradients."""
    reference, dtype, params = _loss_and_grads(stage, args, "xla")
    fused, _, _ = _loss_and_grads(stage, args, args.attention, params)
    loss_rel = grad_rel = leaf_rel = 0.0
    for (loss_x, grads_x), (loss_f, grads_f) in zip(reference, fused, strict=True):
        loss_rel = max(loss_rel, abs(loss_f - loss_x) / abs(loss_x))
        diffs = [np.sum((a - b) ** 2) for a, b in zip(grads_x, grads_f, strict=True)]
        sizes = [np.sum(a**2) for a in grads_x]
        grad_rel = max(grad_rel, float(np.sqrt(sum(diffs) / sum(sizes))))
        per_leaf = [np.sqrt(d / s) for d, s in zip(diffs, sizes, strict=True) if s > 0]
        leaf_rel = max(leaf_rel, float(np.median(per_leaf)))
    row = {
        "stage": stage, "variant": args.variant, "batch": args.batch, "dtype": dtype,
        "attention": args.attention, "batches": args.batches,
        "device": jax.devices()[0].device_kind,
        "loss_xla": [r[0] for r in reference], "loss_fused": [r[0] for r in fused],
        "loss_rel": loss_rel, "grad_rel": grad_rel, "grad_leaf_median_rel": leaf_rel,
    }
    row["same"] = max(loss_rel, leaf_rel) <= args.rtol
    return row


def format_row(row: dict) -> str:
    verdict = "same" if row["same"] else "DIFFERENT"
    return (f"{row['stage']:9s} {row['variant']} batch {row['batch']} {row['dtype']} "
            f"xla vs {row['attention']}, {row['batches']} batches: loss "
            f"{row['loss_xla'][0]:.5f} vs {row['loss_fused'][0]:.5f}; largest relative "
            f"difference: loss {row['loss_rel']:.2e}, gradients {row['grad_rel']:.2e} "
            f"(median over parameters {row['grad_leaf_median_rel']:.2e}) -> {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="mae,cacophony", help="comma list of stages")
    p.add_argument("--variant", default="base", choices=("tiny", "base"))
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--batches", type=int, default=2, help="random batches compared")
    p.add_argument("--attention", default="cudnn", help="the implementation to check")
    p.add_argument("--dtype", default="", help="compute dtype (default: the config's)")
    p.add_argument("--clip-seconds", type=float, default=0.0, help="0: the config's")
    p.add_argument("--rtol", type=float, default=2e-2, help="largest difference called same")
    p.add_argument("--json", default="", help="append the rows to this JSON-lines file")
    args = p.parse_args(argv)
    if args.batches < 1 or args.batch < 1:
        raise ValueError("--batches and --batch must be positive")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Compares every requested stage; exits non-zero when one differs."""
    args = parse_args(argv)
    rows = []
    for stage in (s for s in args.stage.split(",") if s):
        rows.append(compare(stage, args))
        report.emit(rows[-1], format_row(rows[-1]), args.json)
    if not all(r["same"] for r in rows):
        raise ValueError(f"{args.attention} attention trains differently from xla (above)")
    return rows


if __name__ == "__main__":
    report.run(main)

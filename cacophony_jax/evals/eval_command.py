"""The `eval` command: its options, and opening the sets a user names.

`python -m cacophony_jax.cli eval --bundle B --clotho DIR ...` (docs/cli.md); the
evaluation itself is `cacophony_jax.evals.benchmark`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cacophony_jax.cli_options import non_negative, positive
from cacophony_jax.data.sources import SourceError, open_source, path_and_split
from cacophony_jax.evals.benchmark import RELEASE_WINDOW_SECONDS, evaluate_bundle, open_datasets
from cacophony_jax.evals.report import DATASETS, SPLITS, results_markdown
from cacophony_jax.progress import Progress


def add_arguments(parser: Any) -> None:
    """Adds the options of the `eval` command to an argparse parser.

    Args:
      parser: the command's argparse.ArgumentParser.
    """
    parser.add_argument("--bundle", required=True,
                        help="inference bundle (stage 2; stage 1 with --linear-probe)")
    for name, layout in (("audiocaps", "test.csv + audio/test/"),
                         ("clotho", "clotho_captions_evaluation.csv + evaluation/"),
                         ("esc50", "meta/esc50.csv + audio/"),
                         ("urbansound8k", "metadata/UrbanSound8K.csv + audio/fold*/")):
        parser.add_argument(f"--{name}", metavar="DIR", help=f"dataset folder ({layout})")
    parser.add_argument("--manifest", action="append", default=[], metavar="FILE",
                        help="your own set: a manifest (.jsonl/.csv as for training; its "
                             "captions are retrieved, its labels classified zero-shot); "
                             "repeatable")
    parser.add_argument("--array-record", action="append", default=[], metavar="DIR[:SPLIT]",
                        help="your own set written by curate build (split default 'test'); "
                             "repeatable")
    parser.add_argument("--synthetic", type=non_negative, default=0, metavar="N",
                        help="also evaluate N held-out clips of the embedded synthetic corpus")
    parser.add_argument("--synthetic-seconds", type=float, default=0.0,
                        help="their length (default: the bundle's window)")
    parser.add_argument("--caption-clips", type=non_negative, default=0, metavar="N",
                        help="caption N clips of each labelled set and report how often "
                             "the caption names the clip's class")
    parser.add_argument("--caption-method", choices=("greedy", "beam"), default="greedy",
                        help="how those captions are decoded (default greedy, as "
                             "training's evaluation; beam: 4 beams)")
    parser.add_argument("--zeroshot-prompt", choices=("release", "sentence"),
                        default="release",
                        help="zero-shot prompts as the released evaluation code wrote them "
                             "('This is a sound of chirping_birds', default: comparable with "
                             "the paper's numbers) or as the paper words them ('This is a "
                             "sound of chirping birds.')")
    parser.add_argument("--linear-probe", action="store_true",
                        help="also train a logistic regression on the frozen audio "
                             "embeddings of each labelled set, cross-validated over its "
                             "folds (ESC-50's 5, UrbanSound8K's 10; 5 seeded folds of your "
                             "own sets) and report its top-1; the only task a stage-1 "
                             "(MAE) bundle can run")
    parser.add_argument("--window-seconds", type=float, default=RELEASE_WINDOW_SECONDS,
                        metavar="S",
                        help="embed each clip's first S seconds in one pass, and average "
                             "the embeddings of S-second windows of longer clips (default "
                             f"{RELEASE_WINDOW_SECONDS:g}: as the released evaluation code, "
                             "which embedded Clotho's 15-30 s clips whole; 0: the bundle's "
                             "training window)")
    parser.add_argument("--out", help="folder for results.json and results.md")
    parser.add_argument("--batch-size", type=positive, default=32, help="clips per model call")
    parser.add_argument("--workers", type=positive, default=4, help="threads decoding audio")


def _own_sets(manifests: list[str], array_records: list[str]
              ) -> dict[str, tuple[str, str, str]]:
    """Set name (the file or folder's name, made unique) -> (kind, path, split)."""
    out: dict[str, tuple[str, str, str]] = {}
    given = [("manifest", path, "") for path in manifests]
    given += [("array_record", *path_and_split(spec, "test")) for spec in array_records]
    for kind, path, split in given:
        base = os.path.basename(os.path.normpath(path)) or path
        name = base + (f":{split}" if kind == "array_record" else "")
        while name in out or name in DATASETS or name == "synthetic":
            name += "'"
        out[name] = (kind, path, split)
    return out


def command(args: Any, load_model: Callable[[str], Any], progress: Progress | None) -> int:
    """Runs the `eval` command: opens the sets, evaluates, prints the Markdown tables.

    Args:
      args: parsed `add_arguments` options.
      load_model: bundle path -> model.
      progress: called as progress(label, done, total).

    Returns:
      The exit status (0).
    """
    roots = {name: getattr(args, name) for name in ("audiocaps", "clotho", "esc50",
                                                    "urbansound8k") if getattr(args, name)}
    own = _own_sets(getattr(args, "manifest", []), getattr(args, "array_record", []))
    if not roots and not args.synthetic and not own:
        raise ValueError("no evaluation set given; pass at least one of --audiocaps, "
                         "--clotho, --esc50, --urbansound8k, --manifest, --array-record, "
                         "--synthetic N (N > 0)")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; results go into a folder "
                         "(results.json, results.md): name a new or existing folder")
    bundle, out = (os.path.realpath(p) + os.sep for p in (args.bundle, args.out or "."))
    if args.out and (out.startswith(bundle) or os.path.isfile(out + "bundle.json")):
        raise ValueError(f"--out {args.out} is (inside) an inference bundle's folder; results "
                         "written there would mix with the bundle: name another folder")
    seconds = args.synthetic_seconds
    if args.synthetic and seconds and not 1.0 <= seconds <= 600.0:
        raise ValueError(f"--synthetic-seconds {seconds} must be between 1 and 600 "
                         "(or 0 for the bundle's window)")
    if args.window_seconds and not 1.0 <= args.window_seconds <= 600.0 \
            or args.window_seconds < 0:
        raise ValueError(f"--window-seconds {args.window_seconds:g} must be between 1 and 600 "
                         "(or 0 for the bundle's training window)")
    sets = open_datasets(roots)
    # Where each set came from, as given, recorded with its results.
    origins: dict[str, dict[str, Any]] = {
        name: {"option": f"--{name}", "path": os.path.abspath(root),
               **({"split": SPLITS[name]} if name in SPLITS else {})}
        for name, root in roots.items()}
    for name, (kind, path, split) in own.items():
        origins[name] = {"option": f"--{kind.replace('_', '-')}", "path": os.path.abspath(path),
                         **({"split": split} if split else {})}
        options = {"skip_bad_rows": True} if kind == "manifest" else {}
        try:
            sets[name] = open_source(kind, path=path, split=split, **options)
        except SourceError as e:
            raise ValueError(f"--{kind.replace('_', '-')} {path}: {e}") from None
        if not len(sets[name]):
            raise ValueError(f"--{kind.replace('_', '-')} {path}: the set has no clips")
    model = load_model(args.bundle)
    if args.synthetic:
        from cacophony_jax.data.synthetic import SyntheticCorpus

        seconds = seconds or max(1.0, float(getattr(model, "window_seconds", 10.0)))
        sets["synthetic"] = SyntheticCorpus("eval", args.synthetic, seconds)
        origins["synthetic"] = {"option": "--synthetic", "clips": args.synthetic,
                                "split": "eval", "seconds": seconds,
                                "seed": sets["synthetic"].seed}
    results = evaluate_bundle(model, sets, out_dir=args.out, batch_size=args.batch_size,
                              workers=args.workers, caption_clips=args.caption_clips,
                              caption_method=args.caption_method,
                              bundle=os.path.abspath(args.bundle),
                              prompt=args.zeroshot_prompt, progress=progress,
                              window_seconds=args.window_seconds or None,
                              linear_probe=args.linear_probe, origins=origins)
    print(results_markdown(results))
    if args.out:
        print(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
    return 0

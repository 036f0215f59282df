"""The measurement plan for one accelerator host, run in named parts.

Each part runs the other benchmark scripts, or a short real training run through
`python -m cacophony_jax.main`, in subprocesses one after another, and appends what
they measured to `OUT/rows.jsonl`; `OUT/summary.md` is rewritten from all rows after
every part. Each part is sized to finish in about 10 minutes on one H100 (compiles
included), so a machine lent for a short time can be used part by part.

Usage:

    python benchmarks/suite.py --list
    python benchmarks/suite.py --out results/h100 --parts steps-mae,steps-cacophony
    python benchmarks/suite.py --out results/h100 --parts train-mae,train-cacophony
    python benchmarks/suite.py --out results/h100 --parts all --dry-run
    python benchmarks/suite.py --summarize results/h100/rows.jsonl other/rows.jsonl

The training parts write a WAV corpus of synthetic 10 s clips (`--clips`), then
train the `--variant` config on it through the real input pipeline (Grain workers
decoding WAV files) for `--train-steps` steps without evaluation, and report the
steady-state examples/s, model TFLOP/s per device, MFU and input-wait share that the
loop logged (the first step, which includes compilation, and the first log window
after it are left out). The
`attention` part (listed only when `--attention` names a fused kernel) checks that the
kernel gives XLA's loss and gradients (attention_parity.py); run it first on a new GPU.
The `xla-flags` part times both steps under each of `GPU_XLA_FLAG_SETS` (compare with
`steps-*` at the same batch), and the `fused-qkv` part both steps with
`model.fuse_qkv` (one matrix product for query, key and value), and the `fused-norm`
part both steps with `model.fused_norm` (the audio blocks' LayerNorms as Pallas
kernels; `norm-kernels` times those kernels alone against XLA's LayerNorm, for a
few launch settings, at the MAE decoder's shape), and `fused-both` with both options.
The `profile` part times ten steps of each stage, then traces three more and sorts the
device time into matrix products, attention, other fusions, copies and collectives
(profile_summary.py): where the time goes that MFU does not count. The `allocators`
part trains both stages once under each XLA_PYTHON_CLIENT_ALLOCATOR of `--allocators`
(XLA's BFC pool and CUDA's stream-ordered allocator by default): what the allocator
costs the loop, and whether the batch fits XLA's pool.

With `--budget SECONDS` the parts share one time limit: name them in order of
importance, and the ones the budget does not reach are skipped. A training run stopped
by its timeout still reports the log windows it completed (with its exit code).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import profile_summary, report, tables  # noqa: E402

MIN_COMMAND_S = 30  # --budget: no command starts with less time than this left


@dataclasses.dataclass
class Command:
    """One subprocess of a part."""

    label: str
    argv: list[str]
    train_stage: str = ""  # set for a training run: its metrics are summarised
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to the environment

    def shell(self) -> str:
        """The command as a shell line, with its environment additions."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()),
                         *map(shlex.quote, self.argv)])


# XLA:GPU options worth timing against the ones training runs with
# (`cacophony_jax.xla_defaults`: cuBLAS GEMMs only) on a new GPU or JAX version
# (`xla-flags` part): XLA's autotuned Triton GEMM fusions back on, and no CUDA-graph
# command buffers.
GPU_XLA_FLAG_SETS = ("--xla_gpu_enable_triton_gemm=true",
                     "--xla_gpu_enable_command_buffer=")


def _py(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / script), *args]


def _train(stage: str, args: argparse.Namespace, out: pathlib.Path,
           allocator: str = "") -> Command:
    """A training run of `stage` (its workdir: out/<label>), with XLA_PYTHON_CLIENT_ALLOCATOR
    set to `allocator` if given."""
    label = f"train-{stage}" + (f"-{allocator}" if allocator else "")
    steps = args.train_steps
    argv = [sys.executable, "-m", "cacophony_jax.main",
            f"--config=configs/{stage}.py:{args.variant},steps={steps},batch={args.batch}",
            f"--workdir={out / label}",
            "--config.data.train.kind=manifest",
            f"--config.data.train.path={out / 'corpus' / 'manifest.jsonl'}",
            "--config.data.eval.kind=",
            f"--config.data.num_workers={args.workers}",
            f"--config.audio.clip_seconds={args.clip_seconds:g}",
            f"--config.optim.warmup_steps={max(1, steps // 10)}",
            f"--config.train.log_every={args.log_every}",
            f"--config.train.checkpoint_every={10 * steps}"]
    if args.attention:
        argv.append(f"--config.model.attention={args.attention}")
    if args.peak_tflops:
        argv.append(f"--config.train.peak_tflops={args.peak_tflops:g}")
    if args.train_profile_steps:
        argv.append(f"--config.train.profile_steps={args.train_profile_steps}")
    env = {"XLA_PYTHON_CLIENT_ALLOCATOR": allocator} if allocator else {}
    return Command(label, argv, train_stage=stage, env=env)


def _loop_profile(folder: pathlib.Path, steps: int) -> dict[str, Any]:
    """The device-time summary of a training run's trace (`--train-profile-steps`): is
    the device kept busy in the loop, and where its time goes; {} without a trace."""
    if not steps or not folder.is_dir():
        return {}
    try:
        summary, text = profile_summary.summarize_trace(folder, steps)
    except Exception as e:  # noqa: BLE001 - a summary is never worth the run's row
        print(f"== no summary of the trace in {folder}: {e}", flush=True)
        return {}
    print(text, flush=True)
    return {"loop_busy_fraction": summary.get("busy_fraction"),
            "loop_profile_ms": {k: v.get("ms_per_step")
                                for k, v in summary.get("categories", {}).items()}}


def plan(args: argparse.Namespace, out: pathlib.Path) -> dict[str, list[Command]]:
    """Part name -> its commands, for `args` (sizes, attention, variant)."""
    rows = str(out / "rows.jsonl")
    common = ["--variant", args.variant, "--json", rows]
    if args.peak_tflops:
        common += ["--peak-tflops", f"{args.peak_tflops:g}"]
    attention = ["--attention", args.attention] if args.attention else []
    big = str(2 * max(args.step_batches))
    sweep = ",".join(str(b) for b in args.step_batches)
    parts = {"attention": [Command("attention", _py(
        "attention_parity.py", "--stage", args.parity_stage, "--variant", args.variant,
        "--batch", str(args.parity_batch),
        *attention, "--json", rows))]} if args.attention not in ("", "xla") else {}
    parts |= {
        f"steps-{stage}": [Command(f"steps-{stage}", _py(
            "train_step.py", "--stage", stage, "--sweep-batch", sweep, *attention, *common))]
        for stage in ("mae", "cacophony")
    }
    parts["steps-xla"] = [Command("steps-xla", _py(
        "train_step.py", "--stage", "mae,cacophony", "--batch", str(args.batch),
        "--attention", "xla", *common))]
    parts["sam"] = [Command("sam", _py(
        "train_step.py", "--stage", "cacophony", "--batch", str(args.batch), "--sam",
        *attention, *common))]
    parts["fused-qkv"] = [Command("fused-qkv", _py(
        "train_step.py", "--stage", "mae,cacophony", "--batch", str(args.batch), "--fuse-qkv",
        *attention, *common))]
    parts["norm-kernels"] = [Command("norm-kernels", _py(
        "norm_kernels.py", "--tokens", str(args.batch * 496), "--rows", "1,2,4,8",
        "--warps", "4,8", "--json", rows))]
    parts["fused-norm"] = [Command("fused-norm", _py(
        "train_step.py", "--stage", "mae,cacophony", "--batch", str(args.batch),
        "--fused-norm", *attention, *common))]
    parts["fused-both"] = [Command("fused-both", _py(
        "train_step.py", "--stage", "mae,cacophony", "--batch", str(args.batch),
        "--fused-norm", "--fuse-qkv", *attention, *common))]
    parts["remat"] = [Command("remat", _py(
        "train_step.py", "--stage", "mae,cacophony", "--batch", big, "--remat", "dots",
        *attention, *common))]
    parts["profile"] = [Command("profile", _py(
        "train_step.py", "--stage", "mae,cacophony", "--batch", str(args.batch),
        "--profile", str(out / "profile"), *attention, *common))]
    parts["xla-flags"] = [
        Command(f"xla-flags-{i}", _py("train_step.py", "--stage", "mae,cacophony", "--batch",
                                      str(args.batch), *attention, *common),
                env={"XLA_FLAGS": flags})
        for i, flags in enumerate(GPU_XLA_FLAG_SETS, 1)]
    parts["input"] = [
        Command("input-frontend", _py(
            "input_pipeline.py", "--bench", "frontend", "--batch", str(args.batch),
            "--sub-batches", "1", "--iters", "20", "--json", rows)),
        Command("input-host", _py(
            "input_pipeline.py", "--bench", "wav", "--text-length", "0,64",
            "--read-threads", "1", "--workers", str(args.workers), "--json", rows)),
    ]
    for stage in ("mae", "cacophony"):
        parts[f"train-{stage}"] = [_train(stage, args, out)]
    parts["allocators"] = [_train(stage, args, out, allocator)
                           for stage in ("mae", "cacophony")
                           for allocator in args.allocators.split(",") if allocator]
    return parts


def steady_state(metrics_path: pathlib.Path, skip: int = 1) -> dict[str, float]:
    """Means of the loop's perf/ metrics over the log windows after the first `skip`.

    The loop reports no rates for the first step (it holds the compilation); the first
    `skip` windows after it hold the input pipeline's warm-up. With too few windows
    the last one is used.
    """
    rows = []
    for line in metrics_path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a killed run
            rows.append(json.loads(line))
    rows = [r for r in rows if "perf/examples_per_sec" in r]
    if not rows:
        raise ValueError(f"{metrics_path} has no throughput rows")
    kept = rows[skip:] or rows[-1:]
    keys = sorted({k for r in kept for k in r if k.startswith("perf/")})
    out = {k.removeprefix("perf/"): sum(r[k] for r in kept) / len(kept)
           for k in keys if all(k in r for r in kept)}
    out.update(windows=len(kept), last_step=rows[-1]["step"], loss=rows[-1]["loss"],
               failed_records=rows[-1].get("data/failed_records", 0.0))
    return out


def run_command(command: Command, log_dir: pathlib.Path, timeout: float) -> int:
    """Runs one command, streaming its output to the console and to its log file.

    After `timeout` seconds the command and everything it started (Grain worker
    processes) are killed, whether or not it is printing.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    if "XLA_FLAGS" in command.env:  # appended to the caller's own flags
        env["XLA_FLAGS"] = " ".join(
            f for f in (os.environ.get("XLA_FLAGS", ""), command.env["XLA_FLAGS"]) if f)
    env.update({k: v for k, v in command.env.items() if k != "XLA_FLAGS"})
    print(f"== {command.label}: {command.shell()}", flush=True)
    with open(log_dir / f"{command.label}.log", "w") as log:
        proc = subprocess.Popen(command.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def stop():
            print(f"== {command.label}: stopped after {timeout:g} s", flush=True)
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            return proc.wait()
        finally:
            timer.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="output folder (rows.jsonl, summary.md, logs/)")
    p.add_argument("--parts", default="", help="comma list of parts, or 'all' (see --list)")
    p.add_argument("--list", action="store_true", help="print the parts and their commands")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--summarize", nargs="*", default=None, metavar="ROWS",
                   help="only print the summary of these rows.jsonl files")
    p.add_argument("--variant", default="base", choices=("tiny", "base"))
    p.add_argument("--attention", default=None,
                   help="attention for all parts but steps-xla (default: cudnn where an "
                        "NVIDIA GPU is present, else xla; '' = the config's)")
    p.add_argument("--step-batches", default="64,128,256", help="steps-* batch sweep")
    p.add_argument("--batch", type=int, default=128, help="batch of the other parts")
    p.add_argument("--parity-batch", type=int, default=16, help="attention check's batch")
    p.add_argument("--parity-stage", default="mae,cacophony",
                   help="stages the attention check runs (comma list)")
    p.add_argument("--train-steps", type=int, default=150, help="training-run length")
    p.add_argument("--log-every", type=int, default=10, help="training-run log window")
    p.add_argument("--clips", type=int, default=1024, help="clips in the training corpus")
    p.add_argument("--train-profile-steps", type=int, default=0,
                   help="trace this many steps of each training run (train.profile_steps) "
                        "and summarise its device time")
    p.add_argument("--allocators", default="bfc,cuda_async",
                   help="the allocators part's XLA_PYTHON_CLIENT_ALLOCATOR values")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="clip length")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="Grain worker processes (training runs, host input row)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak for MFU (0: the datasheet's; CPU: measured/none)")
    p.add_argument("--timeout", type=float, default=540.0, help="seconds per command")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds for this whole invocation (0: no limit): each command's "
                        "timeout is cut to what is left, and commands that would start with "
                        f"under {MIN_COMMAND_S} s left are skipped")
    args = p.parse_args(argv)
    if args.attention is None:
        # Looked up without starting JAX here: the parts run in their own processes, and
        # this one must not take GPU memory they need.
        args.attention = "cudnn" if glob.glob("/dev/nvidia[0-9]*") else "xla"
    args.step_batches = [int(b) for b in args.step_batches.split(",") if b]
    if not args.step_batches or min(args.step_batches) < 1 or args.batch < 1:
        raise ValueError("--step-batches and --batch must be positive")
    if args.train_steps < 2 or args.clips < 1 or args.log_every < 1:
        raise ValueError("--train-steps must be at least 2, --clips and --log-every positive")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the requested parts; returns the rows they added."""
    args = parse_args(argv)
    if args.summarize is not None:
        missing = [p for p in args.summarize if not pathlib.Path(p).is_file()]
        if missing:
            sys.exit(f"error: --summarize: no rows file {', '.join(missing)} (give the "
                     "rows.jsonl a suite run wrote into its --out folder)")
        print(tables.summarize(tables.read_rows([pathlib.Path(p) for p in args.summarize])))
        return []
    out = pathlib.Path(args.out or "suite-results").resolve()
    parts = plan(args, out)
    names = list(parts) if args.parts == "all" else [n for n in args.parts.split(",") if n]
    if args.list or not names:
        for name, commands in parts.items():
            print(f"{name}:\n" + "\n".join("  " + c.shell() for c in commands))
        return []
    if "attention" in names and "attention" not in parts:
        raise ValueError("the attention part compares XLA's attention with a fused kernel: "
                         "give one with --attention cudnn (the default only where a GPU is "
                         "present)")
    unknown = sorted(set(names) - set(parts))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose from {sorted(parts)} or 'all'")
    rows_path = out / "rows.jsonl"
    before = len(tables.read_rows([rows_path]))
    deadline = time.monotonic() + args.budget if args.budget else float("inf")
    for name in names:
        for command in parts[name]:
            if args.dry_run:
                print(command.shell())
                continue
            left = deadline - time.monotonic()
            if left < MIN_COMMAND_S:
                print(f"== {command.label}: skipped, {max(left, 0):.0f} s of --budget left",
                      flush=True)
                continue
            if command.train_stage and not (out / "corpus" / "manifest.jsonl").exists():
                from cacophony_jax.data import synthetic
                print(f"== writing {args.clips} synthetic {args.clip_seconds:g} s clips to "
                      f"{out / 'corpus'}", flush=True)
                synthetic.write_corpus(out / "corpus", "train", args.clips, args.clip_seconds)
            start = time.perf_counter()
            code = run_command(command, out / "logs",
                               min(args.timeout, deadline - time.monotonic()))
            if code:
                print(f"== {command.label} failed (exit {code}); see "
                      f"{out / 'logs' / (command.label + '.log')}", flush=True)
            if command.train_stage:
                # A run stopped early still reports the windows it logged.
                try:
                    metrics = steady_state(out / command.label / "metrics.jsonl")
                except (OSError, ValueError) as e:
                    print(f"== {command.label}: no throughput to report ({e})", flush=True)
                    continue
                traced = _loop_profile(out / command.label / "profile",
                                       args.train_profile_steps)
                row = {"kind": "train", "stage": command.train_stage,
                       "variant": args.variant, "batch": args.batch,
                       "workers": args.workers, "attention": args.attention,
                       "allocator": command.env.get(
                           "XLA_PYTHON_CLIENT_ALLOCATOR",
                           os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "")),
                       "exit": code, "wall_s": time.perf_counter() - start, **metrics,
                       **traced}
                report.emit(row, f"== {command.label}: {json.dumps(row)}", str(rows_path))
        if not args.dry_run:
            rows = tables.read_rows([rows_path])
            (out / "summary.md").write_text(tables.summarize(rows))
    if args.dry_run:
        return []
    rows = tables.read_rows([rows_path])
    print(tables.summarize(rows))
    return rows[before:]


if __name__ == "__main__":
    report.run(main)

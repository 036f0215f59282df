"""The one training loop: `run(config, workdir)` for every task.

Phases, top to bottom: mesh -> data -> task -> shapes/shardings -> init or restore ->
step -> loop (log, evaluate, checkpoint) -> final evaluation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
import optax
from etils import epath

from cacophony_jax import tasks
from cacophony_jax.data import pipeline, to_global
from cacophony_jax.optim import optimizer
from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.parallel import partition
from cacophony_jax.tasks import common as task_common
from cacophony_jax.train import checkpoint, flops, init, metrics
from cacophony_jax.train import state as state_lib
from cacophony_jax.train import step as step_lib

HOST_ONLY_KEYS = ("num_failed",)

# Counts a run cannot work with below these values: (config key, minimum, why).
_MINIMUMS = (
    ("train.steps", 1, ""),
    ("train.log_every", 1, ""),
    ("train.checkpoint_every", 1, ""),
    ("train.keep_checkpoints", 1, " (0 would delete every checkpoint, the last included)"),
    ("train.eval_every", 0, " (0 = only at the end)"),
    ("train.profile_steps", 0, ""),
    ("train.peak_tflops", 0, " (0 = the chip's datasheet value)"),
    ("data.global_batch_size", 1, ""),
    ("data.eval_batch_size", 1, ""),
    ("data.num_workers", 0, " (0 = threads in the training process)"),
    ("data.read_threads", 1, ""),
    ("data.prefetch_batches", 0, ""),
)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Rejects counts the loop cannot run with, naming the key (before anything starts)."""
    for key, minimum, why in _MINIMUMS:
        node = config
        for part in key.split("."):
            node = node[part]
        if node < minimum:
            raise ValueError(f"config.{key}={node} must be >= {minimum}{why}")
    optimizer.make_optimizer(config.optim, config.train.steps)  # its settings, too


class _Prefetcher:
    """Pulls host batches in a thread, makes them global, remembers iterator states.

    The iterator state recorded with each batch is the one to checkpoint after the
    step that consumed it, so resuming replays exactly the following batches.
    """

    def __init__(self, data_iter, mesh, depth: int):
        self._it, self._mesh = data_iter, mesh
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                state = self._it.get_state()
                failed = int(np.sum(batch.pop("num_failed", 0)))
                item = (to_global.to_global(batch, self._mesh), state, failed)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._queue.put(e)

    def next(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


class _Stop:
    """SIGTERM or a first Ctrl-C (SIGINT) -> save a checkpoint at the next step and exit
    cleanly; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        how = " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""
        logging.warning("signal %d received: checkpointing at the next step and stopping%s",
                        signum, how)
        self.requested = True

    def agreed(self) -> bool:
        """True when any process was asked to stop (all processes agree)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Profiler:
    """Captures a profiler trace of `num_steps` steps, after this run's first steps.

    The first `PROFILE_AFTER` steps of a run (compilation, input warm-up) are left out;
    the trace goes to `directory` (TensorBoard's profile plugin or Perfetto read it).
    Stopping waits for the traced steps to finish, the only wait it adds.
    """

    PROFILE_AFTER = 3

    def __init__(self, directory: epath.Path, num_steps: int, start: int, total: int):
        self.directory, self.active = directory, False
        self.first = min(start + self.PROFILE_AFTER, max(start, total - num_steps))
        self.last = min(self.first + num_steps, total) if num_steps > 0 else -1

    def annotate(self, step: int):
        """Context for dispatching `step` (a step marker inside a trace)."""
        if self.active:
            return jax.profiler.StepTraceAnnotation("train", step_num=step)
        return contextlib.nullcontext()

    def before(self, step: int) -> None:
        if step == self.first and step < self.last:
            try:
                jax.profiler.start_trace(str(self.directory))
            except Exception as error:  # noqa: BLE001 - a diagnostic, not worth a failed run
                logging.warning("no profiler trace (%s); training goes on", error)
                return
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            if self.stop():
                logging.info("profiler trace of steps %d-%d written to %s", self.first + 1,
                             self.last, self.directory)

    def stop(self) -> bool:
        """Ends a running trace; True when it was written."""
        if not self.active:
            return False
        self.active = False
        try:
            jax.profiler.stop_trace()
        except Exception as error:  # noqa: BLE001 - a diagnostic, not worth a failed run
            logging.warning("the profiler trace could not be written to %s (%s); training "
                            "goes on", self.directory, error)
            return False
        return True


def _check_finite(loss: float, norm: float, step: int, ckpt: checkpoint.Checkpointer) -> None:
    """Stops the run when the loss or the parameters are no longer finite numbers."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    saved = ckpt.steps()
    kept = (f"the newest checkpoint, step {saved[-1]} in {ckpt.directory}, was saved "
            "before it (every save checks first): rerun to resume from it" if saved
            else "no checkpoint had been saved yet")
    raise FloatingPointError(
        f"training diverged by step {step} (loss {loss}, parameter norm {norm}); {kept}. "
        "Lower config.optim.learning_rate, keep config.optim.clip_norm on, or check the "
        "data")


def _mean_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
    fetched = jax.device_get(window)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}


def _flops_and_peak(config, tokenizer, tx, schedule, plan, mesh, shapes
                    ) -> tuple[float | None, float | None]:
    """(model FLOPs of one step per device, the device's peak FLOP/s) for MFU logging.

    Either is None when unknown; counting never stops training.
    """
    try:
        step_flops = flops.step_model_flops(config, tokenizer, tx, schedule, plan, mesh,
                                            shapes) / mesh.devices.size
    except Exception as error:  # noqa: BLE001 - a diagnostic, not worth a failed run
        logging.warning("model FLOPs not counted (%s): TFLOP/s and MFU are not logged",
                        error)
        return None, None
    device = mesh.devices.flat[0]
    peak, source = None, "no datasheet peak for this device; set train.peak_tflops"
    if config.train.peak_tflops > 0:
        peak, source = config.train.peak_tflops * 1e12, "train.peak_tflops"
    elif (known := flops.datasheet_peak(device.device_kind)) is not None:
        peak, source = known[0], f"{known[1]} dense bf16 datasheet"
    logging.info("model FLOPs: %.4g GFLOP per example; peak %s (%s)",
                 step_flops * mesh.devices.size / config.data.global_batch_size / 1e9,
                 f"{peak / 1e12:g} TFLOP/s per device" if peak else "unknown", source)
    return step_flops, peak


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config.task` in `workdir` (resuming if it holds checkpoints).

    Args:
      config: a locked config from configs/*.py.
      workdir: output folder (checkpoints, metrics, tokenizer, config.json).

    Returns:
      The final evaluation metrics (empty when evaluation is disabled).
    """
    check_config(config)
    workdir_path = epath.Path(workdir)
    if workdir_path.exists() and not workdir_path.is_dir():
        raise ValueError(f"--workdir {workdir} is a file; name a folder (new or a run's)")
    workdir_path.mkdir(parents=True, exist_ok=True)
    config_json = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        (workdir_path / "config.json").write_text(json.dumps(config_json, indent=2))

    # Mesh.
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = partition.rules_from_config(config.sharding_rules)
    divisor = mesh_lib.batch_divisor(mesh)
    for name in ("global_batch_size", "eval_batch_size"):
        if config.data[name] % divisor:
            raise ValueError(f"config.data.{name}={config.data[name]} must be a multiple "
                             f"of the {divisor} devices the batch is split over")
    logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape),
                 jax.device_count(), jax.process_count())
    platform = mesh.devices.flat[0].platform
    if config.model.attention == "cudnn" and platform != "gpu":
        raise ValueError(f"config.model.attention=cudnn is cuDNN's fused attention, which "
                         f"needs NVIDIA GPUs; this run has {platform} devices: use xla")
    if config.model.fused_norm and platform != "gpu":
        if platform != "cpu":
            raise ValueError(f"config.model.fused_norm runs Triton kernels, which need CUDA "
                             f"GPUs; this run has {platform} devices: set it to false")
        logging.warning("model.fused_norm on CPU: the LayerNorm kernels are interpreted, "
                        "which is slow; it is meant for GPU runs")

    # Data and task.
    train_source = task_common.open_train_source(config)
    tokenizer = init.prepare_tokenizer(config, workdir_path, train_source)
    task = tasks.build(config, tokenizer)
    fmt = pipeline.ExampleFormat(
        clip_samples=task_common.clip_samples(config.audio.clip_seconds),
        text_length=config.data.text_length if tokenizer is not None else 0,
        synthetic_prob=config.data.synthetic_prob, tokenizer=tokenizer)
    dataset = pipeline.train_dataset(
        train_source, fmt, global_batch_size=config.data.global_batch_size,
        seed=config.seed, num_workers=config.data.num_workers,
        read_threads=config.data.read_threads,
        prefetch_batches=config.data.prefetch_batches)
    data_iter = iter(dataset)
    logging.info("training on %s (%d records)", getattr(train_source, "name", "?"),
                 len(train_source))

    # Shapes and shardings.
    tx, schedule = optimizer.make_optimizer(config.optim, config.train.steps)
    plan = state_lib.plan_state(task.init_params, tx, mesh, rules)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(plan.abstract.params))
    logging.info("%s model: %.2f M parameters", task.name, num_params / 1e6)
    if config.model.scan and config.model.remat == "none":
        # Compiled for an H100, the base steps needed 1.8-2.1x the memory this way
        # (benchmarks/RESULTS.md section 3b).
        logging.warning("model.scan=true without model.remat keeps every layer's "
                        "intermediates in stacked buffers (about twice the memory of "
                        "scan=false on a GPU); set model.remat=dots or full, or "
                        "scan=false")
    logging.debug("parameter shardings:\n%s",
                  partition.describe(plan.abstract.params, plan.shardings.params))

    # Init or restore.
    ckpt = checkpoint.Checkpointer(workdir_path / "checkpoints",
                                   keep=config.train.keep_checkpoints,
                                   async_save=config.train.async_checkpoints)
    stopper = _Stop()
    prefetcher = profiler = None
    writer = metrics.MetricWriter(str(workdir_path))
    try:
        state = init.restore_or_init(config, task, tx, plan, ckpt, data_iter)
        start = int(jax.device_get(state.step))
        writer.resume_at(start)
        total = config.train.steps

        # Step and evaluation.
        clip = fmt.clip_samples
        shapes = {"audio": (config.data.global_batch_size, clip)}
        shapes.update({k: (config.data.global_batch_size,)
                       for k in ("audio_len", "valid")})
        if fmt.text_length:
            shapes.update({k: (config.data.global_batch_size, fmt.text_length)
                           for k in ("text_ids", "text_mask")})
        train_step = step_lib.jit_train_step(task, tx, schedule, plan, mesh, shapes, rules,
                                             update_norm=config.train.log_update_norm)
        param_norm = jax.jit(optax.tree.norm, out_shardings=mesh_lib.replicated(mesh))
        step_flops, peak = _flops_and_peak(config, tokenizer, tx, schedule, plan, mesh, shapes)
        evaluate = task.evaluator(mesh, tokenizer)

        # Loop.
        prefetcher = _Prefetcher(data_iter, mesh, config.data.prefetch_batches)
        profiler = _Profiler(workdir_path / "profile", config.train.profile_steps, start,
                             total)
        progress = metrics.Progress(total, start, config.data.global_batch_size,
                                    step_flops, peak)
        window: list[dict[str, jax.Array]] = []
        failed_records, iter_state, step = 0, None, start
        final: dict[str, float] = {}
        if start >= total:
            logging.info("already trained for %d of %d steps", start, total)
        while step < total:
            t0 = time.perf_counter()
            batch, iter_state, failed = prefetcher.next()
            progress.add_wait(time.perf_counter() - t0)
            failed_records += failed
            profiler.before(step)
            with profiler.annotate(step):
                state, step_metrics = train_step(state, batch)
            window.append(step_metrics)
            step += 1
            profiler.after(step, (state, step_metrics))
            last = step == total
            stop = stopper.agreed() if (jax.process_count() == 1 or step % 10 == 0) else False
            save = last or stop or step % config.train.checkpoint_every == 0
            if step % config.train.log_every == 0 or last or step == start + 1:
                row = _mean_metrics(window)
                window = []
                row["param_norm"] = float(param_norm(state.params))
                _check_finite(row["loss"], row["param_norm"], step, ckpt)
                rates = progress.rates(step)
                row.update(rates)
                row["data/failed_records"] = failed_records
                writer.write(step, row)
                if jax.process_index() == 0:
                    logging.info("%s", progress.line(step, row, rates))
            elif save:  # never save a state that has diverged since the last log
                losses = jax.device_get([m["loss"] for m in window])
                _check_finite(float(np.mean(losses)), float(param_norm(state.params)),
                              step, ckpt)
            if save:  # before evaluating, so a failing evaluation loses no training
                t0 = time.perf_counter()
                ckpt.save(step, state, iter_state, config_json, force=True)
                progress.add_pause(time.perf_counter() - t0)
            if evaluate is not None and (last or (config.train.eval_every and
                                                  step % config.train.eval_every == 0)):
                t0 = time.perf_counter()
                final = evaluate(state.params)
                writer.write(step, final)
                if jax.process_index() == 0:
                    logging.info("eval at step %d: %s", step, metrics.format_eval(final))
                progress.add_pause(time.perf_counter() - t0)
            if stop:
                logging.warning("stopped at step %d after a termination signal; "
                                "rerun the same command to resume", step)
                return final
        if not final and evaluate is not None:  # e.g. rerun of a finished workdir
            final = evaluate(state.params)
            if jax.process_index() == 0:
                logging.info("eval at step %d: %s", step, metrics.format_eval(final))
        return final
    finally:
        if profiler is not None:
            profiler.stop()
        stopper.restore()
        if prefetcher is not None:
            prefetcher.close()
        ckpt.close()
        writer.close()
        close = getattr(data_iter, "close", None)
        if close is not None:
            close()

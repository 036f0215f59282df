"""The one training loop: `run(config, workdir)` for every task.

Phases, top to bottom: mesh -> data -> task -> shapes/shardings -> init or restore ->
step -> loop (log, evaluate, checkpoint) -> final evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from etils import epath

from cacophony_jax import atomic_write, tasks
from cacophony_jax.data import pipeline
from cacophony_jax.optim import optimizer
from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.parallel import partition
from cacophony_jax.tasks import common as task_common
from cacophony_jax.train import (
    agree,
    checkpoint,
    checks,
    disk,
    evaluator,
    flops,
    host,
    init,
    memory_hint,
    metrics,
)
from cacophony_jax.train import state as state_lib
from cacophony_jax.train import step as step_lib

HOST_ONLY_KEYS = ("num_failed",)

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


def _stop(ckpt: checkpoint.Checkpointer, step: int, signum: int, what: str) -> None:
    """Ends a run stopped by a signal once its last checkpoint is committed."""
    # Every process's part of the save is committed before any of them exits non-zero
    # (srun --kill-on-bad-exit would kill the others).
    ckpt.wait()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("stopped after a signal")
    logging.warning("stopped at step %d after a termination signal; %s", step, what)
    raise host.StopRequestedError(step, signum)


def _mean_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
    fetched = jax.device_get(window)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config.task` in `workdir` (resuming if it holds checkpoints).

    Args:
      config: a locked config from configs/*.py.
      workdir: output folder (checkpoints, metrics, tokenizer, config.json).

    Returns:
      The final evaluation metrics (empty when evaluation is disabled).
    """
    checks.check_config(config)
    try:
        workdir_path = host.make_workdir(workdir)
        with host.workdir_lock(workdir_path):
            return _train(config, workdir_path)
    except Exception as error:
        found = None if isinstance(error, disk.DiskFullError) else disk.failure(error)
        if found is None or not disk.in_workdir(found, workdir):
            raise
        # Every save has ended by now (`_train` closed the checkpointer): the steps on
        # disk are the complete ones.
        checkpoints = epath.Path(os.path.abspath(workdir)) / "checkpoints"
        raise disk.DiskFullError(disk.describe(found, workdir, checkpoints)) from error


def _train(config: ml_collections.ConfigDict, workdir_path: epath.Path) -> dict[str, float]:
    """`run`'s phases, with the workdir made and locked."""
    config_json = json.loads(config.to_json_best_effort())
    agree.check_same_run(config_json)  # one command on every host, and equal devices

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
    pool = memory_hint.pool_summary(memory_hint.device_memory(jax.local_devices()[0]))
    if pool:
        logging.info("device memory: %s (XLA_PYTHON_CLIENT_MEM_FRACTION, "
                     "XLA_PYTHON_CLIENT_ALLOCATOR)", pool)
    if config.model.attention == "cudnn" and config.model.dtype == "float32":
        raise ValueError("config.model.attention=cudnn takes bfloat16 or float16 inputs; this "
                         "run computes in float32: set config.model.dtype=bfloat16 or use "
                         "attention=xla")
    if config.model.attention == "cudnn" and platform != "gpu":
        raise ValueError(f"config.model.attention=cudnn is cuDNN's fused attention, which "
                         f"needs NVIDIA GPUs; this run has {platform} devices: use xla")
    if config.model.dtype == "float16" and platform == "cpu":
        raise ValueError("config.model.dtype=float16 does not run on CPU (XLA:CPU has no "
                         "float16 matrix products): use bfloat16 or float32")
    if config.model.fused_norm and platform != "gpu":
        if platform != "cpu":
            raise ValueError(f"config.model.fused_norm runs Triton kernels, which need CUDA "
                             f"GPUs; this run has {platform} devices: set it to false")
        logging.warning("model.fused_norm on CPU: the LayerNorm kernels are interpreted, "
                        "which is slow; it is meant for GPU runs")

    # Data and task. A finished run reads no training data (the first batches' decoding
    # and skip warnings would be noise); it only evaluates again.
    finished = init.finished(config, workdir_path)
    train_source = None if finished else task_common.open_train_source(config)
    init.check_saved_task(config, workdir_path)  # "another task's run" before "no tokenizer"
    tokenizer = init.prepare_tokenizer(config, workdir_path, train_source)
    task = tasks.build(config, tokenizer)
    fmt = pipeline.ExampleFormat(
        clip_samples=task_common.clip_samples(config.audio.clip_seconds),
        text_length=config.data.text_length if tokenizer is not None else 0,
        synthetic_prob=config.data.synthetic_prob, tokenizer=tokenizer)

    def batches(first: int = 0) -> Any:
        return iter(pipeline.train_dataset(
            train_source, fmt, global_batch_size=config.data.global_batch_size,
            seed=config.seed, num_workers=config.data.num_workers,
            read_threads=config.data.read_threads,
            prefetch_batches=config.data.prefetch_batches, first_batch=first))

    data_iter = None if finished else batches()

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
    fsdp = dict(mesh.shape).get("fsdp", 1)
    if fsdp > 1:
        share, largest = partition.unsplit_share(plan.abstract.params, plan.shardings.params,
                                                 "fsdp")
        if share > 0.1:
            logging.warning("%.0f%% of the parameters are not split over the %d-way fsdp "
                            "axis, because their widths do not divide by %d (largest: %s): "
                            "every device holds them whole; an fsdp size that divides the "
                            "model's widths shards them", 100 * share, fsdp, fsdp,
                            ", ".join(largest))
    logging.debug("parameter shardings:\n%s",
                  partition.describe(plan.abstract.params, plan.shardings.params))

    # Init or restore.
    ckpt = checkpoint.Checkpointer(workdir_path / "checkpoints",
                                   keep=config.train.keep_checkpoints,
                                   async_save=config.train.async_checkpoints)
    stopper = host.StopSignal()
    prefetcher = profiler = None
    writer = metrics.MetricWriter(str(workdir_path))
    failing = True  # until it returns: then an error while closing is the run's error
    try:
        fits = {"global_batch_size": config.data.global_batch_size,
                "num_workers": config.data.num_workers}
        resumed_iter = checkpoint.IteratorTarget(data_iter, rebuild=batches, expect=fits)
        state = init.restore_or_init(config, task, tx, plan, ckpt,
                                     resumed_iter if data_iter is not None else None)
        start = int(jax.device_get(state.step))
        if start < config.train.steps:
            if data_iter is None:  # the newest step was unreadable: an older one goes on
                train_source = task_common.open_train_source(config)
                resumed_iter.iterator = batches()
                ckpt.restore_iterator(start, resumed_iter)
            resumed_iter.prefetch()  # while the step compiles
            logging.info("training on %s (%d records)", getattr(train_source, "name", "?"),
                         len(train_source))
            if len(train_source) < config.data.global_batch_size:
                logging.warning(
                    "the training set has %d records, fewer than a batch (%d): every batch "
                    "holds some clips more than once%s", len(train_source),
                    config.data.global_batch_size, "; in the contrastive loss a clip's "
                    "copies count as each other's negatives" if config.task == "cacophony"
                    else "")
        data_iter, first_batch = resumed_iter.iterator, resumed_iter.first
        if start < config.train.steps and start and not resumed_iter.restored:
            # E.g. data.num_workers changed.
            getattr(data_iter, "close", lambda: None)()
            # The same stream from where the saved run was (in examples: the batch
            # size may have changed), its position counted from there from now on.
            seen = resumed_iter.counters.get("examples_seen")
            first_batch = (seen // config.data.global_batch_size if seen is not None
                           else _batches_drawn(ckpt, start, config.data.global_batch_size))
            data_iter = batches(first_batch)
        writer.resume_at(start)
        config_file = workdir_path / "config.json"
        # Only once the workdir's checkpoints are known to fit, and only if this run
        # trains: a rerun of a finished run with other settings trains nothing with them.
        if jax.process_index() == 0 and (start < config.train.steps
                                         or not config_file.exists()):
            atomic_write.write_text(config_file, json.dumps(config_json, indent=2))
        init.keep_tokenizer(tokenizer, workdir_path)
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
        step_flops, peak = flops.flops_and_peak(config, tokenizer, tx, schedule, plan, mesh,
                                                 shapes)
        evaluate = evaluator.evaluator(task, config, mesh, tokenizer)

        # Loop.
        prefetcher = (host.Prefetcher(data_iter, mesh, config.data.prefetch_batches)
                      if start < total else None)
        profiler = host.Profiler(workdir_path / "profile", config.train.profile_steps,
                                 start, total)
        progress = metrics.Progress(total, start, config.data.global_batch_size,
                                    step_flops, peak)
        window: list[dict[str, jax.Array]] = []
        failed_records = resumed_iter.counters.get("failed_records", 0)
        # Global examples drawn so far (every process counts the same); a checkpoint from
        # before this counter assumes the batch size has not changed.
        examples_seen = resumed_iter.counters.get(
            "examples_seen", start * config.data.global_batch_size)
        iter_state, step = None, start
        final: dict[str, float] = {}
        if start > total:
            logging.warning("already trained for %d steps, more than train.steps=%d: nothing "
                            "to train", start, total)
        elif start == total:
            logging.info("already trained for %d of %d steps", start, total)
        elif (evaluate is not None and start and config.train.eval_every
              and start % config.train.eval_every == 0
              and metrics.eval_missing(writer, start)):
            # Stopped or killed at an evaluation step, after its save: evaluate it now,
            # so the run's metrics hold every evaluation an uninterrupted run's do.
            t0 = time.perf_counter()
            row = evaluate(state.params)
            progress.add_pause(time.perf_counter() - t0)  # not part of the first step
            writer.write(start, row)
            if jax.process_index() == 0:
                logging.info("eval at step %d (missed before the restart): %s", start,
                             metrics.format_eval(row))
        while step < total:
            t0 = time.perf_counter()
            batch, iter_state, failed = prefetcher.next()
            progress.add_wait(time.perf_counter() - t0)
            failed_records += failed
            examples_seen += config.data.global_batch_size
            profiler.before(step)
            with profiler.annotate(step):
                state, step_metrics = train_step(state, batch)
            window.append(step_metrics)
            step += 1
            progress.add_pause(profiler.after(step, (state, step_metrics)))
            last = step == total
            stop = stopper.agreed() if (jax.process_count() == 1 or step % 10 == 0) else False
            save = last or stop or step % config.train.checkpoint_every == 0
            boundary = step % config.train.log_every == 0 or last or stop
            if boundary or step == start + 1:
                # A row at a multiple of log_every is the mean since the previous multiple,
                # so a run resumed from such a step logs the rows an uninterrupted run
                # does; the first step of a (re)start is shown as well, without ending
                # the window.
                row = _mean_metrics(window)
                if boundary:
                    window = []
                row["param_norm"] = float(param_norm(state.params))
                _check_finite(row["loss"], row["param_norm"], step, ckpt)
                rates = progress.rates(step)
                row.update(rates)
                row["data/failed_records"] = failed_records
                row["data/examples_seen"] = examples_seen
                row["data/epochs"] = examples_seen / max(1, len(train_source))
                writer.write(step, row)
                if jax.process_index() == 0:
                    logging.info("%s", progress.line(step, row, rates))
                if jax.process_index() == 0 and step == start + 1:
                    peak = memory_hint.peak_summary(
                        memory_hint.device_memory(jax.local_devices()[0]))
                    if peak:  # what the batch leaves to spare
                        logging.info("device memory after the first step: %s", peak)
            elif save:  # never save a state that has diverged since the last log
                losses = jax.device_get([m["loss"] for m in window])
                _check_finite(float(np.mean(losses)), float(param_norm(state.params)),
                              step, ckpt)
            if save:  # before evaluating, so a failing evaluation loses no training
                t0 = time.perf_counter()
                ckpt.save(step, state, iter_state, config_json, force=True,
                          counters={"failed_records": failed_records,
                                    "examples_seen": examples_seen,
                                    "first_batch": first_batch, **fits})
                writer.sync()  # the rows up to a checkpoint survive what it survives
                progress.add_pause(time.perf_counter() - t0)
            due = last or (config.train.eval_every and step % config.train.eval_every == 0)
            if evaluate is not None and due and not stop:  # a stopped run evaluates on rerun
                t0 = time.perf_counter()
                final = evaluate(state.params)
                writer.write(step, final)
                if jax.process_index() == 0:
                    logging.info("eval at step %d: %s", step, metrics.format_eval(final))
                progress.add_pause(time.perf_counter() - t0)
            if stop:
                _stop(ckpt, step, stopper.signum, "rerun the same command to resume")
        if not final and evaluate is not None:  # e.g. rerun of a finished workdir
            final = evaluate(state.params)
            metrics.log_evaluation_again(writer, step, final)
            if jax.process_index() == 0:
                logging.info("eval at step %d: %s", step, metrics.format_eval(final))
        ckpt.wait()
        if stopper.agreed():  # during the last evaluation or save: training is complete
            _stop(ckpt, step, stopper.signum, "training is complete; no later stage starts")
        failing = False
        return final
    finally:
        _close_all([profiler.stop if profiler is not None else None, stopper.restore,
                    prefetcher.close if prefetcher is not None else None, ckpt.close,
                    writer.close, getattr(data_iter, "close", None),
                    pipeline.release_shared_memory], failing)


def _batches_drawn(ckpt: checkpoint.Checkpointer, step: int, batch_size: int) -> int:
    """How many of this run's global batches the run saved at `step` had drawn: `step`,
    unless it ran at another global batch size (then its examples, in this size's
    batches, rounded down: a few examples may come again, none is skipped)."""
    saved = (ckpt.saved_config(step) or {}).get("data", {}).get("global_batch_size")
    if isinstance(saved, int) and saved > 0 and saved != batch_size:
        return step * saved // batch_size
    return step


def _close_all(closers: list, failing: bool) -> None:
    """Runs every closer, even after one fails (each releases something of its own).

    The first closer's error is raised when the run itself succeeded; when it is
    already failing, their errors (often the same cause again: a full disk fails the
    final flush too) are only logged at debug level, not raised over the run's error.
    """
    first = None
    for close in closers:
        if close is None:
            continue
        try:
            close()
        except Exception as error:  # noqa: BLE001 - the others must still run
            logging.debug("closing after the run: %s", error, exc_info=True)
            first = first or error
    if first is not None and not failing:
        raise first

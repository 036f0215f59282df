r"""Training entry point.

  python -m cacophony_jax.main --config=configs/mae.py:tiny --workdir=runs/mae
  python -m cacophony_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Override any config field with --config.a.b=value. Multi-process runs (Cloud TPU
pods, SLURM, or --coordinator_address/--num_processes/--process_id) start the
distributed runtime here; every process runs this same command.
"""

import os
import sys
import traceback

# Grain worker processes inherit this; BLAS threads per worker would oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from cacophony_jax import config_errors, xla_defaults  # noqa: E402

xla_defaults.apply()  # before JAX starts a backend

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Start jax.distributed (auto: detect TPU pod / SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout", 300, "Seconds the processes of a multi-process run wait for each other "
    "to start (raise it where hosts start minutes apart, e.g. a large pod installing).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat after which a multi-process run "
    "takes a process for dead and stops every process (JAX's default: 100).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Simulated CPU devices (testing).",
                                    lower_bound=0)
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", "", "gloo|mpi for CPU multi-process.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "",
    "Local folder (for a bucket, its mounted path) for JAX's persistent compilation "
    "cache: a restarted or resumed run loads the programs it compiled before instead of "
    "compiling them again. The same as setting JAX_COMPILATION_CACHE_DIR. Not used by "
    "multi-process CPU runs (their processes would load and compile at different "
    "speeds). Only share it with people you trust: a cache entry is code that runs.")
_VERBOSE_LIBS = flags.DEFINE_bool("verbose_libraries", False,
                                  "Show INFO logs of Orbax/JAX/Grain too.")
flags.mark_flags_as_required(["config", "workdir"])


# Libraries that log every checkpoint write at INFO (and asyncio, each event loop
# Orbax starts, at DEBUG); their warnings still show.
_CHATTY = ("orbax", "jax/_src", "grain", "tensorboardX", "absl/", "tensorflow_datasets",
           "asyncio/")


def _quiet_libraries() -> None:
    import logging as std_logging

    class _Filter(std_logging.Filter):
        def filter(self, record: std_logging.LogRecord) -> bool:
            return record.levelno >= std_logging.WARNING or not any(
                part in record.pathname for part in _CHATTY)

    for handler in std_logging.getLogger().handlers + [logging.get_absl_handler()]:
        handler.addFilter(_Filter())

    from cacophony_jax import quiet

    quiet.quiet_abandoned_reads()
    quiet.quiet_abandoned_saves()


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config mistakes reported in one line, not a traceback."""
    files = config_errors.config_files(argv)
    if len(files) > 1:  # absl would take the last one, or fail on repeated overrides
        _usage_error(f"--config is given {len(files)} times ({', '.join(files)}); give one "
                     "config file per run (stage 2 starts from stage 1 with "
                     "--config.train.init_from=STAGE1_WORKDIR; a config with `stages`, as "
                     "configs/quickstart.py, runs both in one command)")
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.get("task")  # a config file that failed to load raises here
    except Exception as e:  # noqa: BLE001 - any mistake in the flags or the config file
        problem = config_errors.one_line(e)
        if "--config must have a value" in problem:
            stray = next((a for a in argv[1:] if not a.startswith("-") and ".py" in a), None)
            if stray:
                problem += f" (write --config={stray})"
        _usage_error(problem)
    if len(rest) > 1:  # absl leaves words that are not flags
        stray = rest[1]
        before = argv[argv.index(stray) - 1] if stray in argv[1:] else ""
        hint = ""
        if before.startswith("--config.") and "=" not in before:
            hint = f": a config field's value goes after '=' ({before}={stray})"
        elif ".py" in stray:
            hint = f": a config file is given as --config={stray}"
        _usage_error(f"unexpected argument {stray!r}{hint}")
    return rest


def _usage_error(problem: str) -> None:
    sys.stderr.write(f"error: {problem} (--helpshort lists the flags, configs/common.py "
                     "the config fields)\n")
    sys.exit(2)


# "[process i] " in front of this process's lines in a multi-process run, else "".
_TAG = ""


def _tag_lines(index: int) -> None:
    """Starts this process's log and error lines with its index (every process of a
    multi-process run logs, often into one file)."""
    import logging as std_logging

    global _TAG
    _TAG = f"[process {index}] "

    class _Tag(std_logging.Filter):
        def filter(self, record: std_logging.LogRecord) -> bool:
            if not getattr(record, "process_tagged", False):
                record.msg, record.process_tagged = f"{_TAG}{record.msg}", True
            return True

    logging.get_absl_handler().addFilter(_Tag())


def _fail(message: str) -> None:
    """Ends the run on an error the user can fix: one line, exit status 2 (as for a
    flag or config-key mistake)."""
    sys.stderr.write(f"{_TAG}error: {message}\n")
    raise SystemExit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    if "://" in (_COMPILATION_CACHE.value or ""):
        _fail(f"--compilation_cache={_COMPILATION_CACHE.value!r} is not a file-system path: "
              "mount the storage (e.g. gcsfuse) and pass the mount's path")
    if not _VERBOSE_LIBS.value:  # before the backends start (they log at INFO)
        _quiet_libraries()
    from cacophony_jax.parallel import distributed
    try:
        distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value, _CPU_COLLECTIVES.value,
                               init_timeout=_INIT_TIMEOUT.value,
                               heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
    except ValueError as e:
        _fail(str(e))
    if jax.process_count() > 1:
        _tag_lines(jax.process_index())
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # JAX keys CPU programs per process and only process 0 writes entries: with a
        # warm cache process 0 loads the step while the others compile it, and the
        # first collective times out. (JAX_COMPILATION_CACHE_DIR is turned off too.)
        if _COMPILATION_CACHE.value:
            logging.warning("--compilation_cache is not used by multi-process CPU runs")
        jax.config.update("jax_enable_compilation_cache", False)
    elif _COMPILATION_CACHE.value:  # before anything compiles
        jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
    try:
        _train()
    except SystemExit as e:
        if jax.process_count() > 1 and e.code not in (0, None) and not _STOPPED:
            _exit_now(e.code)  # not JAX's shutdown barrier: the others wait in a collective
        raise
    except BaseException as e:  # noqa: BLE001 - a crash: its traceback, then the same exit
        if jax.process_count() > 1:
            traceback.print_exc()
            hint = _peer_hint(e)
            if hint:
                print(f"error: {hint}", file=sys.stderr)
            _exit_now(1)
        raise


# How a collective of the CPU backends (gloo) fails when another process is gone.
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe")


def _peer_hint(error: BaseException) -> str | None:
    """For a collective that failed because another process of the run is gone: what
    happened and what to do (its traceback names only the socket)."""
    if not any(text in str(error).lower() for text in _PEER_GONE):
        return None
    return ("a collective with the other processes failed because one of them is gone "
            "(killed, out of memory, or its machine went down; its own log may say which): "
            "rerun every process to resume from the newest checkpoint")


# Set when every process stopped together on a signal (after saving): their exits meet
# at JAX's shutdown barrier, unlike a failed process's.
_STOPPED = False


def _exit_now(code: int) -> None:
    """Ends a failed process of a multi-process run at once. JAX's shutdown would wait
    minutes at a barrier the other processes never reach (they wait in a collective);
    once this process is gone they notice it within --heartbeat_timeout and stop."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.flush()
    os._exit(code)


def _train() -> None:
    global _STOPPED
    from cacophony_jax.train import host, stages
    try:
        stages.run(_CONFIG.value, _WORKDIR.value)
    except host.StopRequestedError as e:  # saved; no later stage ran: exit as the signal would
        _STOPPED = True
        raise SystemExit(128 + e.signum) from None
    except (ValueError, OSError, FloatingPointError) as e:
        # Errors a user can cause (bad values, unreadable data, a workdir that cannot be
        # written, or whose disk is full: train.disk) carry a message that names the
        # thing; the traceback is only noise then (rerun with --verbosity=1 to see it).
        logging.debug("traceback", exc_info=True)
        _fail(str(e))
    except RuntimeError as e:
        from cacophony_jax.train import memory_hint
        if not memory_hint.is_out_of_memory(e):
            raise
        import jax
        logging.debug("traceback", exc_info=True)
        name, stage = stages.running_stage() or (None, _CONFIG.value)
        # Read while the traceback still holds the failed step's arguments.
        stats = memory_hint.device_memory(memory_hint.failed_device(e, jax.local_devices()))
        _fail(memory_hint.message(e, stage, jax.device_count(), jax.default_backend(), name,
                                  stats))
    except KeyboardInterrupt as e:
        if isinstance(e, host.SecondInterruptError):
            print("interrupted without the checkpoint the first Ctrl-C asked for (one "
                  "Ctrl-C saves a checkpoint first; a save already under way may have "
                  "finished); rerun the same command to resume from the newest checkpoint",
                  file=sys.stderr)
        else:  # before training took the signals over (or after it gave them back)
            print("interrupted outside training, where a Ctrl-C has nothing to save; rerun "
                  "the same command to start again (a workdir with checkpoints resumes "
                  "from its newest)", file=sys.stderr)
        raise SystemExit(130) from None  # as a process ended by SIGINT


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=_parse_flags)

r"""Training entry point.

  python -m cacophony_jax.main --config=configs/mae.py:tiny --workdir=runs/mae
  python -m cacophony_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Override any config field with --config.a.b=value. Multi-process runs (Cloud TPU
pods, SLURM, or --coordinator_address/--num_processes/--process_id) start the
distributed runtime here; every process runs this same command.
"""

import os
import pathlib
import re
import sys
import traceback

# Grain worker processes inherit this; BLAS threads per worker would oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from cacophony_jax import xla_defaults  # noqa: E402

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
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Simulated CPU devices (testing).")
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


def _config_arg(field: str) -> str:
    """The --config.a.b=value argument that names `field`, else "--config"."""
    return next((a for a in sys.argv[1:] if a.startswith("--config.") and
                 re.search(rf"\.{re.escape(field)}(\.|$)", a.split("=", 1)[0])), "--config")


def _config_files(argv: list[str]) -> list[str]:
    """Every config file argument given (--config=F or --config F), in order."""
    args, files = argv[1:], []
    for i, a in enumerate(args):
        if a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        elif a == "--config" and i + 1 < len(args):
            files.append(args[i + 1])
    return files


def _config_file_arg() -> tuple[str, str]:
    """The --config argument as given (--config=F or --config F; `_parse_flags` refuses
    two) and its file path (without the ':arg' part); ("", "") when there is none."""
    files = _config_files(sys.argv)
    given = files[-1] if files else ""
    return given, given.partition(":")[0]


def _config_file_problem(error: BaseException) -> str | None:
    """One line for a --config value that is not a loadable config file, else None."""
    given, path = _config_file_arg()
    if not path:
        return None
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if _defines_get_config(os.path.join(path, n)))
        listing = f" (it holds {', '.join(found)})" if found else ""
        arg = given.partition(":")[2]
        example = os.path.join(path, found[0] if found else "mae.py") + (f":{arg}" if arg else "")
        return (f"--config={given}: {path!r} is a folder; name a config file in it, "
                f"e.g. --config={example}{listing}")
    if not os.path.exists(path):
        return (f"--config={given}: there is no file {path!r} (relative paths are read "
                f"from {os.getcwd()}); the recipe's configs are configs/mae.py, "
                "configs/cacophony.py and configs/quickstart.py")
    if "has no attribute 'get_config'" in str(error):
        return (f"--config={given}: {path!r} defines no get_config(); a config file "
                "defines get_config(arg=None) returning an ml_collections.ConfigDict, as "
                "configs/mae.py does")
    if isinstance(error, SyntaxError):
        line = f", line {error.lineno}" if error.lineno else ""
        if error.filename and os.path.abspath(error.filename) != os.path.abspath(path):
            return (f"--config={given}: {error.filename!r}, which the config file imports, "
                    f"has a syntax error ({error.msg}{line})")
        return (f"--config={given}: {path!r} is not a Python config file ({error.msg}"
                f"{line}); the configs/ folder has examples")
    text = str(error)
    if "Error whilst parsing config file" in text:  # get_config raised: absl's flag error
        files = [(f, n) for f, n in re.findall(r'File "([^"]+)", line (\d+)', text)
                 if not any(part in f for part in _NOT_CONFIG_CODE)]
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        where = f" at {files[-1][0]}:{files[-1][1]}" if files else ""
        return f"--config={given}: building the config failed{where}: {last}"
    # Raised by the config file's own code (or a module it imports).
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not any(part in f.filename for part in _NOT_CONFIG_CODE)]
    if frames and not isinstance(error, flags.Error):
        where = f"{frames[-1].filename}:{frames[-1].lineno}"
        return (f"--config={given}: building the config failed at {where}: "
                f"{type(error).__name__}: {error}")
    return None


# Frames of a traceback that are not the config's code.
_NOT_CONFIG_CODE = ("/ml_collections/", "/absl/", "<frozen", "/importlib/", __file__)


def _defines_get_config(path: str) -> bool:
    """Whether `path` is a readable .py file that defines get_config (a config file)."""
    if not path.endswith(".py") or not os.path.isfile(path):
        return False
    try:
        return "def get_config" in pathlib.Path(path).read_text(errors="replace")
    except OSError:
        return False


def _field_type_problem(text: str) -> str | None:
    """One line for `--config.a.b=value` whose value the field's type does not take."""
    bad = re.match(r"flag (--config\.([\w.]+))=(.*?): (.*)$", text.strip().splitlines()[0])
    if not bad:
        return None
    arg, field, value, _ = bad.groups()
    # The value as given (the message's own ': ' after it cannot be told from one in it).
    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a.startswith(f"{arg}="):
            value = a.split("=", 1)[1]
        elif a == arg and i + 1 < len(args):
            value = args[i + 1]
    config = _plain_config()
    current = config
    try:
        for part in field.split("."):
            current = current[part]
    except (KeyError, TypeError):
        return None
    if config is None or isinstance(current, dict) or hasattr(current, "keys"):
        return None
    kind = {bool: "true or false", int: "a whole number", float: "a number",
            str: "a string"}.get(type(current), type(current).__name__)
    return f"{arg}={value}: {field} takes {kind} (its value is {current!r})"


def _one_line(error: BaseException) -> str:
    """A flag or config error as one line: the misspelt field, or the cause's last line."""
    problem = _config_file_problem(error) or _field_type_problem(str(error))
    if problem:
        return problem
    text = str(error)
    guess = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if guess:
        right, wrong = guess.groups()
        return f"{_config_arg(wrong)}: the config has no field {wrong!r}; did you mean {right!r}?"
    if isinstance(error, (AttributeError, KeyError)):
        field = text.strip("\"'")
        arg = _config_arg(field)
        if arg != "--config":
            hint = ""
            config = _plain_config()
            if config is not None and "stages" in config:
                if field in _STAGE_BLOCKS and arg.startswith(f"--config.{field}."):
                    # A one-stage field given to a multi-stage recipe.
                    hint = (f"; in a multi-stage recipe a stage's settings are "
                            f"--config.stages.<stage>.{arg.removeprefix('--config.')}")
                elif arg.startswith(f"--config.stages.{field}."):
                    hint = f"; its stages are {', '.join(config.stage_order)}"
            elif config is not None and arg.startswith(f"--config.{field}."):
                hint = f"; its top-level fields are {', '.join(sorted(config.keys()))}"
            return f"{arg}: the config has no field {field!r}{hint}"
        # No override names it: an error inside the config file itself.
        frames = traceback.extract_tb(error.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        return f"{type(error).__name__} {text} while building the config{where}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _plain_config():
    """The --config file's config without overrides, or None where it cannot be built."""
    import importlib.util

    given, path = _config_file_arg()
    arg = given.partition(":")[2]
    try:
        spec = importlib.util.spec_from_file_location("_given_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - then the message goes without a hint
        return None


# The blocks of one stage's config (configs/common.py).
_STAGE_BLOCKS = ("model", "audio", "data", "tokenizer", "mesh", "optim", "train", "loss",
                 "mae", "eval")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config mistakes reported in one line, not a traceback."""
    files = _config_files(argv)
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
        problem = _one_line(e)
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
    sys.stderr.write(f"error: {problem}\n(--helpshort lists the flags, configs/common.py "
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
        config = _CONFIG.value
        _fail(memory_hint.message(e, config.data.global_batch_size, jax.device_count(),
                                  jax.default_backend(), config.model.get("attention", ""),
                                  config.model.get("remat", "none")))
    except KeyboardInterrupt:
        print("interrupted without saving (one Ctrl-C saves a checkpoint first); rerun the "
              "same command to resume from the newest checkpoint", file=sys.stderr)
        raise SystemExit(130) from None  # as a process ended by SIGINT


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=_parse_flags)

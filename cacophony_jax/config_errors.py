"""Flag and config mistakes of `python -m cacophony_jax.main`, each as one line.

absl and ml_collections report a misspelt field, a value of the wrong type, a
--config path that is a folder or no config file, or an error raised while the
config is built, as tracebacks or long messages. `one_line` turns each into one line
that names the argument and the fix; `main` prints it as its `error:` line.
The functions read the command line from `sys.argv`.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import traceback

from absl import flags


def _config_arg(field: str) -> str:
    """The --config.a.b=value argument that names `field`, else "--config"."""
    return next((a for a in sys.argv[1:] if a.startswith("--config.") and
                 re.search(rf"\.{re.escape(field)}(\.|$)", a.split("=", 1)[0])), "--config")


def config_files(argv: list[str]) -> list[str]:
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
    files = config_files(sys.argv)
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
_NOT_CONFIG_CODE = ("/ml_collections/", "/absl/", "<frozen", "/importlib/", __file__,
                    os.path.join("cacophony_jax", "main.py"))


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


def one_line(error: BaseException) -> str:
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

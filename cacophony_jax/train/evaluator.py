"""The run's evaluation: the task's evaluation of the eval set and of each extra one.

With extra evaluation sets (config.data.extra_evals), each set's metrics are named
after it (eval_<kind>/... instead of eval/...) and the warnings logged while it is
evaluated start with its name, so they say which set they are about.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import ml_collections

from cacophony_jax.tasks import common as task_common


@contextlib.contextmanager
def _log_prefix(prefix: str):
    """Starts the log lines written meanwhile with `prefix` (which set an evaluation's
    warnings are about)."""
    if not prefix:
        yield
        return

    class _Prefix(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not getattr(record, "set_prefixed", False):
                record.msg, record.set_prefixed = f"{prefix}{record.msg}", True
            return True

    from absl import logging as absl_logging

    handlers = {*logging.getLogger().handlers, absl_logging.get_absl_handler()}
    added = _Prefix()
    for handler in handlers:
        handler.addFilter(added)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(added)


def evaluator(task: Any, config: ml_collections.ConfigDict, mesh: Any, tokenizer: Any
              ) -> Callable[[Any], dict[str, float]] | None:
    """The task's evaluation of config.data.eval, and of each config.data.extra_evals
    set after it (its metrics named eval_<kind>/... instead of eval/...).

    Args:
      task: the run's task (its `evaluator` makes each set's evaluation).
      config: the run's config.
      mesh: the device mesh.
      tokenizer: the run's tokenizer, or None (stage 1).

    Returns:
      A function from parameters to metrics, or None when nothing is evaluated.
    """
    parts = [("eval", task.evaluator(mesh, tokenizer))]
    for name, sub in task_common.extra_eval_blocks(config):
        parts.append((name, task.evaluator(mesh, tokenizer, sub)))  # shares compilations
    parts = [(name, fn) for name, fn in parts if fn is not None]
    if not parts:
        return None
    if [name for name, _ in parts] == ["eval"]:
        return parts[0][1]

    def evaluate(params: Any) -> dict[str, float]:
        out = {}
        for name, fn in parts:
            with _log_prefix(f"{name}: " if name != "eval" else ""):
                values = fn(params)
            out.update({f"{name}/{key.removeprefix('eval/')}": value
                        for key, value in values.items()})
        return out

    return evaluate

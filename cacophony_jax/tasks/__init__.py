"""Training objectives: each task builds its model, features, loss and evaluation."""

from __future__ import annotations

from typing import Any

import ml_collections

TASKS = ("mae", "cacophony")


def build(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Any:
    """Returns the task object named by `config.task`."""
    if config.task == "mae":
        from cacophony_jax.tasks.mae import MAETask
        return MAETask(config)
    if config.task == "cacophony":
        from cacophony_jax.tasks.cacophony import CacophonyTask
        return CacophonyTask(config, vocab_size=tokenizer.vocab_size if tokenizer else None)
    raise ValueError(f"config.task={config.task!r}; expected one of {TASKS}")

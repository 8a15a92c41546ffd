"""Which stages each command runs: the one table the CLI, the pipeline, the jobs and the DAG read.

No imports beyond the standard library: the Airflow DAG loads this file on
the scheduler, where neither sparkrec's dependencies nor Spark are installed.
"""

from __future__ import annotations

# The data's path, in order. `sparkrec run` walks all of it; `tune` and
# `evaluate` are skipped there when their config says so (`OPTIONAL`).
# Evaluation (and its gate) comes before training, so a model that loses
# leaves the published factors and recommendations untouched.
PIPELINE = ("ingest", "clean", "ids", "tune", "evaluate", "train", "recommend")

# The stages that publish, without the optional ones: what `run` does with tune and evaluate off.
CORE = ("ingest", "clean", "ids", "train", "recommend")

# A stage that `run` skips unless this config section's `enabled` is true.
OPTIONAL = {"tune": "tune", "evaluate": "evaluate"}

# Command -> the stages it runs. Commands that fit or list need up-to-date ids first.
COMMANDS: dict[str, tuple[str, ...]] = {
    "ingest": ("ingest",),
    "clean": ("clean",),
    "ids": ("ids",),
    "tune": ("ids", "tune"),
    "evaluate": ("ids", "evaluate"),
    "train": ("ids", "train"),
    "recommend": ("recommend",),
    "run": PIPELINE,
}

# One command per scheduled task (the Airflow DAG and `jobs/`), chained in this order.
# Together they run PIPELINE without `tune`: tuning is a search a person starts.
SCHEDULED = ("ingest", "clean", "evaluate", "train", "recommend")


def stages_of(command: str, enabled: dict[str, bool] | None = None) -> tuple[str, ...]:
    """The stages `command` runs; for `run`, the optional ones only when `enabled[section]` is true."""
    stages = COMMANDS[command]
    if command != "run":
        return stages
    enabled = enabled or {}
    return tuple(s for s in stages if s not in OPTIONAL or enabled.get(OPTIONAL[s], False))

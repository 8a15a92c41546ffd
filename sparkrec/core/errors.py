"""Project exceptions.

Each carries enough context (which key, which table, which column, what was
expected) that the CLI can print it as one line and exit non-zero, without a
traceback a data engineer has to decode.
"""

from __future__ import annotations


class SparkrecError(Exception):
    """Base class: an expected failure with a message meant for a person."""

    exit_code = 2


class ConfigError(SparkrecError):
    """The configuration is invalid; raised before any Spark work starts."""


class InputError(SparkrecError):
    """An input or table does not have the shape a stage needs."""


class MissingColumnError(InputError):
    """A table lacks columns a stage needs."""

    def __init__(self, table: str, missing: list[str], available: list[str]) -> None:
        self.table = table
        self.missing = missing
        self.available = available
        super().__init__(
            f"table '{table}' is missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"it has: {', '.join(repr(c) for c in available) or '(no columns)'}"
        )


class StageError(SparkrecError):
    """A stage cannot run, e.g. an upstream table has not been written yet."""


class GateError(SparkrecError):
    """The new model does not beat the best baseline by the configured margin: nothing is published."""

    exit_code = 3


class BaselinePublished(SparkrecError):
    """The model lost the gate and the best baseline's lists were published instead (see `evaluate.gate.on_fail`)."""

    exit_code = 4

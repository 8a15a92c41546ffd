"""What every config section shares: strict models (an unknown key is an error) and UTC times."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict


def as_utc(dt: datetime) -> datetime:
    """A time without a zone means UTC (the README's rule for config and interval times).

    PySpark would otherwise read a naive datetime in the machine's zone, so every
    place that turns a config time into a Spark literal goes through this.
    """
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt

class Strict(BaseModel):
    """Unknown keys are errors: a misspelt key must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

"""The input sections: `source` (the raw events and their columns), `items` (the catalogue file)
and `interval` (which rows a run reads)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from sparkrec.core import columns as C
from sparkrec.core.config.base import Strict, as_utc

_DATETIME_LETTERS = {
    "G": 5, "y": 6, "D": 3, "M": 5, "L": 5, "d": 2, "E": 4, "F": 1, "a": 1, "h": 2, "K": 2,
    "k": 2, "H": 2, "m": 2, "s": 2, "S": 9, "V": 2, "z": 4, "O": 4, "X": 5, "x": 5, "Z": 5,
}


def check_datetime_pattern(pattern: str) -> str:
    """Reject a pattern Spark would refuse at parse time, naming the offending letter.

    A static check of the letters and their repeats (quoted text is skipped); the
    clean stage also asks Spark itself before reading a row.
    """
    if not pattern.strip():
        raise ValueError("empty datetime pattern")
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "'":
            end = pattern.find("'", i + 1)
            if end < 0:
                raise ValueError(f"datetime pattern {pattern!r} has an unclosed quote")
            i = end + 1
            continue
        if ch.isalpha():
            j = i
            while j < n and pattern[j] == ch:
                j += 1
            count = j - i
            if ch not in _DATETIME_LETTERS:
                raise ValueError(
                    f"datetime pattern {pattern!r}: {ch!r} is not a pattern letter Spark can parse with "
                    "(quote literal text: 'T'; see Spark's 'Datetime Patterns')"
                )
            if count > _DATETIME_LETTERS[ch]:
                raise ValueError(f"datetime pattern {pattern!r}: too many {ch!r} letters ({count}, at most {_DATETIME_LETTERS[ch]})")
            i = j
            continue
        i += 1
    return pattern

class SourceColumns(Strict):
    """The input's column names for each canonical field (`source.columns`)."""

    @field_validator("*")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and ("`" in v or not v.strip()):
            raise ValueError(f"column name {v!r} must be non-empty and contain no backtick")
        return v

    user_id: str
    item_id: str
    timestamp: str
    event_type: str | None = None
    event_id: str | None = None
    quantity: str | None = None
    price: str | None = None
    rating: str | None = None
    invoice: str | None = None
    item_name: str | None = Field(
        default=None, description="A column naming the item (e.g. Description on transaction lines): used in explanations."
    )


class InputConfig(Strict):
    """The `source:` section: the interaction log to ingest and how to read it."""

    path: str
    format: Literal["parquet", "csv", "json"]
    kind: Literal["events", "transactions"] = "events"
    options: dict[str, str] = Field(default_factory=dict)
    columns: SourceColumns
    infer_schema: bool = Field(
        default=False,
        description=(
            "JSON only. false reads just the mapped columns, as strings, in one pass; "
            "true infers every field first (a second full pass) and keeps unmapped fields in events_raw."
        ),
    )
    timestamp_format: str | None = Field(
        default=None, description="Spark datetime pattern; null means ISO-8601."
    )
    timezone: str = "UTC"
    event_types: dict[str, list[str]] = Field(
        default_factory=lambda: {
            C.VIEW: ["view"],
            C.CART: ["cart"],
            C.PURCHASE: ["purchase"],
            C.RATING_EVENT: ["rating"],
        }
    )
    cancellation_prefix: str = "C"

    @field_validator("timestamp_format")
    @classmethod
    def _spark_pattern(cls, v: str | None) -> str | None:
        return None if v is None else check_datetime_pattern(v)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v!r} (expected an IANA name such as 'Europe/London')") from exc
        return v

    @field_validator("event_types")
    @classmethod
    def _canonical_types(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(v) - set(C.EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; allowed: {list(C.EVENT_TYPES)}")
        seen: dict[str, str] = {}
        for canonical, synonyms in v.items():
            for s in synonyms:
                key = s.strip().lower()
                if key in seen and seen[key] != canonical:
                    raise ValueError(f"synonym {s!r} maps to both {seen[key]!r} and {canonical!r}")
                seen[key] = canonical
        return v

    @model_validator(mode="after")
    def _kind_columns(self) -> InputConfig:
        if self.kind == "events" and not self.columns.event_type:
            raise ValueError("columns.event_type is required when kind is 'events'")
        if self.kind == "transactions" and not self.columns.invoice:
            raise ValueError("columns.invoice is required when kind is 'transactions'")
        return self


class ItemColumns(Strict):
    item_id: str
    name: str | None = Field(default=None, description="The item's name for people, used in explanations.")
    category: str | None = None
    price: str | None = None
    available: str | None = None
    description: str | None = None


class ItemsConfig(Strict):
    path: str | None = Field(default=None, description="Optional item table; null derives items from events.")
    format: Literal["parquet", "csv", "json"] = "csv"
    options: dict[str, str] = Field(default_factory=dict)
    columns: ItemColumns = ItemColumns(item_id="item_id")

class IntervalConfig(Strict):
    """The data interval a scheduled run is for (Airflow's data_interval_start / _end).

    When set, ingest takes the source rows whose event time falls in
    [start, end) (rows whose time cannot be read are always taken, so clean
    can quarantine them), and "now" for every stage is `end`, so re-running an
    interval decides exactly as the first run did, whatever the wall clock.
    """

    start: datetime | None = None
    end: datetime | None = None

    @field_validator("start", "end")
    @classmethod
    def _naive_is_utc(cls, v: datetime | None) -> datetime | None:
        return None if v is None else as_utc(v)

    @model_validator(mode="after")
    def _ordered(self) -> IntervalConfig:
        if (self.start is None) != (self.end is None):
            raise ValueError("interval.start and interval.end go together: set both or neither")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise ValueError(f"interval.start ({self.start.isoformat()}) must be before interval.end ({self.end.isoformat()})")
        return self

    @property
    def enabled(self) -> bool:
        return self.start is not None

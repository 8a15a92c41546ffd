"""The `clean` section (rules, duplicates, bots) and `privacy` (pseudonyms, dropped raw columns)."""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import Field, field_validator, model_validator

from sparkrec.core.config.base import Strict

# Python regex syntax that Java's java.util.regex rejects or reads differently.
_PYTHON_ONLY_REGEX = (
    ("(?P<", "write a named group as (?<name>...)"),
    ("(?P=", "write a back-reference to a named group as \\k<name>"),
    ("(?(", "conditional groups have no Java equivalent"),
    ("(?#", "Java has no inline comments; remove the comment"),
)

# Spark's datetime pattern letters for parsing (Spark 3+ rejects the week-based letters Y w W u e c
# and the quarter letters Q q when parsing), with the most repeats Spark accepts.

class BotsConfig(Strict):
    max_events_per_user: int | None = Field(default=None, ge=1)
    max_events_per_user_day: int | None = Field(default=None, ge=1)


class CleanConfig(Strict):
    min_event_time: datetime = datetime(2000, 1, 1)
    max_future_hours: float = Field(default=24.0, ge=0, le=24 * 366 * 100, description="At most 100 years.")
    non_product_items: list[str] = Field(
        default_factory=list, description="Regular expressions (full match) of item ids that are not products."
    )
    max_id_length: int = Field(default=256, ge=1, le=65536, description="Longer user or item ids are invalid_user_id / invalid_item_id.")
    reject_non_positive_quantity: bool = True
    reject_non_positive_price: bool = False
    min_kept_ratio: float | None = Field(
        default=0.5, ge=0, le=1,
        description="Refuse to publish when this run keeps a share of its rows below this fraction of the previous "
        "clean's kept share (a bad rule or config, not bad data); null turns the check off. A run that would keep "
        "nothing is always refused.",
    )
    rating_min: float = 1.0
    rating_max: float = 5.0
    bots: BotsConfig = BotsConfig()
    full: bool = Field(
        default=False,
        description="Reclassify all of events_raw every run (`clean --full`). Off: each run classifies only the rows "
        "no clean has seen, with tables equal to a full recompute; a change of the rules (source or clean settings) "
        "makes the next run full by itself.",
    )

    @field_validator("non_product_items")
    @classmethod
    def _valid_patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {p!r}: {exc}") from exc
            # Spark matches with Java's regex engine: Python-only syntax would fail
            # there, minutes later, as a PatternSyntaxException.
            for construct, java in _PYTHON_ONLY_REGEX:
                if construct in p:
                    raise ValueError(f"regular expression {p!r} uses {construct!r}, which Java's regex engine "
                                     f"(Spark's rlike) does not accept; {java}")
        return v

    @model_validator(mode="after")
    def _rating_range(self) -> CleanConfig:
        if self.rating_min > self.rating_max:
            raise ValueError(f"rating_min ({self.rating_min}) is above rating_max ({self.rating_max})")
        return self

class PrivacyConfig(Strict):
    """Customer keys as personal data (README "Privacy")."""

    pseudonymize_user_ids: bool = Field(
        default=False,
        description="Replace each user key by a keyed hash (HMAC-SHA256) at ingest, before anything is written. "
        "Recommended; must be on from a warehouse's first ingest.",
    )
    secret_env: str = Field(default="SPARKREC_PSEUDONYM_SECRET", description="Environment variable holding the secret.")
    secret_file: str | None = Field(default=None, description="A file holding the secret (used when set, instead of the variable).")
    drop_raw_columns: list[str] = Field(
        default_factory=list, description="Input columns never stored (free text, addresses, emails): dropped at ingest."
    )

    @field_validator("secret_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(f"{v!r} is not an environment variable name (the secret itself never goes in the config)")
        return v

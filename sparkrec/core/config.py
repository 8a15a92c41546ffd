"""Typed, layered configuration, validated before any Spark work starts.

A config file is YAML. It may name the files it builds on with `extends:`
(a path or a list, relative to the file), so an environment file holds only
what differs from `base.yaml`. `--set dotted.key=value` overrides come last;
their values are parsed as YAML scalars (`--set train.als.rank=64`).

Every mistake is reported as a `ConfigError` that names the dotted key, so a
typo in `train.als.rnak` fails in a second with that name, not after ten
minutes of Spark work.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparkrec.core import columns as C
from sparkrec.core.errors import ConfigError

TABLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_REMOTE_SCHEMES = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def as_utc(dt: datetime) -> datetime:
    """A time without a zone means UTC (the README's rule for config and interval times).

    PySpark would otherwise read a naive datetime in the machine's zone, so every
    place that turns a config time into a Spark literal goes through this.
    """
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


# Python regex syntax that Java's java.util.regex rejects or reads differently.
_PYTHON_ONLY_REGEX = (
    ("(?P<", "write a named group as (?<name>...)"),
    ("(?P=", "write a back-reference to a named group as \\k<name>"),
    ("(?(", "conditional groups have no Java equivalent"),
    ("(?#", "Java has no inline comments; remove the comment"),
)

# Spark's datetime pattern letters for parsing (Spark 3+ rejects the week-based letters Y w W u e c
# and the quarter letters Q q when parsing), with the most repeats Spark accepts.
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


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt key must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkConfig(_Strict):
    master: str | None = Field(
        default="local[2]",
        description="Spark master; null under spark-submit, where the submitter sets it.",
    )
    app_name: str = "sparkrec"
    shuffle_partitions: int = Field(default=8, ge=1)
    driver_memory: str | None = None
    delta_packages: bool = Field(
        default=True,
        description="Resolve Delta's jars from Maven Central at session start (local mode). "
        "Set false when the submitter passes --packages or jars are configured.",
    )
    jars: list[str] = Field(default_factory=list, description="Pre-downloaded jars (offline use).")
    packages: list[str] = Field(
        default_factory=list,
        description="More Maven coordinates resolved with Delta's in local mode (the stream adds Spark's Kafka "
        "connector); under spark-submit pass them with --packages.",
    )
    conf: dict[str, str] = Field(default_factory=dict, description="Extra Spark settings.")
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = "WARN"


class SourceColumns(_Strict):
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


class InputConfig(_Strict):
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


class ItemColumns(_Strict):
    item_id: str
    name: str | None = Field(default=None, description="The item's name for people, used in explanations.")
    category: str | None = None
    price: str | None = None
    available: str | None = None
    description: str | None = None


class ItemsConfig(_Strict):
    path: str | None = Field(default=None, description="Optional item table; null derives items from events.")
    format: Literal["parquet", "csv", "json"] = "csv"
    options: dict[str, str] = Field(default_factory=dict)
    columns: ItemColumns = ItemColumns(item_id="item_id")


class BotsConfig(_Strict):
    max_events_per_user: int | None = Field(default=None, ge=1)
    max_events_per_user_day: int | None = Field(default=None, ge=1)


class CleanConfig(_Strict):
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


class AlsConfig(_Strict):
    rank: int = Field(default=32, ge=1)
    max_iter: int = Field(default=15, ge=1)
    reg_param: float = Field(default=0.1, ge=0)
    alpha: float = Field(default=1.0, ge=0)
    seed: int = 42
    checkpoint_interval: int = Field(default=5, ge=1)
    nonnegative: bool = False
    num_blocks: int | None = Field(default=None, ge=1)


class TrainConfig(_Strict):
    event_weights: dict[str, float] = Field(
        default_factory=lambda: {C.VIEW: 1.0, C.CART: 3.0, C.PURCHASE: 5.0, C.RATING_EVENT: 1.0},
        description="Weight per event type; a rating event contributes weight x rating.",
    )
    recency_half_life_days: float | None = Field(default=None, gt=0)
    als: AlsConfig = AlsConfig()

    @field_validator("event_weights")
    @classmethod
    def _known_types(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(C.EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; allowed: {list(C.EVENT_TYPES)}")
        if any(w < 0 for w in v.values()):
            raise ValueError("weights must be >= 0")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one event type needs a positive weight")
        return v


class BoostConfig(_Strict):
    """Raise some items' scores: the score of a boosted item is multiplied by `factor`."""

    factor: float = Field(default=1.0, gt=0)
    items: list[str] = Field(default_factory=list, description="Promoted item ids.")
    categories: list[str] = Field(default_factory=list, description="Promoted categories.")
    new_item_days: float | None = Field(
        default=None, gt=0, description="Items first seen in the last D days of history count as new and are boosted."
    )


class RulesConfig(_Strict):
    """Shop rules applied to every list, model and fallback alike."""

    exclude_unavailable: bool = True
    exclude_items: list[str] = Field(default_factory=list)
    include_categories: list[str] = Field(default_factory=list, description="Empty means every category.")
    exclude_categories: list[str] = Field(default_factory=list)
    max_per_category: int | None = Field(default=None, ge=1, description="Diversity: at most this many items of one category per list.")
    boost: BoostConfig = BoostConfig()

    @model_validator(mode="after")
    def _categories_disjoint(self) -> RulesConfig:
        both = sorted(set(self.include_categories) & set(self.exclude_categories))
        if both:
            raise ValueError(f"categories {both} are both included and excluded")
        return self


class SimilarItemsConfig(_Strict):
    enabled: bool = True
    k: int = Field(default=20, ge=1, le=1000)


class BlendConfig(_Strict):
    """A hybrid list: the model's score plus `weight` x the item's recent popularity (0..1, its share of the
    most popular item's distinct users in the last `days` of history), ranked by the same exact top-N."""

    weight: float = Field(default=0.0, ge=0, description="0 is the model alone.")
    days: float = Field(default=30.0, gt=0)


class RecommendConfig(_Strict):
    n: int = Field(default=20, ge=1, le=1000)
    blend: BlendConfig = BlendConfig()
    exclude_event_types: list[str] = Field(default_factory=lambda: [C.PURCHASE])
    min_history: int = Field(default=1, ge=1, description="Distinct items a user needs for ALS recommendations.")
    max_broadcast_items: int = Field(default=500_000, ge=1)
    fallback: Literal["popular", "trending", "category_popular"] = Field(
        default="popular", description="List for users below min_history; always backfilled from popular."
    )
    trending_days: float = Field(default=7.0, gt=0, description="Window of 'trending', counted back from the latest event.")
    exploration_slots: int = Field(default=0, ge=0, description="Last slots of each list given to items without factors.")
    max_exploration_items: int = Field(default=10_000, ge=1, description="Bound on the exploration pool (broadcast).")
    explain: bool = True
    rules: RulesConfig = RulesConfig()
    similar_items: SimilarItemsConfig = SimilarItemsConfig()

    @model_validator(mode="after")
    def _slots_fit(self) -> RecommendConfig:
        if self.exploration_slots >= self.n:
            raise ValueError(f"exploration_slots ({self.exploration_slots}) must be smaller than n ({self.n})")
        return self

    @field_validator("exclude_event_types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(C.EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; allowed: {list(C.EVENT_TYPES)}")
        return v


class GateConfig(_Strict):
    enabled: bool = True
    margin: float = Field(default=0.1, ge=0, description="Model must reach best baseline x (1 + margin).")
    on_fail: Literal["auto", "keep", "baseline"] = Field(
        default="auto",
        description="When the model loses: 'keep' publishes nothing (exit 3, the previous lists stay); 'baseline' "
        "publishes the best baseline's lists instead (exit 4); 'auto' is 'baseline' while no list was ever "
        "published (a shop is never left with nothing) and 'keep' after.",
    )


class EvaluateConfig(_Strict):
    """How models and baselines are measured (see README, "Evaluation")."""

    enabled: bool = Field(default=True, description="Run evaluate (and its gate) inside `sparkrec run`.")
    split: Literal["time", "leave_last_n", "random"] = "time"
    test_days: float = Field(default=28.0, gt=0, description="time split: the last D days are the test period.")
    max_test_share: float = Field(
        default=0.25, gt=0, le=1,
        description="time split: the test period is at most this share of the history's span (short histories).",
    )
    leave_last_n: int = Field(default=1, ge=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="random split: share of each user's items.")
    seed: int = 42
    ks: list[int] = Field(default_factory=lambda: [10, 20])
    metric: Literal["ndcg", "precision", "recall", "map", "hit_rate", "mrr"] = "ndcg"
    k: int = Field(default=10, ge=1, description="The k of the metric that tunes and gates.")
    relevant_event_types: list[str] = Field(default_factory=lambda: [C.PURCHASE])
    repeat_relevant: bool = Field(default=False, description="Count test items the user already had in training.")
    recent_days: float = Field(default=30.0, gt=0, description="Window of the 'recently popular' baseline.")
    buy_again: bool = True
    gate: GateConfig = GateConfig()

    @field_validator("relevant_event_types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(C.EVENT_TYPES))
        if unknown or not v:
            raise ValueError(f"expected a non-empty list of {list(C.EVENT_TYPES)}, got unknown {unknown}")
        return v

    @model_validator(mode="after")
    def _k_in_ks(self) -> EvaluateConfig:
        if self.k not in self.ks:
            raise ValueError(f"evaluate.k ({self.k}) must be one of evaluate.ks {self.ks}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError("ks must be a non-empty list of k >= 1")
        return self


class TuneSpace(_Strict):
    """Where the search looks. Ranges are sampled log-uniformly; lists are choices."""

    rank: list[int] = Field(default_factory=lambda: [16, 32, 64])
    reg_param: tuple[float, float] = (0.03, 1.0)
    alpha: tuple[float, float] = (0.5, 10.0)
    max_iter: list[int] = Field(default_factory=lambda: [15])
    recency_half_life_days: list[float | None] = Field(default_factory=lambda: [None, 14.0, 30.0])
    blend_weight: list[float] = Field(
        default_factory=lambda: [0.0, 0.2, 0.5, 1.0],
        description="recommend.blend.weight values every fit is scored with (a blend only re-ranks: no refit).",
    )
    event_weights: dict[str, list[float]] = Field(
        default_factory=lambda: {C.VIEW: [0.5, 1.0], C.CART: [2.0, 4.0], C.PURCHASE: [4.0, 8.0]},
        description="Choices per event type; types not listed keep train.event_weights.",
    )

    @model_validator(mode="after")
    def _ranges(self) -> TuneSpace:
        for name in ("reg_param", "alpha"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high")
        if not self.rank or min(self.rank) < 1 or not self.max_iter or min(self.max_iter) < 1:
            raise ValueError("rank and max_iter need positive choices")
        if any(b < 0 for b in self.blend_weight):
            raise ValueError("blend_weight choices must be >= 0")
        return self


CANDIDATE_KEYS = ("rank", "reg_param", "alpha", "max_iter", "recency_half_life_days", "event_weights")


def _default_candidates() -> list[dict]:
    # Winners on shops unlike each other (bench/RESULTS.md, "Out of the box"): dense purchase history with a
    # season (Online Retail II: high rank, confident, recent) and a sparse clickstream (low rank, strongly regularised).
    return [
        {"rank": 64, "reg_param": 0.1, "alpha": 5.0, "recency_half_life_days": 14.0},
        {"rank": 16, "reg_param": 0.3, "alpha": 1.0},
    ]


class TuneConfig(_Strict):
    enabled: bool = Field(
        default=True,
        description="Tune inside `sparkrec run` before evaluating and training: a search when no settings were tuned "
        "for this search within tune.reuse_days, the stored winner otherwise; skipped when the history is too "
        "short (tune.min_users).",
    )
    max_trials: int = Field(default=8, ge=1)
    max_minutes: float = Field(
        default=2.5, gt=0, description="Time budget of a search: no trial starts that would end after it."
    )
    feedback_settings: int = Field(default=2, ge=1, description="Distinct feedback constructions drawn at random (each matrix built once).")
    min_users: int = Field(
        default=50, ge=1,
        description="Fewest evaluated users on the validation split worth a search; below it `run` keeps the "
        "configured settings (and says so in `runs`), `sparkrec tune` fails.",
    )
    candidates: list[dict] = Field(
        default_factory=_default_candidates,
        description="Settings tried right after the configured ones, before random draws (keys: "
        + ", ".join(CANDIDATE_KEYS) + ").",
    )
    seed: int = 7
    space: TuneSpace = TuneSpace()
    reuse_days: float | None = Field(
        default=7.0, gt=0,
        description="Inside `sparkrec run`, settings tuned by an earlier run for the same search (same space, "
        "split, metric and base settings) within this many days are reused instead of searching again; "
        "null searches every time. `sparkrec tune` always searches.",
    )

    @field_validator("candidates")
    @classmethod
    def _candidate_keys(cls, v: list[dict]) -> list[dict]:
        for i, c in enumerate(v):
            unknown = sorted(set(c) - set(CANDIDATE_KEYS))
            if unknown:
                raise ValueError(f"candidate {i}: unknown key(s) {unknown}; allowed: {list(CANDIDATE_KEYS)}")
            with_candidate(TrainConfig(), c)  # the same checks as the settings themselves
        return v


def with_candidate(base: TrainConfig, candidate: dict) -> TrainConfig:
    """`base` with a tuning candidate's settings (keys `CANDIDATE_KEYS`), validated like any train settings."""
    merged = base.model_dump()
    merged["als"].update({k: candidate[k] for k in ("rank", "reg_param", "alpha", "max_iter") if k in candidate})
    if "recency_half_life_days" in candidate:
        merged["recency_half_life_days"] = candidate["recency_half_life_days"]
    if "event_weights" in candidate:
        merged["event_weights"] = {**base.event_weights, **candidate["event_weights"]}
    return TrainConfig.model_validate(merged)


class IntervalConfig(_Strict):
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


class PrivacyConfig(_Strict):
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


class StreamSourceConfig(_Strict):
    """Where the live events come from (`stream.source`): a Kafka topic, or a directory new files land in."""

    kind: Literal["kafka", "files"] = "kafka"
    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Kafka's bootstrap servers (kind kafka).")
    topic: str = Field(default="events", description="The topic of JSON events, one event per message (kind kafka).")
    starting_offsets: Literal["earliest", "latest"] = Field(
        default="earliest", description="Where a stream with no checkpoint starts reading (kind kafka)."
    )
    max_offsets_per_trigger: int | None = Field(
        default=5000, ge=1, description="At most this many events per micro-batch (kind kafka): bounds a batch after a pause."
    )
    path: str | None = Field(default=None, description="The directory to watch (kind files); files in source.format.")
    max_files_per_trigger: int = Field(default=50, ge=1, description="At most this many new files per micro-batch (kind files).")
    options: dict[str, str] = Field(default_factory=dict, description="More options for Spark's reader (kafka.* settings).")

    @model_validator(mode="after")
    def _has_place(self) -> StreamSourceConfig:
        if self.kind == "files" and not self.path:
            raise ValueError("stream.source.path is required when stream.source.kind is 'files'")
        if self.kind == "kafka" and not self.topic.strip():
            raise ValueError("stream.source.topic must name a topic")
        return self


class StreamConfig(_Strict):
    """The live path (`sparkrec stream`): micro-batches cleaned like batch, customers re-scored within seconds."""

    source: StreamSourceConfig = StreamSourceConfig()
    trigger_seconds: float = Field(default=1.0, ge=0, description="How often a micro-batch starts (0: as soon as the last ends).")
    checkpoint: str | None = Field(default=None, description="The stream's checkpoint; default <checkpoint_dir>/stream.")
    clean_seconds: float = Field(
        default=10.0, gt=0,
        description="How often the clean classifies what the stream appended (the batch clean, incremental). "
        "Lists are published before it, from the clean tables plus the unclassified rows passed through the row rules.",
    )
    kafka_package: str = Field(
        default="org.apache.spark:spark-sql-kafka-0-10_2.13:4.2.0",
        description="Spark's Kafka connector, resolved from Maven Central in local mode (pass it with --packages under spark-submit).",
    )
    refresh_minutes: float = Field(
        default=5.0, gt=0,
        description="How often the fallback rankings (popular, trending) and the blend are recomputed from the interactions, "
        "the stream's included; a new model is picked up at once.",
    )
    compact_every: int = Field(
        default=30, ge=0, description="Compact the tables the stream appends to every this many clean passes (0: never)."
    )
    max_users_per_batch: int = Field(
        default=20000, ge=1, description="Customers re-scored per micro-batch at most (they are scored on the driver)."
    )


class Config(_Strict):
    warehouse: str
    checkpoint_dir: str | None = Field(default=None, description="Defaults to <warehouse>/_checkpoints.")
    tables: dict[str, str] = Field(default_factory=dict, description="Override a table's name.")
    spark: SparkConfig = SparkConfig()
    source: InputConfig
    items: ItemsConfig = ItemsConfig()
    clean: CleanConfig = CleanConfig()
    train: TrainConfig = TrainConfig()
    recommend: RecommendConfig = RecommendConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()
    interval: IntervalConfig = IntervalConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    stream: StreamConfig = StreamConfig()

    @model_validator(mode="after")
    def _kept_columns_are_not_dropped(self) -> Config:
        mapped = {v for v in self.source.columns.model_dump().values() if v}
        clash = sorted(mapped & set(self.privacy.drop_raw_columns))
        if clash:
            raise ValueError(f"privacy.drop_raw_columns names {clash}, which source.columns maps: sparkrec needs them")
        return self

    @field_validator("tables")
    @classmethod
    def _valid_tables(cls, v: dict[str, str]) -> dict[str, str]:
        for key, name in v.items():
            if key not in C.TABLES:
                raise ValueError(f"unknown table {key!r}; allowed: {list(C.TABLES)}")
            if not TABLE_NAME_RE.match(name):
                raise ValueError(
                    f"invalid table name {name!r} for {key!r}: expected letters, digits and '_', "
                    "starting with a letter or '_'"
                )
        if len(set(v.values())) != len(v):
            raise ValueError("two tables share one name")
        return v

    def table_name(self, key: str) -> str:
        return self.tables.get(key, key)

    def table_path(self, key: str) -> str:
        return f"{self.warehouse.rstrip('/')}/{self.table_name(key)}"

    @property
    def checkpoint_root(self) -> str:
        return self.checkpoint_dir or f"{self.warehouse.rstrip('/')}/_checkpoints"

    @property
    def stream_checkpoint(self) -> str:
        return self.stream.checkpoint or f"{self.checkpoint_root.rstrip('/')}/stream"

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def search_key(self) -> str:
        """What a tuning result depends on: the search, the split and metric it is judged by, the base settings.

        Two runs with the same key would search the same space on the same terms,
        so one's winner can stand for the other's (`tune.reuse_days`).
        """
        parts = {
            "tune": self.tune.model_dump(mode="json", exclude={"reuse_days", "max_minutes", "min_users", "enabled"}),
            "evaluate": self.evaluate.model_dump(mode="json", exclude={"enabled", "gate"}),
            "train": self.train.model_dump(mode="json"),
            "recommend": self.recommend.model_dump(mode="json"),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def rules_key(self) -> str:
        """What a row's classification depends on: the input mapping and the clean rules.

        The incremental clean keeps earlier rows' outcomes; when this key
        changes they would no longer be what the rules say, so it recomputes.
        """
        parts = {
            "source": self.source.model_dump(mode="json", exclude={"path"}),
            "clean": self.clean.model_dump(mode="json", exclude={"full", "min_kept_ratio"}),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self) -> str:
        """A short hash of the effective config, recorded with every run."""
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself (cycle: {' -> '.join(map(str, seen + (path,)))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _deep_merge(merged, _load_yaml(path.parent / parent, seen + (path,)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` into (['a','b','c'], value), the value as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        # Never fall back to the raw text: `!!python/...` or a broken quote would
        # silently become a literal string (a warehouse directory of that name).
        reason = str(exc).splitlines()[0]
        raise ConfigError(
            f"override {key.strip()!r}: value {raw!r} is not a valid YAML value ({reason}); "
            "quote it if you meant a string: --set 'key=\"text\"'"
        ) from None
    return parts, value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict):
                msg += f" (got {err['input']!r})"
        lines.append(f"config key '{key}': {msg}")
    return "; ".join(lines)


def from_dict(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a layered config file, apply `--set` overrides and validate it.

    Example:
        cfg = load_config("conf/local.yaml", ["recommend.n=10"])
    """
    data = _load_yaml(Path(path))
    for text in overrides or []:
        parts, value = parse_override(text)
        _apply_override(data, parts, value)
    return from_dict(data)


def is_local_path(path: str) -> bool:
    return not _REMOTE_SCHEMES.match(path) or path.startswith("file://")


def check_warehouse(cfg: Config) -> None:
    """Fail early when a local warehouse (or checkpoint) path is a file, or lies under one."""
    for key, path in (("warehouse", cfg.warehouse), ("checkpoint_dir", cfg.checkpoint_dir)):
        if not path or not is_local_path(path):
            continue
        local = Path(path.removeprefix("file://")).expanduser()
        for p in (local, *local.parents):
            if p.exists():
                if not p.is_dir():
                    where = "is a file" if p == local else f"lies under {p}, which is a file"
                    raise ConfigError(f"config key '{key}': {path} {where}; it must be a directory (created if missing)")
                break


def check_input_paths(cfg: Config) -> None:
    """Fail early when a local input path does not exist (remote paths are left to Spark)."""
    for key, path in (("source.path", cfg.source.path), ("items.path", cfg.items.path)):
        if path and is_local_path(path):
            local = Path(path.removeprefix("file://"))
            if not local.exists():
                raise ConfigError(f"config key '{key}': input path does not exist: {path}")

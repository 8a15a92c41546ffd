"""Cleaning: normalise raw rows, reject with a reason, deduplicate, account for every row.

The stage is a chain of pure transforms:

    raw.transform(normalize, src=...)         canonical columns, nothing dropped
       .transform(with_reject_reason, ...)   first failing rule, or null
       .transform(with_duplicate_flag)       exact duplicates and replays of an event id
       .transform(with_bot_reason, ...)      users with absurd activity
       .transform(with_outcome)              kept | quarantined | duplicate

Every input row ends in exactly one outcome, so the ledger
rows in = kept + quarantined + duplicates holds by construction, and the
stage checks it on the real counts anyway.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, NumericType, StringType, TimestampType

from sparkrec.core import columns as C
from sparkrec.core.columns import LINEAGE_COLUMNS
from sparkrec.core.config import CleanConfig, InputConfig, as_utc
from sparkrec.core.errors import ConfigError
from sparkrec.core.ledger import DUPLICATED, KEPT, QUARANTINED

OUTCOME = "_outcome"
DUPLICATE = "_duplicate"

# Reason codes, in the order the rules are applied (the first that fails wins).
MALFORMED = "malformed_line"
MISSING_USER = "missing_user_id"
MISSING_ITEM = "missing_item_id"
INVALID_USER = "invalid_user_id"
INVALID_ITEM = "invalid_item_id"
CANCELLATION = "cancellation"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
BAD_TIMESTAMP = "unparsable_timestamp"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
BAD_QUANTITY = "invalid_quantity"
NON_POSITIVE_QUANTITY = "non_positive_quantity"
BAD_PRICE = "invalid_price"
NON_POSITIVE_PRICE = "non_positive_price"
BAD_RATING = "invalid_rating"
NON_PRODUCT = "non_product_item"
BOT_USER = "bot_user"

INTERACTION_COLUMNS = [
    C.USER_ID,
    C.ITEM_ID,
    C.EVENT_TYPE,
    C.EVENT_TS,
    C.EVENT_ID,
    C.QUANTITY,
    C.PRICE,
    C.RATING,
    C.SOURCE_FILE,
    C.RAW_KEY,
]

# Raw text kept beside the parsed value, so a rule can tell "absent" from "unparsable".
_RAW_TS, _RAW_TYPE, _RAW_QTY, _RAW_PRICE, _RAW_RATING = "_ts_raw", "_type_raw", "_qty_raw", "_price_raw", "_rating_raw"
# The item's name as the input line gave it (not an interactions column: it goes to `items`).
_ITEM_NAME = "_item_name"
ITEM_NAME_COLUMN = _ITEM_NAME


# --------------------------------------------------------------------------- column helpers


# Statistics only where a reader filters: time splits select on event_ts.
# The change feed lets `ids` read only the rows added since its last run.
# Deletion vectors: the incremental clean's MERGE drops a few demoted rows from files of earlier days; with
# them Delta marks those rows instead of copying every other row of the file.
INTERACTIONS_PROPERTIES = {"delta.dataSkippingStatsColumns": C.EVENT_TS, "delta.enableChangeDataFeed": "true",
                           "delta.enableDeletionVectors": "true"}
# Statistics on the run id let the incremental clean's MERGE read only the files of the batch it applies.
QUARANTINE_PROPERTIES = {"delta.dataSkippingStatsColumns": f"{C.RUN_ID},{C.RAW_KEY},{C.REASON}",
                         "delta.enableDeletionVectors": "true"}

def clean_id(col: Column, is_numeric: bool) -> Column:
    """Trimmed string id; blank becomes null; 13085.0 read from a float column becomes '13085'."""
    if is_numeric:
        as_text = F.when(col == F.floor(col), col.cast("long").cast("string")).otherwise(col.cast("string"))
    else:
        as_text = F.trim(col.cast("string"))
    return F.when(as_text == "", None).otherwise(as_text)


def _to_double(df: DataFrame, name: str | None) -> tuple[Column, Column]:
    """(parsed double, raw text) for an optional source column."""
    if not name:
        return F.lit(None).cast(DoubleType()), F.lit(None).cast(StringType())
    field = df.schema[name]
    col = F.col(f"`{name}`")
    if isinstance(field.dataType, NumericType):
        return col.cast(DoubleType()), col.cast(StringType())
    text = F.trim(col.cast(StringType()))
    return F.expr(f"try_cast(trim(`{name}`) AS DOUBLE)"), F.when(text == "", None).otherwise(text)


def event_time(df: DataFrame, src: InputConfig) -> tuple[Column, Column]:
    """(event time in UTC or null when unreadable, the raw value as text), from the source's format and zone."""
    name = src.columns.timestamp
    field = df.schema[name]
    col = F.col(f"`{name}`")
    if isinstance(field.dataType, TimestampType):
        ts = col
    elif isinstance(field.dataType, NumericType):
        ts = F.timestamp_seconds(col)
    elif src.timestamp_format:
        ts = F.try_to_timestamp(F.trim(col.cast("string")), F.lit(src.timestamp_format))
    else:
        ts = F.try_to_timestamp(F.trim(col.cast("string")))
    if src.timezone != "UTC":
        ts = F.to_utc_timestamp(ts, src.timezone)
    return ts, col.cast(StringType())


def check_timestamp_format(spark, src: InputConfig) -> None:
    """Ask Spark itself whether it can parse with `source.timestamp_format`, before any row is read.

    The config check knows the pattern letters; Spark's own parser is the last word
    (a pattern it refuses would otherwise fail mid-stage with a cross-version message).

    Raises:
        ConfigError: naming the key and Spark's reason.
    """
    if not src.timestamp_format:
        return
    try:
        spark.range(1).select(F.try_to_timestamp(F.lit("2000-01-01 00:00:00"), F.lit(src.timestamp_format))).collect()
    except Exception as exc:  # Spark raises an AnalysisException/SparkUpgradeException subclass
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"config key 'source.timestamp_format': Spark cannot parse with {src.timestamp_format!r}: {reason}") from None


def _event_type(df: DataFrame, src: InputConfig) -> tuple[Column, Column]:
    if src.kind == "transactions":
        invoice = F.trim(F.col(f"`{src.columns.invoice}`").cast("string"))
        is_cancel = F.coalesce(invoice.startswith(src.cancellation_prefix), F.lit(False))
        return F.when(is_cancel, F.lit(C.CANCELLATION)).otherwise(F.lit(C.PURCHASE)), invoice
    raw = F.col(f"`{src.columns.event_type}`").cast("string")
    pairs: list[Column] = []
    for canonical, synonyms in sorted(src.event_types.items()):
        for s in sorted({x.strip().lower() for x in synonyms}):
            pairs += [F.lit(s), F.lit(canonical)]
    lookup = F.create_map(*pairs) if pairs else F.create_map().cast("map<string,string>")
    return F.try_element_at(lookup, F.lower(F.trim(raw))), raw


# --------------------------------------------------------------------------- transforms


def normalize(raw: DataFrame, src: InputConfig) -> DataFrame:
    """Map a raw table (as ingested) to canonical columns, keeping the original row.

    Nothing is filtered here; unparsable values become nulls beside their raw
    text so that the rules can name what was wrong.
    """
    data_cols = [c for c in raw.columns if c not in LINEAGE_COLUMNS]
    cols = src.columns

    def is_num(name: str) -> bool:
        return isinstance(raw.schema[name].dataType, NumericType)

    ts, ts_raw = event_time(raw, src)
    etype, etype_raw = _event_type(raw, src)
    qty, qty_raw = _to_double(raw, cols.quantity)
    price, price_raw = _to_double(raw, cols.price)
    rating, rating_raw = _to_double(raw, cols.rating)
    event_id = clean_id(F.col(f"`{cols.event_id}`"), is_num(cols.event_id)) if cols.event_id else F.lit(None).cast("string")
    corrupt = F.col(C.CORRUPT_RECORD) if C.CORRUPT_RECORD in raw.columns else F.lit(None).cast("string")
    item_name = F.lit(None).cast("string")
    if cols.item_name and cols.item_name in raw.columns:
        name = F.trim(F.col(f"`{cols.item_name}`").cast("string"))
        item_name = F.when(name == "", None).otherwise(name)
    return raw.select(
        clean_id(F.col(f"`{cols.user_id}`"), is_num(cols.user_id)).alias(C.USER_ID),
        clean_id(F.col(f"`{cols.item_id}`"), is_num(cols.item_id)).alias(C.ITEM_ID),
        etype.alias(C.EVENT_TYPE),
        ts.alias(C.EVENT_TS),
        event_id.alias(C.EVENT_ID),
        qty.alias(C.QUANTITY),
        price.alias(C.PRICE),
        rating.alias(C.RATING),
        ts_raw.alias(_RAW_TS),
        etype_raw.alias(_RAW_TYPE),
        qty_raw.alias(_RAW_QTY),
        price_raw.alias(_RAW_PRICE),
        rating_raw.alias(_RAW_RATING),
        corrupt.alias(C.CORRUPT_RECORD),
        F.to_json(
            F.struct(*[F.col(f"`{c}`") for c in data_cols if c != C.CORRUPT_RECORD]), {"ignoreNullFields": "false"}
        ).alias(C.RAW_RECORD),
        F.col(C.ROW_HASH),
        F.col(C.RAW_KEY),
        F.col(C.SOURCE_FILE),
        item_name.alias(_ITEM_NAME),
    )


def invalid_id(col: Column, max_length: int, json_source: bool) -> Column:
    """An id no shop would issue: a JSON object or array (a nested field mapped as an id),
    control characters or NUL, or longer than `clean.max_id_length`; in a JSON source also
    `true` / `false` (Spark's JSON reader gives a boolean as that text, indistinguishable
    from the string, and no shop keys customers or products by it)."""
    bad = col.rlike(r"(?s)^\s*(\{.*\}|\[.*\])\s*$") | col.rlike(r"[\x00-\x1F\x7F]") | (F.length(col) > max_length)
    if json_source:
        bad = bad | F.lower(col).isin("true", "false")
    return bad


def _not_finite(col: Column) -> Column:
    """NaN or an infinity (text such as 'NaN', 'inf' or '1e400' parses to these)."""
    return F.isnan(col) | (F.abs(col) == F.lit(float("inf")))


def reject_rules(
    src: InputConfig, clean: CleanConfig, now: datetime
) -> list[tuple[str, Column]]:
    """(reason, failing condition) pairs, in the order they are applied."""
    ts = F.col(C.EVENT_TS)
    latest = as_utc(now) + timedelta(hours=clean.max_future_hours)
    qty, price, rating = F.col(C.QUANTITY), F.col(C.PRICE), F.col(C.RATING)
    rules: list[tuple[str, Column]] = [
        (MALFORMED, F.col(C.CORRUPT_RECORD).isNotNull()),
        (MISSING_USER, F.col(C.USER_ID).isNull()),
        (INVALID_USER, invalid_id(F.col(C.USER_ID), clean.max_id_length, src.format == "json")),
        (MISSING_ITEM, F.col(C.ITEM_ID).isNull()),
        (INVALID_ITEM, invalid_id(F.col(C.ITEM_ID), clean.max_id_length, src.format == "json")),
    ]
    if src.kind == "transactions":
        rules.append((CANCELLATION, F.col(C.EVENT_TYPE) == C.CANCELLATION))
    rules += [
        (UNKNOWN_EVENT_TYPE, F.col(C.EVENT_TYPE).isNull()),
        (BAD_TIMESTAMP, ts.isNull()),
        (
            TIMESTAMP_OUT_OF_RANGE,
            (ts < F.lit(as_utc(clean.min_event_time)).cast(TimestampType())) | (ts > F.lit(latest).cast(TimestampType())),
        ),
        (BAD_QUANTITY, (qty.isNull() & F.col(_RAW_QTY).isNotNull()) | _not_finite(qty)),
        (BAD_PRICE, (price.isNull() & F.col(_RAW_PRICE).isNotNull()) | _not_finite(price)),
    ]
    if clean.reject_non_positive_quantity:
        rules.append((NON_POSITIVE_QUANTITY, qty <= 0))
    if clean.reject_non_positive_price:
        rules.append((NON_POSITIVE_PRICE, price <= 0))
    is_rating = F.col(C.EVENT_TYPE) == C.RATING_EVENT
    rules.append(
        (BAD_RATING, (is_rating & (rating.isNull() | (rating < clean.rating_min) | (rating > clean.rating_max)))
         | _not_finite(rating))
    )
    if clean.non_product_items:
        pattern = "^(?:" + "|".join(f"(?:{p})" for p in clean.non_product_items) + ")$"
        rules.append((NON_PRODUCT, F.col(C.ITEM_ID).rlike(pattern)))
    return rules


def with_reject_reason(df: DataFrame, rules: list[tuple[str, Column]]) -> DataFrame:
    """Add `reason`: the first rule the row fails, or null when it passes all."""
    return df.withColumn(C.REASON, F.coalesce(*[F.when(cond, F.lit(code)) for code, cond in rules], F.lit(None).cast("string")))


def dedup_group() -> Column:
    """The set a row competes in for survival: its event id when it has one, else its content.

    Exact copies share their event id, so one group holds both a row's copies
    and its replays. The incremental clean keeps one survivor per group
    (`survivors_of`) and compares newcomers with it.
    """
    return F.when(F.col(C.EVENT_ID).isNotNull(), F.concat(F.lit("e:"), F.col(C.EVENT_ID))).otherwise(
        F.concat(F.lit("h:"), F.col(C.ROW_HASH))
    )


def with_duplicate_flag(df: DataFrame) -> DataFrame:
    """Flag exact duplicates and replays among rows that passed the rules.

    The row kept is fixed by a full tie-break on the unique raw key, so the
    result does not depend on partitioning or on the order files were read.
    Exact duplicates are rows with equal input values; replays share a
    non-null event id (the earliest event time wins).

    One shuffle does both: rows are grouped by event id when they have one,
    else by content hash. Exact copies share their event id, so within an
    event id the survivor is the earliest (event time, raw key) row, which is
    also the first of its own copies; a dropped row is "exact" when an earlier
    row has its content, else a "replay". The second window only refines the
    first one's partitioning, so Spark sorts again but does not shuffle again.
    """
    ok = F.col(C.REASON).isNull()
    group = F.when(ok, dedup_group()).otherwise(F.concat(F.lit("x:"), F.col(C.RAW_KEY)))
    first_w = Window.partitionBy("_dup_group").orderBy(C.EVENT_TS, C.RAW_KEY)
    copy_w = Window.partitionBy("_dup_group", C.ROW_HASH).orderBy(C.RAW_KEY)
    return (
        df.withColumn("_dup_group", group)
        .withColumn("_first", F.row_number().over(first_w) == 1)
        .withColumn("_copy", F.row_number().over(copy_w) > 1)
        .withColumn(
            DUPLICATE,
            F.when(~ok | F.col("_first"), F.lit(None).cast("string"))
            .when(F.col("_copy"), F.lit("exact"))
            .otherwise(F.lit("replay")),
        )
        .drop("_dup_group", "_first", "_copy")
    )


def is_bot(total: Column, max_day: Column, clean: CleanConfig) -> Column:
    """The bot rule on a user's surviving events: in total, and on their busiest day (the limits in `clean.bots`)."""
    limits = clean.bots
    cond = F.lit(False)
    if limits.max_events_per_user is not None:
        cond = cond | (total > limits.max_events_per_user)
    if limits.max_events_per_user_day is not None:
        cond = cond | (max_day > limits.max_events_per_user_day)
    return cond


def bot_users(df: DataFrame, clean: CleanConfig) -> DataFrame:
    """Users whose activity is beyond human: (user_id) rows, one per bot.

    Counted over the rows that survived the rules and deduplication, so a
    replay storm does not turn a person into a bot. A two-column aggregate,
    not a window over whole rows: cheap at tens of millions of events.
    """
    alive = F.col(C.REASON).isNull() & F.col(DUPLICATE).isNull() & F.col(C.USER_ID).isNotNull()
    per_day = df.where(alive).groupBy(C.USER_ID, F.to_date(C.EVENT_TS).alias("_day")).count()
    per_user = per_day.groupBy(C.USER_ID).agg(F.sum("count").alias("_total"), F.max("count").alias("_max_day"))
    return per_user.where(is_bot(F.col("_total"), F.col("_max_day"), clean)).select(C.USER_ID)


def with_bot_reason(df: DataFrame, clean: CleanConfig) -> DataFrame:
    """Quarantine every surviving event of a bot user (see `bot_users`).

    `df` is read twice (the aggregate and the join), so callers on large data
    persist it first, as the clean stage does.
    """
    limits = clean.bots
    if limits.max_events_per_user is None and limits.max_events_per_user_day is None:
        return df
    # Bots are few by nature; the broadcast keeps the full table from being shuffled.
    flagged = F.broadcast(bot_users(df, clean).withColumn("_bot", F.lit(True)))
    alive = F.col(C.REASON).isNull() & F.col(DUPLICATE).isNull()
    return (
        df.join(flagged, C.USER_ID, "left")
        .withColumn(C.REASON, F.when(alive & F.col("_bot"), F.lit(BOT_USER)).otherwise(F.col(C.REASON)))
        .drop("_bot")
    )


def with_outcome(df: DataFrame) -> DataFrame:
    """Every row gets exactly one outcome: the basis of the ledger."""
    return df.withColumn(
        OUTCOME,
        F.when(F.col(C.REASON).isNotNull(), F.lit(QUARANTINED))
        .when(F.col(DUPLICATE).isNotNull(), F.lit(DUPLICATED))
        .otherwise(F.lit(KEPT)),
    )


def deduplicated(raw: DataFrame, src: InputConfig, clean: CleanConfig, now: datetime) -> DataFrame:
    """Normalised rows with their rule reason and duplicate flag (the part worth persisting)."""
    return (
        raw.transform(normalize, src=src)
        .transform(with_reject_reason, rules=reject_rules(src, clean, now))
        .transform(with_duplicate_flag)
    )


def provisional(raw: DataFrame, src: InputConfig, clean: CleanConfig, now: datetime) -> DataFrame:
    """The rows of `raw` that pass the row rules and are not duplicates among themselves, as interactions.

    What the live path scores before the clean has classified a micro-batch: the same rules, minus the
    two that need the warehouse's state (duplicates of earlier rows, the bot thresholds), which the clean
    applies to the tables moments later.
    """
    rows = deduplicated(raw, src, clean, now)
    return rows.where(F.col(C.REASON).isNull() & F.col(DUPLICATE).isNull()).select(*INTERACTION_COLUMNS)


def finish(deduped: DataFrame, clean: CleanConfig) -> DataFrame:
    """Bot users and the final outcome, on top of `deduplicated`."""
    return deduped.transform(with_bot_reason, clean=clean).transform(with_outcome)


def classify(raw: DataFrame, src: InputConfig, clean: CleanConfig, now: datetime) -> DataFrame:
    """The whole cleaning chain: raw rows in, every row with its outcome out."""
    return finish(deduplicated(raw, src, clean, now), clean)


def alive(df: DataFrame) -> Column:
    """Passed the rules (or failed only the bot rule, which comes after) and is not a duplicate."""
    return (F.col(C.REASON).isNull() | (F.col(C.REASON) == BOT_USER)) & F.col(DUPLICATE).isNull()


def survivors_of(classified: DataFrame) -> DataFrame:
    """One row per dedup group: the row that won it (kept, or quarantined only as a bot's).

    The incremental clean's memory of what it kept: a newcomer of the same
    group is a duplicate unless it wins the tie-break, and then it replaces this row.
    """
    return classified.where(alive(classified)).select(*survivor_columns())


def survivor_columns() -> list[Column]:
    return [
        dedup_group().alias(C.DEDUP_GROUP),
        F.col(C.EVENT_TS),
        F.col(C.RAW_KEY),
        F.col(C.USER_ID),
        F.to_date(C.EVENT_TS).alias(C.DAY),
        F.xxhash64(C.ROW_HASH).alias(C.HASH_CODE),
    ]


def user_days_of(survivors: DataFrame) -> DataFrame:
    """(user_id, day, events): the surviving events per user and day that the bot rule counts."""
    return survivors.groupBy(C.USER_ID, C.DAY).agg(F.count(F.lit(1)).alias(C.EVENTS))


def interactions_of(classified: DataFrame) -> DataFrame:
    return classified.where(F.col(OUTCOME) == KEPT).select(*INTERACTION_COLUMNS)


def kept_with_names(classified: DataFrame) -> DataFrame:
    """Kept rows with the item name the input gave, for `items_from_interactions`."""
    return classified.where(F.col(OUTCOME) == KEPT).select(*INTERACTION_COLUMNS, _ITEM_NAME)


def quarantine_of(classified: DataFrame, run_id: str) -> DataFrame:
    return classified.where(F.col(OUTCOME) == QUARANTINED).select(
        F.col(C.RAW_RECORD),
        F.col(C.CORRUPT_RECORD),
        F.col(C.REASON),
        F.col(C.SOURCE_FILE),
        F.col(C.RAW_KEY),
        F.lit(run_id).alias(C.RUN_ID),
    )


def ledger(classified: DataFrame) -> DataFrame:
    """Counts per outcome, reason and duplicate kind; a small table for the driver."""
    return classified.groupBy(OUTCOME, C.REASON, DUPLICATE).count()


def ledger_rows(counts: list) -> list[dict]:
    """Collected `ledger` rows in the shape `ledger.tally` adds up."""
    return [{"outcome": r[OUTCOME], "reason": r[C.REASON], "duplicate": r[DUPLICATE], "count": r["count"]} for r in counts]



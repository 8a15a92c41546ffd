"""Ingest transforms: raw rows as read, plus the lineage that makes re-ingest safe."""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from sparkrec.batch.clean import event_time
from sparkrec.core import columns as C
from sparkrec.core.config import InputConfig, IntervalConfig

LINEAGE_COLUMNS = C.LINEAGE_COLUMNS

# Delta rejects spaces and some punctuation in column names unless column
# mapping is on; raw inputs such as Online Retail II ("Customer ID") need it,
# and events_raw promises the input columns as they were read.
# Statistics on the row key alone: collecting min/max of every raw column was a quarter of ingest's
# write, and a raw column may hold a user key, which no Delta log may keep after `forget`. The key
# starts with its source file's hash, so ingest's MERGE reads only the files of the same sources
# (`key_window`) instead of all of history.
KEY_STATS = {"delta.dataSkippingStatsColumns": C.RAW_KEY}
RAW_TABLE_PROPERTIES = {
    "delta.columnMapping.mode": "name",
    "delta.minReaderVersion": "2",
    "delta.minWriterVersion": "5",
    "delta.dataSkippingNumIndexedCols": "0",
    **KEY_STATS,
}
# Clean reads only the rows inserted since its last run from the change feed. Set by a commit of
# its own after the table exists: Delta refuses a write that turns on column mapping and the
# change feed at once (DELTA_BLOCK_COLUMN_MAPPING_AND_CDC_OPERATION).
CHANGE_FEED = {"delta.enableChangeDataFeed": "true"}


def data_columns(df: DataFrame) -> list[str]:
    """The columns that came from the input itself (not lineage)."""
    return [c for c in df.columns if c not in LINEAGE_COLUMNS]


def row_content_hash(cols: list[str]) -> F.Column:
    """SHA-256 of a row's input values, nulls included, so equal rows hash equal."""
    return F.sha2(F.to_json(F.struct(*[F.col(f"`{c}`") for c in cols]), {"ignoreNullFields": "false"}), 256)


def in_interval(event_time: F.Column, start, end) -> F.Column:
    """Rows of the interval [start, end), plus rows whose time cannot be read (clean must see them to quarantine them)."""
    return event_time.isNull() | ((event_time >= F.lit(start)) & (event_time < F.lit(end)))


def of_interval(raw: DataFrame, src: InputConfig, interval: IntervalConfig) -> DataFrame:
    """The raw rows a scheduled run for `interval` takes (all of them when no interval is set).

    Event times are read by clean's own parser, so ingest and clean agree on
    which interval a row belongs to.
    """
    if not interval.enabled:
        return raw
    ts, _ = event_time(raw, src)
    return raw.where(in_interval(ts, interval.start, interval.end))


def source_hash(source_file: F.Column) -> F.Column:
    """The first part of a row key: 16 hex digits of the SHA-256 of the row's source file."""
    return F.substring(F.sha2(F.coalesce(source_file, F.lit("")), 256), 1, 16)


_NAMED_SOURCES_MAX = 64  # source files a key window names one by one (more: one range from the lowest to the highest)


def key_window(hashes: list[str]) -> F.Column | None:
    """A condition on the target's row key (`t._raw_key`) that every row from these source files meets.

    Row keys are `<source hash>:...`, so each source is one range of keys (':' sorts just before ';').
    Delta compares it with each file's key statistics and skips the files of other sources: a day's
    ingest then reads the files of its own sources (none, for new ones), not every earlier day's.
    None (read everything) when there is no source.
    """
    if not hashes:
        return None
    key = F.col(f"t.{C.RAW_KEY}")

    def between(lo: str, hi: str) -> F.Column:
        return (key >= F.lit(f"{lo}:")) & (key < F.lit(f"{hi};"))

    if len(hashes) > _NAMED_SOURCES_MAX:
        return between(min(hashes), max(hashes))
    cond = None
    for h in sorted(hashes):
        cond = between(h, h) if cond is None else cond | between(h, h)
    return cond


def with_lineage(raw: DataFrame, run_id: str) -> DataFrame:
    """Add the ingest run id, a content hash and a key unique per input row.

    The key is (source file, content hash, occurrence among identical rows of
    that file). Identical rows are indistinguishable, so numbering them in any
    order gives the same set of keys: ingesting the same file again produces
    the same keys, and the insert-only MERGE adds nothing.
    """
    cols = data_columns(raw)
    hashed = raw.withColumn(C.ROW_HASH, row_content_hash(cols))
    w = Window.partitionBy(C.SOURCE_FILE, C.ROW_HASH).orderBy(C.ROW_HASH)
    return (
        hashed.withColumn("_occurrence", F.row_number().over(w))
        .withColumn(
            C.RAW_KEY,
            F.concat_ws(
                ":",
                source_hash(F.col(C.SOURCE_FILE)),
                F.col(C.ROW_HASH),
                F.col("_occurrence").cast("string"),
            ),
        )
        .withColumn(C.INGEST_RUN_ID, F.lit(run_id))
        .drop("_occurrence")
    )


def with_stream_lineage(raw: DataFrame, run_id: str, keyed: bool) -> DataFrame:
    """Lineage for a micro-batch (`sources.read_stream`).

    Args:
        keyed: the rows carry their key (Kafka: topic, partition, offset, so a message read again is the
            same row); otherwise (streamed files) they are keyed like a batch file's rows.
    """
    if not keyed:
        return with_lineage(raw.drop(C.RAW_KEY), run_id)
    return raw.withColumn(C.ROW_HASH, row_content_hash(data_columns(raw))).withColumn(C.INGEST_RUN_ID, F.lit(run_id))

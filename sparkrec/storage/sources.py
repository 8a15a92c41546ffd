"""Reading the shop's raw inputs: the interaction log and the optional item file.

Kept apart from `tables` (Delta access) because the two answer different
questions: this module knows file formats, parse modes and the mapping of a
shop's column names; `tables` knows where each Delta table lives and how a
write stays atomic. Nothing here writes.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from sparkrec.core import columns as C
from sparkrec.core.config import Config, InputConfig, ItemsConfig
from sparkrec.core.errors import InputError, MissingColumnError, SparkrecError

log = logging.getLogger(__name__)


def require_columns(df: DataFrame, table: str, needed: list[str]) -> None:
    """Raise a `MissingColumnError` naming `table` when `df` lacks any of `needed`."""
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise MissingColumnError(table, missing, df.columns)


def _reader(spark: SparkSession, fmt: str, options: dict[str, str], schema: StructType | None = None):
    reader = spark.read.format(fmt)
    if schema is not None:
        reader = reader.schema(schema)
    if fmt == "csv":
        # Everything as strings: a bad value becomes a quarantined row, never a failed read.
        # A quote inside a quoted field is doubled ("he said ""hi"""), as Python's csv
        # module and spreadsheets write it; Spark's default escape is a backslash.
        reader = reader.option("header", "true").option("inferSchema", "false").option("escape", '"')
    if fmt == "json":
        reader = reader.option("primitivesAsString", "true")
    if fmt in ("csv", "json"):
        reader = reader.option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", C.CORRUPT_RECORD)
    for k, v in options.items():
        reader = reader.option(k, v)
    return reader


def read_source(spark: SparkSession, src: InputConfig) -> DataFrame:
    """Read the raw interaction input as it is, plus the file each row came from.

    Rows that could not be parsed keep their text in `_corrupt_record`, which is
    always present (null when the line was fine) so that the clean stage can
    quarantine them.
    """
    schema = None
    if src.format == "json" and not src.infer_schema:
        # Inference is a full extra pass over the input (a fifth of ingest at
        # 10M events); the mapped columns are known, and all of them are read
        # as text so that a bad value is quarantined later, never a failed read.
        schema = mapped_schema(src)
    try:
        if src.format == "csv":
            df = _read_csv_counting_fields(spark, src)
        else:
            df = _reader(spark, src.format, src.options, schema).load(src.path)
        if schema is not None:
            _check_json_sample(spark, src)
    except SparkrecError:
        raise
    except Exception as exc:  # Spark raises AnalysisException subclasses with long texts
        raise InputError(f"cannot read source.path {src.path!r} as {src.format}: {str(exc).splitlines()[0]}") from exc
    if C.CORRUPT_RECORD not in df.columns:
        df = df.withColumn(C.CORRUPT_RECORD, F.lit(None).cast(StringType()))
    needed = [c for c in src.columns.model_dump().values() if c]
    data_cols = [c for c in df.columns if c != C.CORRUPT_RECORD]
    required = [src.columns.user_id, src.columns.item_id, src.columns.timestamp, src.columns.event_type, src.columns.invoice]
    missing = [c for c in required if c and c not in data_cols]
    if missing:
        raise MissingColumnError(f"source {src.path}", missing, data_cols)
    for c in needed:
        if c not in data_cols:
            # JSON infers columns from the lines present: an optional field no
            # line carries is absent, which is not an error.
            log.warning("source %s has no column %r (optional): treating it as empty", src.path, c)
            df = df.withColumn(c, F.lit(None).cast(StringType()))
    return df.withColumn(C.SOURCE_FILE, F.col("_metadata.file_path"))


def mapped_schema(src: InputConfig) -> StructType:
    """The mapped input columns, all as text, and `_corrupt_record`: what a row is read as when no
    schema is inferred (a bad value becomes a quarantined row, never a failed read)."""
    mapped = list(dict.fromkeys(c for c in src.columns.model_dump().values() if c))
    return StructType([StructField(c, StringType()) for c in mapped] + [StructField(C.CORRUPT_RECORD, StringType())])


def read_stream(spark: SparkSession, cfg: Config) -> DataFrame:
    """The live events as a streaming DataFrame: the mapped columns as text, `_corrupt_record`, and lineage.

    A Kafka message's value is one JSON event; what is not JSON keeps its text in `_corrupt_record` and
    is quarantined by clean like a malformed line of a file. Each row carries where it came from
    (`_source_file` = kafka:<topic>/<partition>, `_raw_key` = ...@<offset>: unique per message, so a
    message read twice is the same row) and when it arrived (`_arrived_at`).
    """
    src, live = cfg.source, cfg.stream.source
    schema = mapped_schema(src)
    if live.kind == "kafka":
        reader = (spark.readStream.format("kafka").option("kafka.bootstrap.servers", live.bootstrap_servers)
                  .option("subscribe", live.topic).option("startingOffsets", live.starting_offsets)
                  .option("failOnDataLoss", "true"))
        if live.max_offsets_per_trigger:
            reader = reader.option("maxOffsetsPerTrigger", str(live.max_offsets_per_trigger))
        for k, v in live.options.items():
            reader = reader.option(k, v)
        msgs = reader.load()
        parsed = F.from_json(F.col("value").cast("string"), schema,
                             {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": C.CORRUPT_RECORD, "primitivesAsString": "true"})
        origin = F.concat(F.lit("kafka:"), F.col("topic"), F.lit("/"), F.col("partition").cast("string"))
        return msgs.select(
            *[parsed[f.name].alias(f.name) for f in schema.fields],
            origin.alias(C.SOURCE_FILE),
            F.concat(origin, F.lit("@"), F.col("offset").cast("string")).alias(C.RAW_KEY),
            F.col("timestamp").alias(C.ARRIVED_AT),
        )
    if src.format != "json":
        raise InputError(f"stream.source.kind 'files' reads JSON lines (source.format json), not {src.format!r}")
    reader = spark.readStream.format("json").schema(schema).option("maxFilesPerTrigger", str(live.max_files_per_trigger))
    reader = reader.option("primitivesAsString", "true").option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", C.CORRUPT_RECORD)
    for k, v in {**src.options, **live.options}.items():
        reader = reader.option(k, v)
    rows = reader.load(live.path)
    return rows.select(
        *[F.col(f"`{f.name}`") for f in schema.fields],
        F.col("_metadata.file_path").alias(C.SOURCE_FILE),
        F.lit(None).cast(StringType()).alias(C.RAW_KEY),  # numbered per file by ingest.with_lineage
        F.col("_metadata.file_modification_time").alias(C.ARRIVED_AT),
    )


def _read_csv_counting_fields(spark: SparkSession, src: InputConfig) -> DataFrame:
    """Read a CSV source with every header column as text and `_corrupt_record` in the schema.

    Without a corrupt-record column Spark's CSV reader pads a short line with
    nulls and silently cuts a long one. With the column in the schema it puts
    the whole line there whenever its field count differs from the header (a
    shifted layout, an unclosed quote, a quoted field broken by a newline), and
    clean quarantines such a line as `malformed_line`, text and all.
    """
    header = [c for c in _reader(spark, "csv", src.options).load(src.path).columns if c != C.CORRUPT_RECORD]
    schema = StructType([StructField(c, StringType()) for c in [*header, C.CORRUPT_RECORD]])
    return _reader(spark, "csv", src.options, schema).load(src.path)


def _check_json_sample(spark: SparkSession, src: InputConfig, lines: int = 1000) -> None:
    """Fail early when the input's first lines carry none of a required field.

    With a given schema a misnamed field would read as all nulls and every row
    would be quarantined; inferring from a sample of lines costs one small read
    instead of a pass over the whole input.
    """
    sample = spark.read.format("text").load(src.path).limit(lines)
    keys = sample.select(F.explode(F.json_object_keys("value")).alias("k")).distinct().collect()  # bounded: field names
    seen = sorted(r["k"] for r in keys)
    required = [src.columns.user_id, src.columns.item_id, src.columns.timestamp, src.columns.event_type, src.columns.invoice]
    missing = [c for c in required if c and c not in seen]
    if missing:
        raise MissingColumnError(f"source {src.path} (first {lines} lines)", missing, [c for c in seen if c != C.CORRUPT_RECORD])


def read_items_source(spark: SparkSession, items: ItemsConfig) -> DataFrame | None:
    """Read the optional item table and map it to canonical item columns."""
    if not items.path:
        return None
    try:
        df = _reader(spark, items.format, items.options).load(items.path)
    except Exception as exc:
        raise InputError(f"cannot read items.path {items.path!r} as {items.format}: {str(exc).splitlines()[0]}") from exc
    mapping = {k: v for k, v in items.columns.model_dump().items() if v}
    require_columns(df, f"items {items.path}", list(mapping.values()))
    return df.select(*[F.col(src).alias(dst) for dst, src in mapping.items()])

"""Builders for tiny raw tables, shaped as the ingest stage leaves them."""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from sparkrec.batch.ingest import with_lineage
from sparkrec.core import columns as C

EVENT_FIELDS = ["event_id", "user_id", "item_id", "event_type", "timestamp", "rating", "quantity", "price"]


def raw_events(spark: SparkSession, rows: list[tuple], source: str = "file:/in/a.json", corrupt: list[str | None] | None = None) -> DataFrame:
    """Clickstream rows (all strings, as the JSON reader gives them) with lineage added."""
    schema = StructType([StructField(f, StringType(), True) for f in EVENT_FIELDS] + [StructField(C.CORRUPT_RECORD, StringType(), True)])
    corrupt = corrupt or [None] * len(rows)
    df = spark.createDataFrame([tuple(r) + (c,) for r, c in zip(rows, corrupt)], schema)
    return with_lineage(df.withColumn(C.SOURCE_FILE, F.lit(source)), run_id="test-run")

"""The item table: the shop's item file made canonical, or, without one, items derived from what the
clean kept (each item's newest price and name, kept as `clean_item_latest` so the incremental clean
can tell whether a later row is newer)."""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import NumericType

from sparkrec.batch.clean import ITEM_NAME_COLUMN, clean_id
from sparkrec.core import columns as C


def item_latest(rows: DataFrame) -> DataFrame:
    """Per item: its kept rows, newest price and newest name with the (time, key) they came from: `clean_item_latest`.

    The derived item table (no item file) is a projection of this; keeping the
    time and key lets the incremental clean decide whether a later batch's price
    is newer, and the count says when an item has no kept row left. One
    aggregate, not a window per field. Rows without the input's item name
    column count as nameless.
    """
    if ITEM_NAME_COLUMN not in rows.columns:
        rows = rows.withColumn(ITEM_NAME_COLUMN, F.lit(None).cast("string"))

    def newest(value: str, alias: str) -> Column:
        # The smallest (-time, key) is the newest row, ties to the smaller key; rows without the value are skipped.
        order = F.struct((-F.unix_micros(C.EVENT_TS)).alias("n"), F.col(C.RAW_KEY).alias("k"), F.col(value).alias("v"))
        return F.min(F.when(F.col(value).isNotNull(), order)).alias(alias)

    found = rows.groupBy(C.ITEM_ID).agg(
        F.count(F.lit(1)).alias(C.EVENTS), newest(C.PRICE, "_p"), newest(ITEM_NAME_COLUMN, "_n")
    )
    return found.select(
        C.ITEM_ID, C.EVENTS,
        *[F.col(f"{s}.{f}").alias(a) for s, name in (("_p", "price"), ("_n", "name"))
          for f, a in (("v", name), ("n", f"{name}_ts"), ("k", f"{name}_key"))],
    ).withColumn("price_ts", F.timestamp_micros(-F.col("price_ts"))).withColumn("name_ts", F.timestamp_micros(-F.col("name_ts")))


def items_of_latest(latest: DataFrame) -> DataFrame:
    """The derived item table from `clean_item_latest` (`ITEMS` columns)."""
    return latest.where(F.col(C.EVENTS) > 0).select(
        C.ITEM_ID, F.lit(None).cast("string").alias(C.CATEGORY), F.col("price").alias(C.PRICE),
        F.lit(True).alias(C.AVAILABLE), F.col("name").alias(C.ITEM_NAME),
    )


def items_from_interactions(interactions: DataFrame) -> DataFrame:
    """An item table when the shop gave none: every item seen, its latest price and name, available."""
    return items_of_latest(item_latest(interactions))


def normalize_items(items: DataFrame) -> DataFrame:
    """Canonical item table from a shop's item file: one row per item id."""
    cols = items.columns
    price = F.expr(f"try_cast(`{C.PRICE}` AS DOUBLE)") if C.PRICE in cols else F.lit(None).cast("double")
    if C.AVAILABLE in cols:
        text = F.lower(F.trim(F.col(C.AVAILABLE).cast("string")))
        available = F.when(text.isin("false", "0", "no", "n", "f"), F.lit(False)).otherwise(F.lit(True))
    else:
        available = F.lit(True)
    category = F.trim(F.col(C.CATEGORY).cast("string")) if C.CATEGORY in cols else F.lit(None).cast("string")
    named = []
    if C.ITEM_NAME in cols:  # only when the shop's item file maps a name (items.columns.name)
        name = F.trim(F.col(C.ITEM_NAME).cast("string"))
        named = [F.when(name == "", None).otherwise(name).alias(C.ITEM_NAME)]
    out = items.select(
        clean_id(F.col(C.ITEM_ID), isinstance(items.schema[C.ITEM_ID].dataType, NumericType)).alias(C.ITEM_ID),
        category.alias(C.CATEGORY),
        price.alias(C.PRICE),
        available.alias(C.AVAILABLE),
        *named,
    ).where(F.col(C.ITEM_ID).isNotNull())
    w = Window.partitionBy(C.ITEM_ID).orderBy(F.col(C.CATEGORY).asc_nulls_last(), F.col(C.PRICE).asc_nulls_last())
    return out.withColumn("_rn", F.row_number().over(w)).where("_rn = 1").drop("_rn")

"""Stable integer ids for ALS: a key keeps its id forever, new keys get new ids.

Ids are assigned densely from the current maximum in key order, so two runs
on the same data assign the same ids and no two keys can collide (unlike
hashing). The new rows are written with an insert-only MERGE on the key,
which makes a re-run add nothing.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkrec.core.errors import StageError

MAX_ALS_ID = 2**31 - 1  # MLlib ALS ids are Java ints
_POS = "_pos"
_PART_SHIFT = 33  # monotonically_increasing_id: partition index above bit 33, row within the partition below


def next_id(existing: DataFrame, idx_col: str) -> int:
    """The first free id of an id table: its maximum plus one (0 when empty)."""
    top = existing.agg(F.max(idx_col)).first()[0]
    return 0 if top is None else int(top) + 1


def new_ids(keys: DataFrame, existing: DataFrame | None, key_col: str, idx_col: str, offset: int = 0) -> DataFrame:
    """Ids from `offset` on for the keys in `keys` that `existing` does not have yet.

    Args:
        keys: any DataFrame with `key_col` (duplicates and nulls are ignored).
        existing: the current id table (`key_col`, `idx_col`), or None.
        offset: the first free id, `next_id(existing, idx_col)`.
    Returns:
        (`key_col`, `idx_col`) rows for the new keys only.
    """
    distinct = keys.select(key_col).where(F.col(key_col).isNotNull()).distinct()
    if existing is not None:
        distinct = distinct.join(existing.select(key_col), key_col, "left_anti")
    # A window ordered over all new keys would pull them into one partition
    # (on a first run: every user). Instead the keys are range-partitioned and
    # sorted, each row's place inside its partition comes from
    # monotonically_increasing_id, and each partition starts where the earlier
    # ones end. Materialised first, so the partition sizes counted are those of
    # the rows numbered, and the result reads that copy (callers need not keep one).
    ordered = distinct.orderBy(key_col).withColumn(_POS, F.monotonically_increasing_id()).localCheckpoint(eager=True)
    part = F.shiftright(F.col(_POS), _PART_SHIFT)
    sizes = sorted((r["_part"], r["count"]) for r in ordered.groupBy(part.alias("_part")).count().collect())
    starts, start = [], offset
    for p, size in sizes:  # one row per partition: bounded
        starts.append((p, start))
        start += size
    start_of = keys.sparkSession.createDataFrame(starts, "_part long, _start long")
    within = F.col(_POS).bitwiseAND(F.lit((1 << _PART_SHIFT) - 1))
    return (
        ordered.withColumn("_part", part)
        .join(F.broadcast(start_of), "_part")
        .select(key_col, (F.col("_start") + within).cast("int").alias(idx_col))
    )


def check_id_space(offset: int, new_count: int, what: str) -> None:
    """Fail before writing when the new ids would pass MLlib's int range."""
    top = offset + new_count - 1
    if top > MAX_ALS_ID:
        raise StageError(f"{what}: new ids up to {top:,} exceed the largest id MLlib ALS accepts ({MAX_ALS_ID:,})")

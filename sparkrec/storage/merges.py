"""Every MERGE into a Delta table: insert-only, change sets (update, insert, delete by a flag), sums
stamped with their batch, per-customer list replacement, and erasure.

A MERGE is one commit, so a reader sees all of its changes or none; each is
written so that running it again with the same source changes nothing more,
which is what makes a re-run after a crash safe. Conditions name columns only
(`t.x = s.x`), never values, so no user key lands in a table's log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkrec.core import columns as C
from sparkrec.core.config import Config
from sparkrec.storage.tables import (
    WRITE_ATTEMPTS,
    commit_metrics,
    current_version,
    retrying,
    table_exists,
    version_after_write,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeResult:
    """The table version after an insert-only MERGE, rows inserted, and source rows when Delta counted them."""

    version: int
    inserted: int
    source_rows: int | None = None


def merge_new_rows(
    df: DataFrame,
    cfg: Config,
    key: str,
    on: list[str],
    *,
    properties: dict[str, str] | None = None,
    evolve_schema: bool = False,
    retry_conflicts: bool = True,
    target_where: Column | None = None,
) -> MergeResult:
    """Insert the rows of `df` whose `on` key is not in the table yet (insert-only MERGE).

    Running it again with the same `df` inserts nothing (and Delta commits
    nothing), which is what makes ingest and id assignment safe to re-run.
    `evolve_schema` lets a new input column extend the table. Pass
    `retry_conflicts=False` when `df` was derived from the table itself (new
    ids numbered after its maximum): re-running it after another writer's
    commit could hand out ids that writer just used, so such a conflict fails.
    `target_where` is a condition on the target alone (`t.` columns) that every
    row with a key of `df` meets: Delta then reads only the files whose
    statistics allow it, instead of the whole table.

    Example:
        result = merge_new_rows(new_ids_df, cfg, C.USER_IDS, on=[C.USER_ID])
    """
    attempts = WRITE_ATTEMPTS if retry_conflicts else 1
    return retrying(cfg.table_name(key), lambda: _merge_once(df, cfg, key, on, properties, evolve_schema, target_where),
                     attempts)


def _merge_once(
    df: DataFrame, cfg: Config, key: str, on: list[str], properties: dict[str, str] | None, evolve_schema: bool,
    target_where: Column | None = None,
) -> MergeResult:
    spark = df.sparkSession
    path = cfg.table_path(key)
    if not table_exists(spark, path):
        writer = df.write.format("delta").mode("errorifexists")
        for k, v in (properties or {}).items():
            writer = writer.option(k, v)
        try:
            writer.save(path)
            version = version_after_write(spark, path)
            written = commit_metrics(spark, path, version).get("numOutputRows", 0)
            return MergeResult(version, written, written)
        except Exception as exc:  # another writer created it first: fall through to MERGE
            if not table_exists(spark, path):
                raise
            log.info("table %s appeared while creating it (%s); merging instead", path, type(exc).__name__)
    target = DeltaTable.forPath(spark, path)
    cond = _key_condition(on) if target_where is None else _key_condition(on) & target_where
    builder = target.alias("t").merge(df.alias("s"), cond).whenNotMatchedInsertAll()
    if evolve_schema:
        builder = builder.withSchemaEvolution()
    before = current_version(spark, path)
    metrics = builder.execute().first()
    inserted = int(metrics["num_inserted_rows"]) if metrics is not None else 0
    version = version_after_write(spark, path)
    # A MERGE that inserts nothing commits nothing, so only a new commit's metrics describe this source.
    source_rows = commit_metrics(spark, path, version).get("numSourceRows") if version != before else None
    return MergeResult(version, inserted, source_rows)


def _create_if_missing(df: DataFrame, cfg: Config, key: str, properties: dict[str, str] | None) -> MergeResult | None:
    """Write `df` as the table when there is none yet (None when the table exists or another writer created it)."""
    spark, path = df.sparkSession, cfg.table_path(key)
    if table_exists(spark, path):
        return None
    writer = df.write.format("delta").mode("errorifexists")
    for k, v in (properties or {}).items():
        writer = writer.option(k, v)
    try:
        writer.save(path)
    except Exception as exc:
        if not table_exists(spark, path):
            raise
        log.info("table %s appeared while creating it (%s); merging instead", path, type(exc).__name__)
        return None
    version = version_after_write(spark, path)
    written = commit_metrics(spark, path, version).get("numOutputRows", 0)
    return MergeResult(version, written, written)


def _merge_result(spark: SparkSession, path: str, before: int | None, metrics) -> MergeResult:
    version = version_after_write(spark, path)
    inserted = int(metrics["num_inserted_rows"]) if metrics is not None else 0
    source_rows = commit_metrics(spark, path, version).get("numSourceRows") if version != before else None
    return MergeResult(version, inserted, source_rows)


def _key_condition(on: list[str]) -> Column:
    cond: Column | None = None
    for c in on:
        term = F.col(f"t.`{c}`") == F.col(f"s.`{c}`")
        cond = term if cond is None else cond & term
    assert cond is not None
    return cond


DROP_FLAG = C.DROP_FLAG


def _change_merge(df: DataFrame, cfg: Config, key: str, on: list[str], update: bool,
                  target_where: Column | None, properties: dict[str, str] | None) -> tuple[MergeResult, int]:
    spark, path = df.sparkSession, cfg.table_path(key)
    columns = [c for c in df.columns if c != DROP_FLAG]
    created = _create_if_missing(df.where(~F.col(DROP_FLAG)).select(*columns), cfg, key, properties)
    if created is not None:
        return created, 0
    cond = _key_condition(on) if target_where is None else _key_condition(on) & target_where
    values = {f"`{c}`": F.col(f"s.`{c}`") for c in columns}
    drop = F.col(f"s.{DROP_FLAG}")
    builder = DeltaTable.forPath(spark, path).alias("t").merge(df.alias("s"), cond).whenMatchedDelete(drop)
    if update:
        builder = builder.whenMatchedUpdate(set=values)
    builder = builder.whenNotMatchedInsert(~drop, values)
    before = current_version(spark, path)
    metrics = builder.execute().first()
    deleted = int(metrics["num_deleted_rows"]) if metrics is not None else 0
    return _merge_result(spark, path, before, metrics), deleted


def upsert(
    df: DataFrame, cfg: Config, key: str, on: list[str], *,
    target_where: Column | None = None, properties: dict[str, str] | None = None,
) -> tuple[MergeResult, int]:
    """Make the table's rows for the keys of `df` equal to `df`'s in one MERGE: update, insert, or delete
    where the source row's `DROP_FLAG` is set. The rows are absolute values: a second run changes nothing.

    Args:
        target_where: a condition on the target alone (`t.` columns) that every matching row meets;
            Delta skips the files that cannot hold one (an event-time range, a run id).
    Returns:
        (the MERGE's result, rows deleted).
    """
    return retrying(cfg.table_name(key), lambda: _change_merge(df, cfg, key, on, True, target_where, properties))


def apply_changes(
    df: DataFrame, cfg: Config, key: str, on: list[str], *,
    target_where: Column | None = None, properties: dict[str, str] | None = None,
) -> tuple[MergeResult, int]:
    """Insert the source rows whose key is absent and delete the rows matched by a source row with `DROP_FLAG`
    set: one MERGE, so readers see both changes or neither, and a re-run changes nothing more.

    Returns:
        (the MERGE's result, rows deleted).
    """
    return retrying(cfg.table_name(key), lambda: _change_merge(df, cfg, key, on, False, target_where, properties))


def merge_deltas(
    df: DataFrame, cfg: Config, key: str, on: list[str], *, batch: str,
    updates: dict[str, Column], delete_when: Column, insert_when: Column, inserts: dict[str, Column],
    properties: dict[str, str] | None = None,
) -> MergeResult:
    """Add a batch's deltas to a table of sums in one MERGE: `updates` and `delete_when` are expressions of the
    target (`t.`) and source (`s.`) rows, `inserts` the values of a new key.

    Sums are not absolute rows, so a second application must not add again: every row the MERGE changes
    takes the source's `batch` column, and a target row that already carries it is left alone.
    """
    guard = ~F.col(f"t.`{batch}`").eqNullSafe(F.col(f"s.`{batch}`"))

    def run() -> MergeResult:
        spark, path = df.sparkSession, cfg.table_path(key)
        created = _create_if_missing(df.alias("s").where(insert_when).select(*[v.alias(k) for k, v in inserts.items()]),
                                     cfg, key, properties)
        if created is not None:
            return created
        builder = (
            DeltaTable.forPath(spark, path).alias("t").merge(df.alias("s"), _key_condition(on))
            .whenMatchedDelete(guard & delete_when)
            .whenMatchedUpdate(guard, set={f"`{k}`": v for k, v in updates.items()})
            .whenNotMatchedInsert(insert_when, {f"`{k}`": v for k, v in inserts.items()})
        )
        before = current_version(spark, path)
        return _merge_result(spark, path, before, builder.execute().first())

    return retrying(cfg.table_name(key), run)


def replace_lists(df: DataFrame, cfg: Config, key: str, max_rank: int, *, properties: dict[str, str] | None = None) -> int:
    """Make the listed users' rows of a list table equal to `df`'s in one MERGE (`upsert` by (user, rank)): their
    ranks are updated or inserted, and the ranks up to `max_rank` a shorter list no longer has are deleted. Other
    users' rows are left alone. No user key is written into the table's log (the condition names columns only).
    Returns the table's version after it."""
    spark = df.sparkSession
    users = df.select(C.USER_ID).distinct()
    ranks = spark.range(1, max_rank + 1).select(F.col("id").cast("int").alias(C.RANK))
    stale = (users.crossJoin(ranks).join(df.select(C.USER_ID, C.RANK), [C.USER_ID, C.RANK], "left_anti")
             .withColumn(DROP_FLAG, F.lit(True)))
    changes = df.withColumn(DROP_FLAG, F.lit(False)).unionByName(stale, allowMissingColumns=True)
    result, _ = upsert(changes, cfg, key, [C.USER_ID, C.RANK], properties=properties)
    return result.version


def delete_matching(spark: SparkSession, cfg: Config, key: str, keys: DataFrame, on: list[str]) -> int:
    """Delete the rows whose `on` columns equal a row of `keys`; returns the rows deleted (0: no table).

    A MERGE, not `DELETE WHERE x IN (...)`: the commit records the predicate it ran, and a MERGE's is
    `t.x = s.x`, so the values being erased are not written into the table's log.
    """
    path = cfg.table_path(key)
    if not table_exists(spark, path):
        return 0

    def run() -> int:
        metrics = DeltaTable.forPath(spark, path).alias("t").merge(keys.alias("s"), _key_condition(on)).whenMatchedDelete().execute().first()
        return int(metrics["num_deleted_rows"]) if metrics is not None else 0

    return retrying(cfg.table_name(key), run)

"""Every read and write of a Delta table.

Stages never call `spark.read` or `.write` on a table themselves; they ask
this module, which knows where each table lives, how to make a write atomic
(Delta overwrite or MERGE, retried when another writer won the race), and
which table version was read or written so the run can record it. Raw input
files are read by `sources`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkrec.core import columns as C
from sparkrec.core.config import Config
from sparkrec.core.errors import StageError

log = logging.getLogger(__name__)

# Delta's optimistic concurrency: a writer whose commit loses the race to another gets one
# of these; re-running the write is safe for every write here (overwrites recompute, MERGEs
# insert only what is missing, run records are appends).
_CONFLICTS = (
    "ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException", "ConcurrentWriteException", "MetadataChangedException",
    "ProtocolChangedException", "FileAlreadyExistsException", "DELTA_CONCURRENT", "DELTA_METADATA_CHANGED",
    "DELTA_PROTOCOL_CHANGED",
)
WRITE_ATTEMPTS = 4


def _is_conflict(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(name in text for name in _CONFLICTS)


def _retrying(table: str, write, attempts: int = WRITE_ATTEMPTS):
    """Run `write`; when another writer committed to the table first, back off and run it again.

    Raises:
        StageError: still conflicting after `attempts` attempts (names the table).
    """
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except Exception as exc:
            if not _is_conflict(exc):
                raise
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            if attempt == attempts:
                raise StageError(
                    f"table '{table}' was changed by another writer during this run ({attempt} attempt(s): {reason}). "
                    "Run one job per table at a time (e.g. Airflow max_active_runs=1), then run the stage again"
                ) from exc
            delay = 0.5 * 2 ** (attempt - 1) + random.random() * 0.5
            log.warning("table %s: another writer committed first (%s); writing again in %.1fs (attempt %d of %d)",
                        table, reason, delay, attempt + 1, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class TableRead:
    """A DataFrame pinned to the Delta version it was read at."""

    df: DataFrame
    version: int


# --------------------------------------------------------------------------- Delta tables


def _hadoop(spark: SparkSession, path: str):
    """(file system, Hadoop path) for `path`, so local and remote paths are handled alike."""
    hpath = spark.sparkContext._jvm.org.apache.hadoop.fs.Path(path)
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath


def table_exists(spark: SparkSession, path: str) -> bool:
    return DeltaTable.isDeltaTable(spark, path)


def current_version(spark: SparkSession, path: str) -> int | None:
    """The table's latest committed version, or None when there is no Delta table at `path`.

    Every commit N is the file _delta_log/<N zero-padded>.json, written
    atomically, and log cleanup only ever removes old ones, so one listing of
    the log answers this. (Asking Delta for the table's history ran a Spark
    job per call: about a second each, a dozen times per stage.)
    """
    fs, log_dir = _hadoop(spark, f"{path.rstrip('/')}/_delta_log")
    if not fs.exists(log_dir):
        return None
    latest = -1
    for status in fs.listStatus(log_dir):
        name = status.getPath().getName()
        if name.endswith(".json") and name[:-5].isdigit():
            latest = max(latest, int(name[:-5]))
    if latest >= 0:
        return latest
    if not table_exists(spark, path):
        return None
    row = DeltaTable.forPath(spark, path).history(1).select("version").first()
    return int(row["version"]) if row else None


def read_table(
    spark: SparkSession, cfg: Config, key: str, *, required: bool = True, version: int | None = None
) -> TableRead | None:
    """Read a table at a pinned version (the latest unless `version` is given), so the version recorded is the one used.

    Raises:
        StageError: the table does not exist and `required` is set.
    """
    path = cfg.table_path(key)
    latest = current_version(spark, path)
    if version is None or latest is None:
        version = latest
    if version is None:
        if required:
            raise StageError(
                f"table '{cfg.table_name(key)}' does not exist at {path}; run the stage that writes it first"
            )
        return None
    df = spark.read.format("delta").option("versionAsOf", version).load(path)
    return TableRead(df, version)


def read_required(spark: SparkSession, cfg: Config, key: str, *, version: int | None = None) -> TableRead:
    """`read_table` for a table that must exist. Raises StageError naming it when it does not."""
    read = read_table(spark, cfg, key, version=version)
    assert read is not None  # required=True raises instead
    return read


def overwrite_table(df: DataFrame, cfg: Config, key: str, *, properties: dict[str, str] | None = None) -> int:
    """Replace a table's content in one Delta commit; readers see old or new, never half.

    Example:
        version = overwrite_table(recs_df, cfg, C.RECOMMENDATIONS)
    """
    path = cfg.table_path(key)
    writer = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
    for k, v in (properties or {}).items():
        writer = writer.option(k, v)
    _retrying(cfg.table_name(key), lambda: writer.save(path))
    return _version_after_write(df.sparkSession, path)


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
    return _retrying(cfg.table_name(key), lambda: _merge_once(df, cfg, key, on, properties, evolve_schema, target_where),
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
            version = _version_after_write(spark, path)
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
    version = _version_after_write(spark, path)
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
    version = _version_after_write(spark, path)
    written = commit_metrics(spark, path, version).get("numOutputRows", 0)
    return MergeResult(version, written, written)


def _merge_result(spark: SparkSession, path: str, before: int | None, metrics) -> MergeResult:
    version = _version_after_write(spark, path)
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
    return _retrying(cfg.table_name(key), lambda: _change_merge(df, cfg, key, on, True, target_where, properties))


def apply_changes(
    df: DataFrame, cfg: Config, key: str, on: list[str], *,
    target_where: Column | None = None, properties: dict[str, str] | None = None,
) -> tuple[MergeResult, int]:
    """Insert the source rows whose key is absent and delete the rows matched by a source row with `DROP_FLAG`
    set: one MERGE, so readers see both changes or neither, and a re-run changes nothing more.

    Returns:
        (the MERGE's result, rows deleted).
    """
    return _retrying(cfg.table_name(key), lambda: _change_merge(df, cfg, key, on, False, target_where, properties))


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

    return _retrying(cfg.table_name(key), run)


def read_inserts(spark: SparkSession, cfg: Config, key: str, after_version: int, to_version: int) -> DataFrame:
    """The rows inserted into a table in versions (after_version, to_version], from Delta's change data feed.

    Raises:
        StageError: the change feed does not cover the range (it was enabled later, or those versions were cleaned up).
    """
    path = cfg.table_path(key)
    try:
        changes = (
            spark.read.format("delta").option("readChangeFeed", "true")
            .option("startingVersion", after_version + 1).option("endingVersion", to_version).load(path)
        )
        # Resolving the range is lazy in part; asking for the schema and plan here surfaces a gap now.
        changes.limit(0).collect()
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise StageError(f"table '{cfg.table_name(key)}': no change data for versions {after_version + 1}-{to_version}: {reason}") from None
    meta = [c for c in changes.columns if c.startswith("_change_type") or c in ("_commit_version", "_commit_timestamp")]
    return changes.where(F.col("_change_type") == "insert").drop(*meta)


def operations_between(spark: SparkSession, cfg: Config, key: str, after_version: int, to_version: int) -> list[tuple[int, str, dict]]:
    """(version, operation, parameters) of a table's commits in (after_version, to_version], oldest first."""
    rows = (
        DeltaTable.forPath(spark, cfg.table_path(key)).history()
        .where((F.col("version") > after_version) & (F.col("version") <= to_version))
        .select("version", "operation", "operationParameters").collect()
    )
    return sorted((int(r["version"]), str(r["operation"]), dict(r["operationParameters"] or {})) for r in rows)


def table_properties(spark: SparkSession, cfg: Config, key: str) -> dict[str, str] | None:
    """The table's properties (None when the table does not exist)."""
    path = cfg.table_path(key)
    if not table_exists(spark, path):
        return None
    return dict(DeltaTable.forPath(spark, path).detail().select("properties").first()[0] or {})


def sql_path(path: str) -> str:
    """A table path as SQL's delta.`...` needs it: a relative local path (`./warehouse`, the demo's) made absolute.

    The DataFrame API resolves relative paths; SQL's path identifier does not (the table is "not found").
    """
    if "://" in path or path.startswith(("/", "file:")):
        return path
    return os.path.abspath(path)


def ensure_properties(spark: SparkSession, cfg: Config, key: str, properties: dict[str, str]) -> bool:
    """Set table properties the table lacks (one ALTER commit, only when needed); True when it changed them."""
    path = cfg.table_path(key)
    if not table_exists(spark, path):
        return False
    current = DeltaTable.forPath(spark, path).detail().select("properties").first()[0] or {}
    missing = {k: v for k, v in properties.items() if current.get(k) != v}
    if not missing:
        return False
    assignments = ", ".join(f"'{k}' = '{v}'" for k, v in sorted(missing.items()))
    _retrying(cfg.table_name(key), lambda: spark.sql(f"ALTER TABLE delta.`{sql_path(path)}` SET TBLPROPERTIES ({assignments})"))
    return True


def scratch_path(cfg: Config, name: str) -> str:
    """A working table of the warehouse that no reader uses (`_work/<name>`)."""
    return f"{cfg.warehouse.rstrip('/')}/_work/{name}"


def write_scratch(df: DataFrame, cfg: Config, name: str) -> None:
    """Overwrite the working files `name` with `df` (Parquet: no reader but the stage itself, which
    records elsewhere, once they are all written, that they are complete)."""
    df.write.mode("overwrite").parquet(scratch_path(cfg, name))


def read_scratch(spark: SparkSession, cfg: Config, name: str) -> DataFrame:
    return spark.read.parquet(scratch_path(cfg, name))


def append_rows(df: DataFrame, cfg: Config, key: str, *, properties: dict[str, str] | None = None) -> int:
    """Append in one commit (creating the table, with `properties`, when there is none); returns its version."""
    path = cfg.table_path(key)
    writer = df.write.format("delta").mode("append").option("mergeSchema", "true")
    if not table_exists(df.sparkSession, path):
        for k, v in (properties or {}).items():
            writer = writer.option(k, v)
    _retrying(cfg.table_name(key), lambda: writer.save(path))
    return _version_after_write(df.sparkSession, path)


def append_once(df: DataFrame, cfg: Config, key: str, app_id: str, batch: int, *,
                properties: dict[str, str] | None = None) -> int | None:
    """Append in one commit unless this (app_id, batch) was committed to the table already; returns the new
    version, or None when Delta skipped the write as a repeat.

    Delta's idempotent write: `txnAppId`/`txnVersion` go on this writer only (the session-wide settings would
    stay set after the write and silently skip later writes), so a micro-batch replayed after a crash
    appends nothing the first attempt already committed.
    """
    spark, path = df.sparkSession, cfg.table_path(key)
    before = current_version(spark, path)
    writer = (df.write.format("delta").mode("append").option("mergeSchema", "true")
              .option("txnAppId", app_id).option("txnVersion", str(batch)))
    if before is None:
        for k, v in (properties or {}).items():
            writer = writer.option(k, v)
    _retrying(cfg.table_name(key), lambda: writer.save(path))
    after = _version_after_write(spark, path)
    return None if after == before else after


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


def compact(spark: SparkSession, cfg: Config, key: str) -> dict[str, int]:
    """Rewrite a table's small files into few large ones (Delta OPTIMIZE): frequent small commits (a stream's)
    would otherwise make every read and MERGE open more files through the day. Readers are not disturbed."""
    path = cfg.table_path(key)
    if not table_exists(spark, path):
        return {}
    row = DeltaTable.forPath(spark, path).optimize().executeCompaction().first()
    metrics = row["metrics"] if row is not None else None
    return {"files_removed": int(metrics["numFilesRemoved"]), "files_added": int(metrics["numFilesAdded"])} if metrics else {}


def current_recommendations(spark: SparkSession, cfg: Config) -> DataFrame:
    """Each customer's current list: the newer of the stream's (`live_recommendations`) and the batch's
    (`recommendations`), by `generated_at`, with `origin` saying which ("live" or "batch").

    The two tables are written by different jobs and never by both, so neither write can fail or be
    overwritten by the other; a reader decides per customer. A batch list generated after a live one
    (it read the interactions the stream had cleaned by then) replaces it, and a live list replaces the
    batch list it is newer than.
    """
    batch = read_table(spark, cfg, C.RECOMMENDATIONS, required=False)
    live = read_table(spark, cfg, C.LIVE_RECOMMENDATIONS, required=False)
    frames = [(r.df, origin) for r, origin in ((batch, "batch"), (live, "live")) if r is not None]
    if not frames:
        raise StageError(f"no recommendations in {cfg.warehouse}: run the pipeline (or the stream) first")
    tagged = [df.withColumn("origin", F.lit(origin)) for df, origin in frames]
    both = tagged[0] if len(tagged) == 1 else tagged[0].unionByName(tagged[1], allowMissingColumns=True)
    newest = both.groupBy(C.USER_ID).agg(F.max_by("origin", F.struct(C.GENERATED_AT, "origin")).alias("_pick"))
    return both.join(newest, C.USER_ID).where(F.col("origin") == F.col("_pick")).drop("_pick")


def _version_after_write(spark: SparkSession, path: str) -> int:
    version = current_version(spark, path)
    if version is None:  # pragma: no cover - a successful write always leaves a version
        raise StageError(f"no Delta version found at {path} after writing it")
    return version


def commit_metrics(spark: SparkSession, path: str, version: int) -> dict[str, int]:
    """Delta's own row counts for one commit (rows written, inserted, source rows ...).

    Read from the commit file itself (its `commitInfo` action), which is one
    small file read on the driver; asking Delta for the table's history ran
    Spark jobs, about a second per call.
    """
    fs, file = _hadoop(spark, f"{path.rstrip('/')}/_delta_log/{version:020d}.json")
    stream = fs.open(file)
    try:
        text = spark.sparkContext._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
    finally:
        stream.close()
    metrics: dict = {}
    for line in text.splitlines():
        if '"commitInfo"' in line:
            metrics = (json.loads(line).get("commitInfo") or {}).get("operationMetrics") or {}
            break
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = int(v)
        except (TypeError, ValueError):
            continue
    return out


def remove_dir(spark: SparkSession, path: str) -> None:
    """Delete a directory through Hadoop's file system, so remote paths work too."""
    fs, hpath = _hadoop(spark, path)
    if fs.exists(hpath):
        fs.delete(hpath, True)


def checkpointed_rdds(spark: SparkSession, path: str) -> int:
    """RDD checkpoints present under a checkpoint directory (Spark writes <dir>/<uuid>/rdd-N)."""
    fs, hpath = _hadoop(spark, path)
    if not fs.exists(hpath):
        return 0
    count = 0
    for top in fs.listStatus(hpath):
        if top.isDirectory():
            count += sum(1 for s in fs.listStatus(top.getPath()) if s.getPath().getName().startswith("rdd-"))
    return count


def checkpoint_dir(cfg: Config, run_id: str) -> str:
    return f"{cfg.checkpoint_root.rstrip('/')}/{run_id}"


def model_path(cfg: Config, model_version: str) -> str:
    return f"{cfg.warehouse.rstrip('/')}/_models/{model_version}"


def restore_table(spark: SparkSession, cfg: Config, key: str, version: int) -> int:
    """Put a table back to an earlier version with Delta's RESTORE (itself a new, atomic commit).

    Raises:
        StageError: the table is missing, or that version is gone (vacuumed) or never existed.
    """
    path = cfg.table_path(key)
    if not table_exists(spark, path):
        raise StageError(f"table '{cfg.table_name(key)}' does not exist at {path}: nothing to restore")
    current = current_version(spark, path)
    if current == version:
        return version
    try:
        DeltaTable.forPath(spark, path).restoreToVersion(version)
    except Exception as exc:
        raise StageError(
            f"cannot restore table '{cfg.table_name(key)}' to version {version}: {str(exc).splitlines()[0]}"
        ) from exc
    return _version_after_write(spark, path)


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write a small text file through Hadoop's file system (local or remote alike), replacing it."""
    fs, hpath = _hadoop(spark, path)
    stream = fs.create(hpath, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


def read_texts(spark: SparkSession, directory: str) -> dict[str, str]:
    """{file name: text} of the small files directly under `directory` (empty when it does not exist)."""
    fs, hdir = _hadoop(spark, directory)
    if not fs.exists(hdir):
        return {}
    io_utils = spark.sparkContext._jvm.org.apache.commons.io.IOUtils
    out = {}
    for status in fs.listStatus(hdir):
        if status.isDirectory():
            continue
        stream = fs.open(status.getPath())
        try:
            out[status.getPath().getName()] = str(io_utils.toString(stream, "UTF-8"))
        finally:
            stream.close()
    return out


def remove_file(spark: SparkSession, path: str) -> None:
    fs, hpath = _hadoop(spark, path)
    if fs.exists(hpath):
        fs.delete(hpath, False)


# --------------------------------------------------------------------------- erasure (`sparkrec forget`)

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

    return _retrying(cfg.table_name(key), run)


def purge_history(spark: SparkSession, cfg: Config, key: str) -> None:
    """Remove deleted rows from the files and the files from the table's history: Delta's REORG ... APPLY (PURGE)
    rewrites files that carry deletion vectors, then VACUUM with no retention removes every file the current
    version does not use (older versions' files, change data, deletion vectors). Time travel to versions
    before this call is gone afterwards.
    """
    path = cfg.table_path(key)
    if not table_exists(spark, path):
        return
    properties = DeltaTable.forPath(spark, path).detail().select("properties").first()[0] or {}
    if properties.get("delta.enableDeletionVectors") == "true":
        spark.sql(f"REORG TABLE delta.`{sql_path(path)}` APPLY (PURGE)")
    check = "spark.databricks.delta.retentionDurationCheck.enabled"
    before = spark.conf.get(check, "true")
    spark.conf.set(check, "false")  # for this call only: a zero retention is refused otherwise
    try:
        # LITE: the files to delete come from the log's remove actions, not a listing of the directory
        # (8x faster here); the erasure test decodes every file left to prove nothing of theirs stayed.
        spark.sql(f"VACUUM delta.`{sql_path(path)}` LITE RETAIN 0 HOURS")
    finally:
        spark.conf.set(check, before)


def model_dirs(spark: SparkSession, cfg: Config) -> list[str]:
    """The saved models under the warehouse's `_models/`."""
    fs, hpath = _hadoop(spark, f"{cfg.warehouse.rstrip('/')}/_models")
    if not fs.exists(hpath):
        return []
    return sorted(str(s.getPath().toString()) for s in fs.listStatus(hpath) if s.isDirectory())


def drop_model_users(spark: SparkSession, model_dir: str, user_idx: DataFrame) -> int:
    """Rewrite a saved ALS model's user factors without the given users (`id` is the user index MLlib saved);
    returns the factor rows removed. The new files are written beside the old ones and swapped in, so a
    crash leaves either the old or the new factors, and a re-run finishes the job."""
    factors = f"{model_dir.rstrip('/')}/userFactors"
    tmp = f"{factors}.forget-tmp"
    fs, hpath = _hadoop(spark, factors)
    _, htmp = _hadoop(spark, tmp)
    if not fs.exists(hpath) and fs.exists(htmp):  # an earlier run stopped between the delete and the rename
        fs.rename(htmp, hpath)
    if not fs.exists(hpath):
        return 0
    old = spark.read.parquet(factors)
    ids = user_idx.select(F.col(C.USER_IDX).alias("id"))
    removed = old.join(F.broadcast(ids), "id", "left_semi").count()
    if not removed:
        return 0
    old.join(F.broadcast(ids), "id", "left_anti").write.mode("overwrite").parquet(tmp)
    fs.delete(hpath, True)
    fs.rename(htmp, hpath)
    return removed

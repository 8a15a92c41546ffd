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
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkrec.core import columns as C
from sparkrec.core.config import Config
from sparkrec.core.errors import StageError
from sparkrec.storage.files import hadoop_path

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


def retrying(table: str, write, attempts: int = WRITE_ATTEMPTS):
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


def table_exists(spark: SparkSession, path: str) -> bool:
    return DeltaTable.isDeltaTable(spark, path)


def current_version(spark: SparkSession, path: str) -> int | None:
    """The table's latest committed version, or None when there is no Delta table at `path`.

    Every commit N is the file _delta_log/<N zero-padded>.json, written
    atomically, and log cleanup only ever removes old ones, so one listing of
    the log answers this. (Asking Delta for the table's history ran a Spark
    job per call: about a second each, a dozen times per stage.)
    """
    fs, log_dir = hadoop_path(spark, f"{path.rstrip('/')}/_delta_log")
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


def frame_from_pandas(spark: SparkSession, pdf, schema: str) -> DataFrame:
    """A bounded pandas frame (a plan, one row per item) as a DataFrame, converted through Arrow.

    Arrow is switched on for this conversion only: row by row, 100,000 items with 64-float vectors
    take tens of seconds; through Arrow, under one.
    """
    key = "spark.sql.execution.arrow.pyspark.enabled"
    before = spark.conf.get(key, "false")
    spark.conf.set(key, "true")
    try:
        return spark.createDataFrame(pdf, schema)
    finally:
        spark.conf.set(key, before)


def overwrite_table(df: DataFrame, cfg: Config, key: str, *, properties: dict[str, str] | None = None) -> int:
    """Replace a table's content in one Delta commit; readers see old or new, never half.

    Example:
        version = overwrite_table(recs_df, cfg, C.RECOMMENDATIONS)
    """
    path = cfg.table_path(key)
    writer = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
    for k, v in (properties or {}).items():
        writer = writer.option(k, v)
    retrying(cfg.table_name(key), lambda: writer.save(path))
    return version_after_write(df.sparkSession, path)


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
    retrying(cfg.table_name(key), lambda: spark.sql(f"ALTER TABLE delta.`{sql_path(path)}` SET TBLPROPERTIES ({assignments})"))
    return True


def append_rows(df: DataFrame, cfg: Config, key: str, *, properties: dict[str, str] | None = None) -> int:
    """Append in one commit (creating the table, with `properties`, when there is none); returns its version."""
    path = cfg.table_path(key)
    writer = df.write.format("delta").mode("append").option("mergeSchema", "true")
    if not table_exists(df.sparkSession, path):
        for k, v in (properties or {}).items():
            writer = writer.option(k, v)
    retrying(cfg.table_name(key), lambda: writer.save(path))
    return version_after_write(df.sparkSession, path)


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
    retrying(cfg.table_name(key), lambda: writer.save(path))
    after = version_after_write(spark, path)
    return None if after == before else after


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


def version_after_write(spark: SparkSession, path: str) -> int:
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
    fs, file = hadoop_path(spark, f"{path.rstrip('/')}/_delta_log/{version:020d}.json")
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
    return version_after_write(spark, path)




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



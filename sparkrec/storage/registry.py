"""Reading the run registry back: what earlier runs kept, read and chose (the clean's guard, the
incremental stages' starting versions, a reusable tuning winner), `sparkrec runs` and `sparkrec rollback`.

The `runs` table is small (a few rows per run), so the latest runs are brought
to the driver to be printed.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkrec.core import columns as C
from sparkrec.core.config import Config
from sparkrec.core.errors import StageError
from sparkrec.core.gate import evaluation_line, tuning_line
from sparkrec.storage import tables
from sparkrec.storage.runs import RunContext, active_stages, count_text


def previous_kept_share(spark: SparkSession, cfg: Config) -> float | None:
    """Kept / rows in of the latest succeeded clean, or None when there is none (or it read nothing)."""
    read = tables.read_table(spark, cfg, C.RUNS, required=False)
    if read is None:
        return None
    row = (
        read.df.where((F.col("stage") == "clean") & (F.col("status") == "succeeded") & (F.col("rows_in") > 0))
        .orderBy(F.col("finished_at").desc()).select("rows_in", "rows_out").first()
    )
    return None if row is None else row["rows_out"] / row["rows_in"]


def last_input_version(spark: SparkSession, cfg: Config, stage: str, key: str) -> int | None:
    """The version of table `key` the latest succeeded `stage` read, or None when unknown.

    None too when a rollback ran after it: the stage's own outputs may have
    been put back to before that read, so the next run must not trust it.
    """
    read = tables.read_table(spark, cfg, C.RUNS, required=False)
    if read is None:
        return None
    done = read.df.where((F.col("status") == "succeeded") & F.col("stage").isin(stage, "rollback"))
    row = done.orderBy(F.col("finished_at").desc()).select("stage", "input_versions").first()
    if row is None or row["stage"] != stage:
        return None
    version = (row["input_versions"] or {}).get(cfg.table_name(key))
    return None if version is None else int(version)


def train_record(spark: SparkSession, cfg: Config, model_version: str) -> dict | None:
    """The details the train stage that made `model_version` recorded (settings, decay reference), or None."""
    read = tables.read_table(spark, cfg, C.RUNS, required=False)
    if read is None:
        return None
    row = (read.df.where((F.col("stage") == "train") & (F.col("status") == "succeeded") & (F.col(C.RUN_ID) == model_version))
           .select("details").first())
    return None if row is None else json.loads(row["details"] or "{}")


def reusable_tuning(spark: SparkSession, cfg: Config, max_age_days: float) -> dict | None:
    """The latest succeeded tuning for this config's search (`Config.search_key`) younger than `max_age_days`.

    Returns:
        {"run_id", "finished_at", "details", "metrics"} of that tune stage, or None.
    """
    read = tables.read_table(spark, cfg, C.RUNS, required=False)
    if read is None:
        return None
    since = datetime.now(timezone.utc) - timedelta(days=max_age_days)
    rows = (
        read.df.where((F.col("stage") == "tune") & (F.col("status") == "succeeded") & (F.col("finished_at") >= F.lit(since)))
        .orderBy(F.col("finished_at").desc()).select(C.RUN_ID, "finished_at", "details", "metrics").limit(50).collect()
    )
    for r in rows:
        details = json.loads(r["details"] or "{}")
        if details.get("search_key") == cfg.search_key() and details.get("trials") and not details.get("reused_from"):
            return {"run_id": r[C.RUN_ID], "finished_at": r["finished_at"], "details": details, "metrics": dict(r["metrics"] or {})}
    return None


def list_runs(spark: SparkSession, cfg: Config, limit: int = 10) -> str:
    """One line per run, newest first: when, how long, each stage's status, and the evaluation."""
    df = tables.read_required(spark, cfg, C.RUNS).df
    latest = (
        df.groupBy(C.RUN_ID).agg(F.min("started_at").alias("start"), F.max("finished_at").alias("end"))
        .orderBy(F.col("start").desc()).limit(limit)
    )
    rows = df.join(latest, C.RUN_ID).orderBy(F.col("start").desc(), "started_at").collect()
    by_run: dict[str, list] = {}
    for r in rows:
        by_run.setdefault(r[C.RUN_ID], []).append(r)
    lines = [f"{'run id':<27} {'started (UTC)':<19} {'took':>7}  stages"]
    for m in active_stages(spark, cfg):
        state = "died: recorded at the next run's start" if m["dead"] else "running"
        lines.append(f"{m['run_id']:<27} {m['started_at'][:19].replace('T', ' '):<19} {'':>7}  {m['stage']}({state})")
    for run_id, stages in by_run.items():
        first = stages[0]
        took = (first["end"] - first["start"]).total_seconds()
        marks = " ".join(f"{s['stage']}{'' if s['status'] == 'succeeded' else '(' + s['status'] + ')'}" for s in stages)
        lines.append(f"{run_id:<27} {first['start']:%Y-%m-%d %H:%M:%S} {took:6.0f}s  {marks}")
        for s in stages:
            if s["stage"] == "clean" and s["status"] == "succeeded":
                d = json.loads(s["details"] or "{}")
                if d.get("mode"):
                    read = d.get("read_versions") or []
                    span = f" (events_raw versions {read[0]}-{read[1]})" if len(read) == 2 else ""
                    lines.append(" " * 29 + f"clean: {d['mode']}{span}, {count_text(s['rows_in'])} rows in = {count_text(s['rows_out'])} kept + "
                                 f"{count_text(s['rows_quarantined'])} quarantined + {count_text(s['rows_duplicate'])} duplicates")
            if s["stage"] == "tune" and s["status"] == "succeeded":
                lines.append(" " * 29 + tuning_line(json.loads(s["details"] or "{}")))
            if s["stage"] == "evaluate" and s["metrics"]:
                lines.append(" " * 29 + evaluation_line(s["metrics"], json.loads(s["details"] or "{}")))
            if s["status"] == "failed" and s["error"]:
                lines.append(" " * 29 + f"{s['stage']}: {s['error'][:200]}")
    return "\n".join(lines)


def rollback(ctx: RunContext, to_run: str) -> str:
    """Restore every table `to_run` wrote to the version it wrote, recorded as a `rollback` stage.

    Rows are ordered by start, so when the run wrote a table twice the later version wins.
    """
    spark, cfg = ctx.spark, ctx.cfg
    rows = tables.read_required(spark, cfg, C.RUNS).df.where((F.col(C.RUN_ID) == to_run) & (F.col("status") == "succeeded")).orderBy("started_at").collect()
    if not rows:
        raise StageError(f"no succeeded stage of run {to_run!r} in the runs table; `sparkrec runs` lists them")
    # Every table the run wrote, whatever stage wrote it (its registry `runs` aside).
    wanted = {cfg.table_name(k): k for k in C.TABLES if k != C.RUNS}
    versions: dict[str, int] = {}
    for r in rows:
        for table, version in (r["output_versions"] or {}).items():
            if table in wanted:
                versions[table] = version
    if not versions:
        raise StageError(f"run {to_run} wrote no table: nothing to roll back to")
    with ctx.stage("rollback") as rec:
        rec.details["to_run"] = to_run
        for table, version in sorted(versions.items()):
            key = wanted[table]
            rec.inputs[table] = version
            rec.outputs[table] = tables.restore_table(spark, cfg, key, version)
        rec.rows_out = len(versions)
    done = ", ".join(f"{t} -> version {v} (now {rec.outputs[t]})" for t, v in sorted(versions.items()))
    return f"rolled back to run {to_run}: {done}"


def latest_details(spark: SparkSession, cfg: Config, stage: str) -> dict | None:
    """The details of the latest succeeded run of `stage` (by when it finished), or None."""
    read = tables.read_table(spark, cfg, C.RUNS, required=False)
    if read is None:
        return None
    row = (read.df.where((F.col("stage") == stage) & (F.col("status") == "succeeded"))
           .orderBy(F.col("finished_at").desc()).select("details").first())
    return None if row is None else json.loads(row["details"] or "{}")

"""The run registry: writing a row to `runs` for every stage, and reading them back.

A stage is wrapped in `RunContext.stage(...)`, which logs its start and end
(run id, rows in and out, duration) and appends the row even when the stage
fails, so an operator can always see what ran, on which table versions, and
why it stopped. The stage reads and writes its tables through the record it
is given (`StageRecord.read`, `.overwrite`, `.merge_new_rows`), which notes
each version as it goes: lineage is kept by the plumbing, not by each stage.

`list_runs` and `rollback` read the registry back (`sparkrec runs`,
`sparkrec rollback`). The `runs` table is small (a few rows per run), so the
latest runs are brought to the driver to be printed.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timezone

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    DoubleType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from sparkrec import __version__
from sparkrec import columns as C
from sparkrec import tables
from sparkrec.config import Config
from sparkrec.errors import StageError
from sparkrec.gate import evaluation_line

log = logging.getLogger(__name__)

RUNS_SCHEMA = StructType(
    [
        StructField(C.RUN_ID, StringType(), False),
        StructField("stage", StringType(), False),
        StructField("status", StringType(), False),
        StructField("started_at", TimestampType(), False),
        StructField("finished_at", TimestampType(), False),
        StructField("duration_s", DoubleType(), False),
        StructField("rows_in", LongType(), True),
        StructField("rows_out", LongType(), True),
        StructField("rows_quarantined", LongType(), True),
        StructField("rows_duplicate", LongType(), True),
        StructField("input_versions", MapType(StringType(), LongType()), True),
        StructField("output_versions", MapType(StringType(), LongType()), True),
        StructField("package_version", StringType(), False),
        StructField("config_hash", StringType(), False),
        StructField("details", StringType(), True),
        StructField("error", StringType(), True),
        StructField("metrics", MapType(StringType(), DoubleType()), True),
        StructField("config", StringType(), True),
    ]
)


def new_run_id() -> str:
    """Sortable by time, unique without coordination."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


@dataclass
class StageRecord:
    """What a stage fills in while it runs; written to `runs` when it ends.

    Tables are read and written through it, so the versions a stage used and
    produced are recorded by the same call that used or produced them.
    """

    stage: str
    spark: SparkSession
    cfg: Config
    rows_in: int | None = None
    rows_out: int | None = None
    rows_quarantined: int | None = None
    rows_duplicate: int | None = None
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def read(self, key: str) -> DataFrame:
        """The table at its latest version, noted as an input. Raises StageError when it does not exist."""
        read = tables.read_table(self.spark, self.cfg, key)
        assert read is not None  # required=True raises instead
        self.inputs[self.cfg.table_name(key)] = read.version
        return read.df

    def read_optional(self, key: str) -> DataFrame | None:
        """The table at its latest version, noted as an input; None when it does not exist."""
        read = tables.read_table(self.spark, self.cfg, key, required=False)
        if read is None:
            return None
        self.inputs[self.cfg.table_name(key)] = read.version
        return read.df

    def overwrite(self, df: DataFrame, key: str, *, properties: dict[str, str] | None = None) -> int:
        """Replace the table atomically (`tables.overwrite_table`), noted as an output; returns its version."""
        version = tables.overwrite_table(df, self.cfg, key, properties=properties)
        self.outputs[self.cfg.table_name(key)] = version
        return version

    def merge_new_rows(self, df: DataFrame, key: str, on: list[str], **kwargs: Any) -> tables.MergeResult:
        """Insert-only MERGE (`tables.merge_new_rows`), noted as an output."""
        result = tables.merge_new_rows(df, self.cfg, key, on, **kwargs)
        self.outputs[self.cfg.table_name(key)] = result.version
        return result

    def rows_written(self, key: str) -> int | None:
        """Delta's count of rows written by this stage's commit to `key` (None when it wrote none)."""
        version = self.outputs.get(self.cfg.table_name(key))
        if version is None:
            return None
        return tables.commit_metrics(self.spark, self.cfg.table_path(key), version).get("numOutputRows")


class RunContext:
    """Shared by the stages of one CLI invocation: one run id, one config."""

    def __init__(
        self, spark: SparkSession, cfg: Config, run_id: str | None = None, now: datetime | None = None
    ) -> None:
        self.spark = spark
        self.cfg = cfg
        self.run_id = run_id or new_run_id()
        # One clock reading per run: rules such as "not in the future" use it,
        # so every stage of a run agrees on what "now" is.
        self.now = now or datetime.now(timezone.utc)
        self.records: list[StageRecord] = []
        # Every stage row written to `runs` by this context, failed ones too
        # (the run's summary is printed from these, not read back).
        self.written: list[dict] = []
        self.failed_stage: str | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        rec = StageRecord(name, self.spark, self.cfg)
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        log.info("run %s: stage %s started", self.run_id, name)
        status, error = "succeeded", None
        try:
            yield rec
        except BaseException as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            self.failed_stage = name
            log.error("run %s: stage %s failed after %.1fs: %s", self.run_id, name, time.monotonic() - t0, error)
            raise
        finally:
            duration = time.monotonic() - t0
            self._record(rec, status, started, duration, error)
        self.records.append(rec)
        log.info(
            "run %s: stage %s finished in %.1fs: rows in %s, out %s, quarantined %s, duplicates %s",
            self.run_id,
            name,
            duration,
            _fmt(rec.rows_in),
            _fmt(rec.rows_out),
            _fmt(rec.rows_quarantined),
            _fmt(rec.rows_duplicate),
        )

    @contextmanager
    def checkpoints(self) -> Iterator[str]:
        """A checkpoint directory of this run for Spark (ALS needs one to honour checkpointInterval), removed afterwards."""
        path = tables.checkpoint_dir(self.cfg, self.run_id)
        self.spark.sparkContext.setCheckpointDir(path)
        try:
            yield path
        finally:
            tables.remove_dir(self.spark, path)

    def checkpointed_rdds(self, path: str) -> int:
        return tables.checkpointed_rdds(self.spark, path)

    def model_path(self, model_version: str) -> str:
        return tables.model_path(self.cfg, model_version)

    def save_model(self, model, model_version: str) -> str:
        """Save an MLlib model under the warehouse's `_models/<version>`; returns the path."""
        path = self.model_path(model_version)
        model.write().overwrite().save(path)
        return path

    def _record(self, rec: StageRecord, status: str, started: datetime, duration: float, error: str | None) -> None:
        row = (
            self.run_id,
            rec.stage,
            status,
            started,
            datetime.now(timezone.utc),
            round(duration, 3),
            rec.rows_in,
            rec.rows_out,
            rec.rows_quarantined,
            rec.rows_duplicate,
            rec.inputs,
            rec.outputs,
            __version__,
            self.cfg.digest(),
            json.dumps(rec.details, sort_keys=True, default=str),
            error,
            {k: float(v) for k, v in rec.metrics.items()},
            json.dumps(self.cfg.as_dict(), sort_keys=True),
        )
        try:
            df = self.spark.createDataFrame([row], RUNS_SCHEMA)
            tables.append_rows(df, self.cfg, C.RUNS)
            self.written.append(dict(zip(RUNS_SCHEMA.names, row)))
        except Exception:  # never hide the stage's own error behind a registry failure
            if error is None:
                raise
            log.exception("run %s: could not record the failed stage %s in the runs table", self.run_id, rec.stage)


def _fmt(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


# --------------------------------------------------------------------------- reading the registry

# What a rollback puts back: everything a reader of recommendations depends on.
PUBLISHED = (C.RECOMMENDATIONS, C.SIMILAR_ITEMS, C.USER_FACTORS, C.ITEM_FACTORS)


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
    for run_id, stages in by_run.items():
        first = stages[0]
        took = (first["end"] - first["start"]).total_seconds()
        marks = " ".join(f"{s['stage']}{'' if s['status'] == 'succeeded' else '(' + s['status'] + ')'}" for s in stages)
        lines.append(f"{run_id:<27} {first['start']:%Y-%m-%d %H:%M:%S} {took:6.0f}s  {marks}")
        for s in stages:
            if s["stage"] == "evaluate" and s["metrics"]:
                lines.append(" " * 29 + evaluation_line(s["metrics"], json.loads(s["details"] or "{}")))
            if s["status"] == "failed" and s["error"]:
                lines.append(" " * 29 + f"{s['stage']}: {s['error'][:200]}")
    return "\n".join(lines)


def rollback(ctx: RunContext, to_run: str) -> str:
    """Restore the published tables to the versions `to_run` wrote, recorded as a `rollback` stage."""
    spark, cfg = ctx.spark, ctx.cfg
    rows = tables.read_required(spark, cfg, C.RUNS).df.where((F.col(C.RUN_ID) == to_run) & (F.col("status") == "succeeded")).collect()
    if not rows:
        raise StageError(f"no succeeded stage of run {to_run!r} in the runs table; `sparkrec runs` lists them")
    wanted = {cfg.table_name(k): k for k in PUBLISHED}
    versions: dict[str, int] = {}
    for r in rows:
        for table, version in (r["output_versions"] or {}).items():
            if table in wanted:
                versions[table] = version
    if not versions:
        raise StageError(f"run {to_run} wrote none of {sorted(wanted)}: nothing to roll back to")
    with ctx.stage("rollback") as rec:
        rec.details["to_run"] = to_run
        for table, version in sorted(versions.items()):
            key = wanted[table]
            rec.inputs[table] = version
            rec.outputs[table] = tables.restore_table(spark, cfg, key, version)
        rec.rows_out = len(versions)
    done = ", ".join(f"{t} -> version {v} (now {rec.outputs[t]})" for t, v in sorted(versions.items()))
    return f"rolled back to run {to_run}: {done}"

"""The run record: a row in `runs` for every stage, and the versions it read and wrote.

A stage is wrapped in `RunContext.stage(...)`, which logs its start and end
(run id, rows in and out, duration) and appends the row even when the stage
fails, so an operator can always see what ran, on which table versions, and
why it stopped. The stage reads and writes its tables through the record it
is given (`StageRecord.read`, `.overwrite`, `.merge_new_rows`), which notes
each version as it goes: lineage is kept by the plumbing, not by each stage.

A stage in progress leaves a marker (`_runs_active/`), so the next stage can
record one whose process died as `interrupted`. `registry` reads the rows back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import DataFrame, SparkSession
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
from sparkrec.core import columns as C
from sparkrec.core.config import Config
from sparkrec.core.processes import process_running
from sparkrec.storage import files, merges, tables

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

    def merge_new_rows(self, df: DataFrame, key: str, on: list[str], **kwargs: Any) -> merges.MergeResult:
        """Insert-only MERGE (`merges.merge_new_rows`), noted as an output."""
        result = merges.merge_new_rows(df, self.cfg, key, on, **kwargs)
        self.outputs[self.cfg.table_name(key)] = result.version
        return result

    def read_at(self, key: str, version: int) -> DataFrame:
        """The table at `version`, noted as an input."""
        df = tables.read_required(self.spark, self.cfg, key, version=version).df
        self.inputs[self.cfg.table_name(key)] = version
        return df

    def read_inserts(self, key: str, after_version: int, to_version: int) -> DataFrame:
        """Rows inserted in versions (after_version, to_version] (`tables.read_inserts`); `to_version` noted as the input."""
        df = tables.read_inserts(self.spark, self.cfg, key, after_version, to_version)
        self.inputs[self.cfg.table_name(key)] = to_version
        return df

    def upsert(self, df: DataFrame, key: str, on: list[str], **kwargs: Any) -> tuple[merges.MergeResult, int]:
        """Absolute rows by key, deletes flagged (`merges.upsert`), noted as an output."""
        result, deleted = merges.upsert(df, self.cfg, key, on, **kwargs)
        self.outputs[self.cfg.table_name(key)] = result.version
        return result, deleted

    def apply_changes(self, df: DataFrame, key: str, on: list[str], **kwargs: Any) -> tuple[merges.MergeResult, int]:
        """Insert-if-absent and flagged deletes in one MERGE (`merges.apply_changes`), noted as an output."""
        result, deleted = merges.apply_changes(df, self.cfg, key, on, **kwargs)
        self.outputs[self.cfg.table_name(key)] = result.version
        return result, deleted

    def merge_deltas(self, df: DataFrame, key: str, on: list[str], **kwargs: Any) -> merges.MergeResult:
        """Sums added in one MERGE, once per batch (`merges.merge_deltas`), noted as an output."""
        result = merges.merge_deltas(df, self.cfg, key, on, **kwargs)
        self.outputs[self.cfg.table_name(key)] = result.version
        return result

    def append(self, df: DataFrame, key: str, *, properties: dict[str, str] | None = None) -> int:
        """Append rows (`tables.append_rows`), noted as an output; returns the rows Delta wrote."""
        before = tables.current_version(self.spark, self.cfg.table_path(key))
        version = tables.append_rows(df, self.cfg, key, properties=properties)
        self.outputs[self.cfg.table_name(key)] = version
        if version == before:  # nothing to append: Delta committed nothing
            return 0
        return tables.commit_metrics(self.spark, self.cfg.table_path(key), version).get("numOutputRows", 0)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step of a long stage: logged as it ends and kept in `details["steps"]` (seconds), so a slow
        day can be read off `sparkrec runs` without a profiler."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            took = round(time.monotonic() - t0, 2)
            steps = self.details.setdefault("steps", {})
            steps[name] = round(steps.get(name, 0.0) + took, 2)
            log.info("stage %s: %s took %.1f s", self.stage, name, took)

    def read_output(self, key: str) -> DataFrame:
        """The version of `key` this stage just wrote (not noted as an input)."""
        version = self.outputs[self.cfg.table_name(key)]
        return tables.read_required(self.spark, self.cfg, key, version=version).df

    def rows_written(self, key: str) -> int | None:
        """Delta's count of rows written by this stage's commit to `key` (None when it wrote none)."""
        version = self.outputs.get(self.cfg.table_name(key))
        if version is None:
            return None
        return tables.commit_metrics(self.spark, self.cfg.table_path(key), version).get("numOutputRows")


class RunContext:
    """Shared by the stages of one CLI invocation: one run id, one config."""

    def __init__(
        self, spark: SparkSession, cfg: Config, run_id: str | None = None, now: datetime | None = None,
        live: bool = False,
    ) -> None:
        self.spark = spark
        self.cfg = cfg
        # A micro-batch of the live stream: its clean skips the kept-share guard, which judges a day's
        # run and would stop a stream on a handful of malformed messages.
        self.live = live
        self.run_id = run_id or new_run_id()
        # One clock reading per run: rules such as "not in the future" use it,
        # so every stage of a run agrees on what "now" is.
        self.now = now or datetime.now(timezone.utc)
        self.records: list[StageRecord] = []
        # Every stage row written to `runs` by this context, failed ones too
        # (the run's summary is printed from these, not read back).
        self.written: list[dict] = []
        self.failed_stage: str | None = None
        self._reaped = False

    @contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        rec = StageRecord(name, self.spark, self.cfg)
        if not self._reaped:
            self._reaped = True
            reap_dead_stages(self)
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        log.info("run %s: stage %s started", self.run_id, name)
        status, error = "succeeded", None
        marker = self._mark_started(name, started)
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
            _quietly(files.remove_file, self.spark, marker)
        self.records.append(rec)
        log.info(
            "run %s: stage %s finished in %.1fs: rows in %s, out %s, quarantined %s, duplicates %s",
            self.run_id,
            name,
            duration,
            count_text(rec.rows_in),
            count_text(rec.rows_out),
            count_text(rec.rows_quarantined),
            count_text(rec.rows_duplicate),
        )

    def _mark_started(self, stage: str, started: datetime) -> str:
        """Leave a marker while the stage runs, so a killed stage is seen as started and never finished."""
        path = f"{active_dir(self.cfg)}/{self.run_id}.{stage}.json"
        marker = {"run_id": self.run_id, "stage": stage, "started_at": started.isoformat(), "pid": os.getpid(),
                  "host": socket.gethostname(), "config_hash": self.cfg.digest()}
        _quietly(files.write_text, self.spark, path, json.dumps(marker))
        return path

    @contextmanager
    def checkpoints(self) -> Iterator[str]:
        """A checkpoint directory of this run for Spark (ALS needs one to honour checkpointInterval), removed afterwards."""
        path = files.checkpoint_dir(self.cfg, self.run_id)
        self.spark.sparkContext.setCheckpointDir(path)
        try:
            yield path
        finally:
            files.remove_dir(self.spark, path)

    def checkpointed_rdds(self, path: str) -> int:
        return files.checkpointed_rdds(self.spark, path)

    def model_path(self, model_version: str) -> str:
        return files.model_path(self.cfg, model_version)

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
            log.error("run %s: could not record the failed stage %s in the runs table (-v for the traceback)", self.run_id, rec.stage)
            log.debug("recording the failed stage", exc_info=True)


def _quietly(fn, *args) -> None:
    """Bookkeeping that must never hide or cause a stage's failure."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - a marker is a convenience, the runs row is the record
        log.debug("run bookkeeping %s failed: %s", getattr(fn, "__name__", fn), exc)


def active_dir(cfg: Config) -> str:
    """Markers of stages in progress: <warehouse>/_runs_active/<run id>.<stage>.json."""
    return f"{cfg.warehouse.rstrip('/')}/_runs_active"


def active_stages(spark: SparkSession, cfg: Config) -> list[dict]:
    """Stages started and not finished: each marker, with `dead` true when its process is gone (same host only)."""
    out = []
    for name, text in sorted(files.read_texts(spark, active_dir(cfg)).items()):
        try:
            m = json.loads(text)
        except ValueError:
            continue
        m["dead"] = m.get("host") == socket.gethostname() and not process_running(int(m.get("pid", 0)))
        m["file"] = f"{active_dir(cfg)}/{name}"
        out.append(m)
    return out


def reap_dead_stages(ctx: RunContext) -> list[dict]:
    """Record stages whose process died mid-stage (SIGKILL, OOM killer, a lost node) and remove what they left.

    Each becomes a `runs` row with status `interrupted`, its run's checkpoint
    directory is deleted, and its marker removed. Only processes on this host
    can be seen to be dead; markers of other hosts stay until they finish.
    """
    reaped = []
    for m in active_stages(ctx.spark, ctx.cfg):
        if not m["dead"] or m["run_id"] == ctx.run_id:
            continue
        started = datetime.fromisoformat(m["started_at"])
        now = datetime.now(timezone.utc)
        error = (f"the process (pid {m['pid']} on {m['host']}) ended during this stage without finishing it "
                 "(killed or crashed); every table is at its last committed version")
        row = (m["run_id"], m["stage"], "interrupted", started, now, round((now - started).total_seconds(), 3),
               None, None, None, None, {}, {}, __version__, m.get("config_hash", ""), "{}", error, {}, None)
        tables.append_rows(ctx.spark.createDataFrame([row], RUNS_SCHEMA), ctx.cfg, C.RUNS)
        files.remove_dir(ctx.spark, files.checkpoint_dir(ctx.cfg, m["run_id"]))
        files.remove_file(ctx.spark, m["file"])
        log.warning("run %s: stage %s was interrupted (pid %s died); recorded in runs, its checkpoints removed",
                    m["run_id"], m["stage"], m["pid"])
        reaped.append(m)
    return reaped


def count_text(n: int | None) -> str:
    """A row count as the logs and `sparkrec runs` print it (thousands separated; "-" when not counted)."""
    return "-" if n is None else f"{n:,}"

"""The run registry: one row in `runs` for every stage run, successful or not.

A stage is wrapped in `RunContext.stage(...)`, which logs its start and end
(run id, rows in and out, duration) and appends the row even when the stage
fails, so an operator can always see what ran, on which table versions, and
why it stopped.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pyspark.sql import SparkSession
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
from sparkrec import io
from sparkrec.config import Config

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
    """What a stage fills in while it runs; written to `runs` when it ends."""

    stage: str
    rows_in: int | None = None
    rows_out: int | None = None
    rows_quarantined: int | None = None
    rows_duplicate: int | None = None
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


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
        rec = StageRecord(name)
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
            io.append_rows(df, self.cfg, C.RUNS)
            self.written.append(dict(zip(RUNS_SCHEMA.names, row)))
        except Exception:  # never hide the stage's own error behind a registry failure
            if error is None:
                raise
            log.exception("run %s: could not record the failed stage %s in the runs table", self.run_id, rec.stage)


def _fmt(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"

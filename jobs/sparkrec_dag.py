"""Airflow DAG: ingest -> clean -> evaluate (quality gate) -> train -> recommend, one run per data interval.

Each task is a `spark-submit` of the thin job of the same name, with the
run's data interval passed as `interval.start` / `interval.end`: ingest
takes that interval's events, and every stage uses the interval's end as
"now", so a retried or re-run interval writes the same tables.

The gate runs before `train`: a model that loses to the best baseline ends
`evaluate` with exit code 3, the task fails, and neither the factors nor the
recommendations are replaced. (`evaluate` fits its own model on the training
period, so it does not need `train`'s.)

Set in the environment of the scheduler and workers (all optional):
    SPARKREC_HOME      the sparkrec checkout or install with jobs/ and conf/ (default: next to this file)
    SPARKREC_CONFIG    config file (default: $SPARKREC_HOME/conf/cluster.yaml)
    SPARKREC_SPARK_CONN  Airflow connection of the Spark master (default: spark_default)
    SPARKREC_PY_FILES  the --py-files archive built by `make dist`
    SPARKREC_PACKAGES  --packages (default: the Delta jar matching the pinned delta-spark)
    SPARKREC_JARS      comma-separated jar files for --jars instead of --packages (no Ivy resolution
                       at each task's start; for clusters without access to Maven Central)
    SPARKREC_SET       extra overrides, `key=value` separated by ';'
    SPARKREC_SCHEDULE  cron or preset (default: @daily)
    SPARKREC_RETRY_DELAY_MINUTES  first retry delay, doubled each time (default: 5)
"""

from __future__ import annotations

import importlib.util
import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.exceptions import AirflowException, AirflowFailException
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.timetables.interval import CronDataIntervalTimetable

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

HOME = Path(os.environ.get("SPARKREC_HOME", Path(__file__).resolve().parents[1]))
CONFIG = os.environ.get("SPARKREC_CONFIG", str(HOME / "conf" / "cluster.yaml"))
CONN_ID = os.environ.get("SPARKREC_SPARK_CONN", "spark_default")
PY_FILES = os.environ.get("SPARKREC_PY_FILES") or None
JARS = os.environ.get("SPARKREC_JARS") or None
PACKAGES = None if JARS else os.environ.get("SPARKREC_PACKAGES", "io.delta:delta-spark_4.2_2.13:4.4.0")
EXTRA = [s.strip() for s in os.environ.get("SPARKREC_SET", "").split(";") if s.strip()]


def _scheduled_commands() -> tuple[str, ...]:
    """sparkrec's own list of scheduled commands (`sparkrec/core/stages.py`), loaded as a file.

    The scheduler need not have sparkrec or Spark installed: stages.py uses the
    standard library only, so it is loaded by path instead of imported as a package.
    """
    spec = importlib.util.spec_from_file_location("sparkrec_stages", HOME / "sparkrec" / "core" / "stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.SCHEDULED)


STAGES = _scheduled_commands()
RETRY_DELAY = timedelta(minutes=float(os.environ.get("SPARKREC_RETRY_DELAY_MINUTES", "5")))
# sparkrec's exit codes that no retry can change: bad config or input (2), a model the gate refused (3).
FINAL_EXITS = {
    2: "bad config or input, or a missing upstream table (see the task log for the one-line reason)",
    3: "quality gate: the new model does not beat the best baseline; nothing was published",
    4: "quality gate: the model lost, so the best baseline's lists were published instead (see `sparkrec runs`)",
}


class SparkrecSubmit(SparkSubmitOperator):
    """spark-submit of one sparkrec job; failures a retry cannot fix fail at once instead of being retried."""

    def execute(self, context):
        try:
            return super().execute(context)
        except AirflowException as exc:
            for code, why in FINAL_EXITS.items():
                if f"Error code is: {code}." in str(exc):
                    raise AirflowFailException(f"{self.task_id}: {why}") from exc
            raise


def job_args(stage: str) -> list[str]:
    """The job's command line: config, the interval of this DAG run, then site overrides."""
    args = ["--config", CONFIG,
            "--set", "interval.start={{ data_interval_start.isoformat() }}",
            "--set", "interval.end={{ data_interval_end.isoformat() }}"]
    for s in EXTRA:
        args += ["--set", s]
    return args


with DAG(
    dag_id="sparkrec",
    description="Fresh per-user recommendations from the day's events",
    # Real intervals [start, end): Airflow 3's default cron timetable gives start == end.
    schedule=CronDataIntervalTimetable(os.environ.get("SPARKREC_SCHEDULE", "@daily"), timezone="UTC"),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,  # the stages replace shared tables: one interval at a time
    default_args={
        "retries": 2,
        "retry_delay": RETRY_DELAY,
        "retry_exponential_backoff": True,
    },
    tags=["sparkrec", "spark", "delta"],
) as dag:
    previous = None
    for stage in STAGES:
        task = SparkrecSubmit(
            task_id=stage,
            conn_id=CONN_ID,
            application=str(HOME / "jobs" / f"{stage}.py"),
            application_args=job_args(stage),
            packages=PACKAGES,
            jars=JARS,
            py_files=PY_FILES,
            name=f"sparkrec-{stage}",
            conf={"spark.task.maxFailures": "4"},
        )
        if previous is not None:
            previous >> task
        previous = task

"""The Airflow DAG, tested with real Airflow (its own virtual environment, `make airflow-setup`).

Airflow pins many packages of its own, so it lives in `.venv-airflow`; these
tests drive it as a user would, in subprocesses, with a SQLite metadata
database under a temporary AIRFLOW_HOME. `spark-submit` resolves to this
project's pyspark (its bin/ comes first on PATH), so the DAG's tasks run the
pinned Spark and the project's own interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparkrec.core import columns as C
from sparkrec.core.config import load_config
from sparkrec.dev.generate import GenerateParams, generate
from sparkrec.storage import tables
from tests.conftest import ROOT

pytestmark = pytest.mark.cluster

AIRFLOW_VENV = ROOT / ".venv-airflow"
AIRFLOW_PY = AIRFLOW_VENV / "bin" / "python"
STAGES = ["ingest", "clean", "evaluate", "train", "recommend"]
# The gate's verdict on 19 evaluated users is noise: this DAG run is about scheduling (the exit codes are tested below).
FAST = ("train.als.rank=8;train.als.max_iter=4;recommend.n=5;spark.driver_memory=2g;spark.shuffle_partitions=2;"
        "evaluate.test_days=14;evaluate.gate.enabled=false")


def _resolved_delta_jars(spark) -> str:
    from urllib.parse import unquote, urlparse

    listed = spark.sparkContext.getConf().get("spark.jars") or ""
    jars = [unquote(urlparse(u).path) if u.startswith("file:") else u for u in listed.split(",") if u]
    assert jars and all(Path(j).is_file() for j in jars), listed
    return ",".join(jars)


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory, spark):
    if not AIRFLOW_PY.exists():
        pytest.fail(f"{AIRFLOW_VENV} is missing: run `make airflow-setup` (make test does it)")
    home = tmp_path_factory.mktemp("airflow-home")
    shop = tmp_path_factory.mktemp("airflow-shop")
    generate(GenerateParams(events=6_000, seed=11), str(shop))
    wh = home / "warehouse"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "jobs"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW_CONN_SPARKREC_LOCAL": json.dumps({"conn_type": "spark", "host": "local[2]"}),
        "SPARKREC_SPARK_CONN": "sparkrec_local",
        "SPARKREC_CONFIG": str(ROOT / "conf" / "local.yaml"),
        # Under spark-submit the master comes from the connection, so the config leaves it unset.
        "SPARKREC_SET": f"spark.master=null;warehouse={wh};source.path={shop}/events;items.path={shop}/items;{FAST}",
        "SPARKREC_SCHEDULE": "@yearly",
        "SPARKREC_RETRY_DELAY_MINUTES": "0.05",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        # The jars this suite's session already resolved: no Ivy resolution at each task's start.
        "SPARKREC_JARS": _resolved_delta_jars(spark),
    }
    migrate = subprocess.run([str(AIRFLOW_VENV / "bin" / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"warehouse={wh}", f"source.path={shop}/events", f"items.path={shop}/items"])
    return env, cfg


def airflow_python(env, code: str) -> dict:
    out = subprocess.run([str(AIRFLOW_PY), "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("JSON"))
    return json.loads(line[4:])


def test_dag_imports_without_errors_and_has_the_stage_chain(airflow_env):
    env, _ = airflow_env
    got = airflow_python(env, """
import json
from airflow.models import DagBag
bag = DagBag(dag_folder="jobs/sparkrec_dag.py")
dag = bag.get_dag("sparkrec")
tasks = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks} if dag else {}
print("JSON" + json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "tasks": tasks,
      "retries": {t.task_id: t.retries for t in dag.tasks} if dag else {}, "max_active_runs": dag.max_active_runs if dag else None}))
""")
    assert got["errors"] == {}
    assert got["tasks"] == {a: ([b] if b else []) for a, b in zip(STAGES, [*STAGES[1:], None])}
    assert all(r >= 1 for r in got["retries"].values())
    assert got["max_active_runs"] == 1


def test_arguments_render_the_data_interval(airflow_env):
    env, _ = airflow_env
    got = airflow_python(env, """
import json
import pendulum
from airflow.models import DagBag
dag = DagBag(dag_folder="jobs/sparkrec_dag.py").get_dag("sparkrec")
task = dag.get_task("ingest")
start, end = pendulum.datetime(2025, 6, 1, tz="UTC"), pendulum.datetime(2025, 6, 2, tz="UTC")
rendered = task.render_template(task.application_args, {"data_interval_start": start, "data_interval_end": end})
info = dag.timetable.infer_manual_data_interval(run_after=pendulum.datetime(2025, 6, 2, 12, tz="UTC"))
print("JSON" + json.dumps({"args": rendered, "interval": [info.start.isoformat(), info.end.isoformat()]}))
""")
    args = got["args"]
    assert "interval.start=2025-06-01T00:00:00+00:00" in args
    assert "interval.end=2025-06-02T00:00:00+00:00" in args
    assert args[args.index("--config") + 1].endswith("conf/local.yaml")
    start, end = got["interval"]
    assert start < end  # a real interval, not Airflow 3's start == end default


def test_dags_test_runs_every_stage_for_one_interval(spark, airflow_env):
    env, cfg = airflow_env
    run = subprocess.run(
        # Run after 2026-01-01: the interval that just ended, [2025-01-01, 2026-01-01), holds the shop's events.
        [str(AIRFLOW_VENV / "bin" / "airflow"), "dags", "test", "sparkrec", "2026-01-01"],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=1800,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    runs = tables.read_table(spark, cfg, C.RUNS).df
    stages = {r["stage"]: r for r in runs.collect()}
    assert {"ingest", "clean", "ids", "evaluate", "train", "recommend"} <= set(stages)
    assert all(r["status"] == "succeeded" for r in stages.values())
    assert json.loads(stages["ingest"]["details"])["interval"] == ["2025-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"]
    assert tables.read_table(spark, cfg, C.RECOMMENDATIONS).df.count() > 0


def test_a_refused_model_or_bad_input_fails_at_once_and_a_crash_is_retried(airflow_env):
    env, _ = airflow_env
    got = airflow_python(env, """
import json
from airflow.exceptions import AirflowException, AirflowFailException
from airflow.models import DagBag
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
task = DagBag(dag_folder="jobs/sparkrec_dag.py").get_dag("sparkrec").get_task("evaluate")
out = {}
for code in (1, 2, 3):
    def failing(self, context, code=code):
        raise AirflowException(f"Cannot execute: spark-submit ... Error code is: {code}.")
    SparkSubmitOperator.execute = failing
    try:
        task.execute({})
    except AirflowFailException as e:
        out[code] = ["final", str(e)]
    except AirflowException as e:
        out[code] = ["retry", str(e)]
print("JSON" + json.dumps(out))
""")
    assert got["1"][0] == "retry"
    assert got["2"][0] == "final" and "bad config or input" in got["2"][1]
    assert got["3"][0] == "final" and "quality gate" in got["3"][1]

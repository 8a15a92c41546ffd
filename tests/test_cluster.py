"""spark-submit against a real standalone cluster on localhost (a master and two 1-core workers).

The pipeline is submitted with the built `--py-files` archive and Delta's
`--packages`, exactly as the README tells a cluster user, and its tables are
compared with a local-mode run of the same input in this process. These
tests start JVMs of their own, so they are grouped under the `cluster` mark
(`make test-cluster`) and their cost shows in the durations report.

Stated tolerances (the cluster run and the local run differ only in where
tasks ran and how ALS's blocks were shuffled, so floating-point sums are
added in another order):
- cleaned tables, ledgers and ids: equal;
- factors: every user's and item's vector within 2e-3 (max absolute difference);
- recommendations: the same (user, item, rank) rows for at least 95% of rows,
  and every score within 2e-3 of the local one where the item agrees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from sparkrec.batch import pipeline
from sparkrec.cli import main
from sparkrec.core import columns as C
from sparkrec.core.config import load_config
from sparkrec.dev import cluster as devcluster
from sparkrec.storage import tables
from sparkrec.storage.runs import RunContext
from tests.conftest import ROOT

pytestmark = pytest.mark.cluster

DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.0"
SETTINGS = ["tune.enabled=false", "train.als.rank=8", "train.als.max_iter=6", "train.als.num_blocks=4", "recommend.n=10", "evaluate.enabled=false", "spark.shuffle_partitions=4"]
TOL = 2e-3


@pytest.fixture(scope="module")
def dist():
    """`make dist`'s script: the wheel and the --py-files zip."""
    out = subprocess.run([sys.executable, "scripts/build_dist.py"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    zips = sorted((ROOT / "dist").glob("sparkrec-*.zip"))
    wheels = sorted((ROOT / "dist").glob("sparkrec-*.whl"))
    assert len(zips) == 1 and len(wheels) == 1, out.stdout
    names = zipfile.ZipFile(zips[0]).namelist()
    assert "sparkrec/cli.py" in names and not any("__pycache__" in n for n in names)
    return zips[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = devcluster.start(tmp_path_factory.mktemp("cluster"), workers=2, cores=1, memory="1500m")
    yield c
    c.stop()
    assert not any(devcluster._running(p) for p in [c.master_pid, *c.worker_pids])


@pytest.fixture(scope="module")
def shop(small_shop):
    return small_shop


def overrides(wh, shop) -> list[str]:
    return [f"warehouse={wh}", f"source.path={shop}/events", f"items.path={shop}/items", *SETTINGS]


def submit(cluster, dist, job: str, sets: list[str], log_path, executor_python: Path | None = None) -> subprocess.Popen:
    """spark-submit a job in client mode, the way the README shows, and return the process."""
    args = [
        str(devcluster.spark_home() / "bin" / "spark-submit"),
        "--master", cluster.master_url,
        "--deploy-mode", "client",
        "--packages", DELTA_PACKAGE,
        "--py-files", str(dist),
        "--executor-memory", "1g",
        "--conf", f"spark.pyspark.python={executor_python or sys.executable}",
        "--conf", f"spark.pyspark.driver.python={sys.executable}",
        "--conf", "spark.ui.enabled=false",
        str(ROOT / "jobs" / f"{job}.py"),
        "--config", str(ROOT / "conf" / "cluster.yaml"),
    ]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "SPARK_LOCAL_IP": devcluster.HOST}
    env.pop("PYSPARK_DRIVER_PYTHON", None)
    return subprocess.Popen(args, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)


def wait(proc: subprocess.Popen, log_path, timeout: float = 900) -> None:
    rc = proc.wait(timeout=timeout)
    tail = "".join(open(log_path).readlines()[-40:])
    assert rc == 0, f"spark-submit exited {rc}:\n{tail}"


@pytest.fixture(scope="module")
def zip_only_python(tmp_path_factory) -> Path:
    """An executor Python that has sparkrec's dependencies but not sparkrec itself.

    This venv has sparkrec installed (editable, through a .pth file), which
    would hide a broken --py-files zip. `-S` skips site processing, so no .pth
    file runs; the dependencies come from site-packages on PYTHONPATH, and
    sparkrec can only come from the zip Spark ships.
    """
    import site

    d = tmp_path_factory.mktemp("zip-only-python")
    script = d / "python"
    paths = ":".join(site.getsitepackages())
    script.write_text(f'#!/bin/sh\nexport PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{paths}"\nexec {sys.executable} -S "$@"\n')
    script.chmod(0o755)
    probe = subprocess.run([str(script), "-c", "import numpy, pandas, pyarrow, faiss, pyspark; import sparkrec"], cwd=d, capture_output=True, text=True)
    assert "No module named 'sparkrec'" in probe.stderr, probe.stderr  # the dependencies load, sparkrec does not
    return script


@pytest.fixture(scope="module")
def both_runs(spark, cluster, dist, shop, zip_only_python, tmp_path_factory):
    """The same input through spark-submit on the cluster (sparkrec on the executors only from the
    --py-files zip) and through the CLI in local mode."""
    d = tmp_path_factory.mktemp("runs")
    log_path = d / "submit.log"
    wait(submit(cluster, dist, "run", overrides(d / "cluster_wh", shop), log_path, executor_python=zip_only_python), log_path)
    assert main(["run", "--config", str(ROOT / "conf" / "local.yaml"), *[a for s in overrides(d / "local_wh", shop) for a in ("--set", s)]], spark=spark) == 0
    cfg_cluster = load_config(ROOT / "conf" / "cluster.yaml", overrides(d / "cluster_wh", shop))
    cfg_local = load_config(ROOT / "conf" / "local.yaml", overrides(d / "local_wh", shop))
    return cfg_cluster, cfg_local, log_path


def read(spark, cfg, key):
    return tables.read_table(spark, cfg, key).df


def test_the_cluster_ran_the_job_on_both_workers(both_runs, cluster):
    _, _, log_path = both_runs
    text = open(log_path).read()
    assert "run done" in text, text[-2000:]
    # Each worker launched executors for the application: <work-dir>/app-<id>/<executor>/stderr.
    for i in range(2):
        executors = list((Path(cluster.directory) / f"worker{i}").glob("app-*/*/stderr"))
        assert executors, f"worker{i} ran no executor"


@pytest.mark.parametrize("key", [C.INTERACTIONS, C.QUARANTINE, C.USER_IDS, C.ITEM_IDS])
def test_cleaned_tables_and_ids_equal_local_mode(spark, both_runs, key):
    cl, lo, _ = both_runs
    a, b = read(spark, cl, key), read(spark, lo, key)
    # Which run wrote a row, and when, differ by design; everything else must not.
    run_specific = [c for c in a.columns if c in (C.RUN_ID, C.INGEST_RUN_ID) or c.endswith("_at")]
    a, b = a.drop(*run_specific), b.drop(*run_specific)
    assert a.count() > 0
    assert_df_equality(a, b, ignore_row_order=True, ignore_nullable=True)


def test_factors_match_local_mode_within_tolerance(spark, both_runs):
    cl, lo, _ = both_runs
    for key, idx in ((C.USER_FACTORS, C.USER_IDX), (C.ITEM_FACTORS, C.ITEM_IDX)):
        a = read(spark, cl, key).select(idx, F.col(C.FEATURES).alias("a"))
        b = read(spark, lo, key).select(idx, F.col(C.FEATURES).alias("b"))
        joined = a.join(b, idx, "full_outer").collect()  # small: a few thousand rows of rank 8
        assert joined and all(r["a"] is not None and r["b"] is not None for r in joined), f"{key}: ids differ"
        diff = max(float(np.max(np.abs(np.asarray(r["a"]) - np.asarray(r["b"])))) for r in joined)
        assert diff <= TOL, f"{key}: largest factor difference {diff:.2e} > {TOL}"


def test_recommendations_match_local_mode(spark, both_runs):
    cl, lo, _ = both_runs
    cols = [C.USER_ID, C.ITEM_ID, C.RANK]
    a = read(spark, cl, C.RECOMMENDATIONS).select(*cols, F.col(C.SCORE).alias("sa"))
    b = read(spark, lo, C.RECOMMENDATIONS).select(*cols, F.col(C.SCORE).alias("sb"))
    total = b.count()
    same = a.join(b, cols)
    assert a.count() == total > 0
    assert same.count() >= 0.95 * total
    worst = same.agg(F.max(F.abs(F.col("sa") - F.col("sb")))).first()[0]
    assert worst <= TOL


def _flaky_python(directory: Path, fail_times: int | None) -> Path:
    """An executor-side Python that dies before starting `fail_times` times (None: always), then runs the real one.

    Spark launches it for the Python workers of the scoring tasks, so a task
    fails the way it does when a node's Python crashes, with nothing changed
    in sparkrec itself.
    """
    count = directory / "failures"
    script = directory / "flaky-python"
    limit = "" if fail_times is None else f'[ "$(wc -c < {count})" -ge {fail_times} ] && exec {sys.executable} "$@"\n'
    script.write_text(
        "#!/bin/sh\n"
        f"touch {count}\n"
        f"{limit}"
        f"printf x >> {count}\n"
        'echo "injected fault: python worker failed to start" >&2\n'
        "exit 3\n"
    )
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def trained(both_runs, shop, tmp_path_factory):
    """A copy of the warehouse `both_runs` built in local mode, for recommend stages submitted to the cluster.

    Copied, not trained again (that cost 40 s): Delta tables keep relative file
    paths, so a copied warehouse is a complete one.
    """
    _, cfg_local, _ = both_runs
    d = tmp_path_factory.mktemp("trained")
    shutil.copytree(cfg_local.warehouse, d / "wh")
    cfg = load_config(ROOT / "conf" / "local.yaml", overrides(d / "wh", shop))
    return d, cfg, shop


def _submit_recommend(cluster, dist, trained, python: Path, log_path) -> int:
    d, _, shop = trained
    proc = submit(cluster, dist, "recommend", overrides(d / "wh", shop), log_path, executor_python=python)
    return proc.wait(timeout=900)


def test_a_task_that_fails_once_is_retried_and_the_stage_completes(spark, cluster, dist, trained, tmp_path):
    """spark.task.maxFailures (4 in conf/cluster.yaml) re-runs a task whose Python worker crashed."""
    _, cfg, _ = trained
    python = _flaky_python(tmp_path, fail_times=1)
    log_path = tmp_path / "recommend.log"
    rc = _submit_recommend(cluster, dist, trained, python, log_path)
    text = open(log_path).read()
    assert rc == 0, text[-3000:]
    assert (tmp_path / "failures").read_text() == "x"  # the fault really happened, once
    assert "Lost task" in text, text[-3000:]
    recs = read(spark, cfg, C.RECOMMENDATIONS)
    users = read(spark, cfg, C.INTERACTIONS).select(C.USER_ID).distinct().count()
    per_user = recs.groupBy(C.USER_ID).count()
    assert per_user.count() == users
    assert per_user.where(F.col("count") != 10).count() == 0


def test_a_task_that_keeps_failing_fails_the_job_naming_the_stage(spark, cluster, dist, trained, tmp_path):
    _, cfg, _ = trained
    before = tables.current_version(spark, cfg.table_path(C.RECOMMENDATIONS))
    python = _flaky_python(tmp_path, fail_times=None)
    log_path = tmp_path / "recommend.log"
    rc = _submit_recommend(cluster, dist, trained, python, log_path)
    text = open(log_path).read()
    assert rc == 1, text[-3000:]
    assert "sparkrec: failed in stage recommend:" in text, text[-3000:]
    assert len((tmp_path / "failures").read_text()) >= 4  # every attempt was made before giving up
    assert tables.current_version(spark, cfg.table_path(C.RECOMMENDATIONS)) == before  # nothing half-published


def test_training_survives_losing_a_worker(spark, cluster, dist, shop, both_runs, tmp_path_factory):
    """SIGKILL one of two workers (and its executor) while ALS iterates: the job completes, and its
    factors are those of an undisturbed run within the stated tolerance (lost blocks are recomputed
    from the same seeded input), so every metric computed from them agrees too.

    The last test of the module: it kills a worker of the module's cluster (a cluster of its own
    cost 15-20 s to start). It trains on a copy of the local run's warehouse: the same cleaned input,
    without ingesting and cleaning it again."""
    d = tmp_path_factory.mktemp("lose-a-worker")
    shutil.copytree(both_runs[1].warehouse, d / "wh")
    sets = [*overrides(d / "wh", shop), "train.als.max_iter=30"]
    cfg = load_config(ROOT / "conf" / "local.yaml", sets)
    pipeline.run_stages(RunContext(spark, cfg), ("ids", "train"))
    undisturbed = {
        key: {r[idx]: np.asarray(r[C.FEATURES]) for r in read(spark, cfg, key).select(idx, C.FEATURES).collect()}
        for key, idx in ((C.USER_FACTORS, C.USER_IDX), (C.ITEM_FACTORS, C.ITEM_IDX))
    }
    log_path = d / "train.log"
    proc = submit(cluster, dist, "train", sets, log_path)
    deadline = time.monotonic() + 600
    while "fitting ALS" not in open(log_path).read():
        assert proc.poll() is None, open(log_path).read()[-3000:]
        assert time.monotonic() < deadline, "ALS never started"
        time.sleep(0.2)
    time.sleep(3)
    assert proc.poll() is None, "training finished before the worker could be killed"
    cluster.kill_worker(1)
    wait(proc, log_path)
    assert "Lost executor" in open(log_path).read() or "lost worker" in open(log_path).read().lower()
    for key, idx in ((C.USER_FACTORS, C.USER_IDX), (C.ITEM_FACTORS, C.ITEM_IDX)):
        got = {r[idx]: np.asarray(r[C.FEATURES]) for r in read(spark, cfg, key).select(idx, C.FEATURES).collect()}
        assert got.keys() == undisturbed[key].keys()
        diff = max(float(np.max(np.abs(got[k] - undisturbed[key][k]))) for k in got)
        assert diff <= TOL, f"{key}: largest factor difference {diff:.2e} after losing a worker"

"""One SparkSession for the whole suite: local[2], Delta, few partitions, UI off."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from sparkrec.core.config import Config, SparkConfig, StreamConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_RETAIL = ROOT.parent / "shared" / "data" / "online_retail_ii_2009_2010.parquet"


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from sparkrec.storage.session import build_session

    warehouse = tmp_path_factory.mktemp("spark-warehouse")
    cfg = SparkConfig(
        master="local[2]",
        app_name="sparkrec-tests",
        shuffle_partitions=2,
        log_level="ERROR",
        # Spark's Kafka connector beside Delta, resolved from Maven Central once: the live stream's tests use it.
        packages=[StreamConfig().kafka_package],
        conf={
            "spark.ui.enabled": "false",
            "spark.default.parallelism": "2",
            "spark.sql.warehouse.dir": str(warehouse),
            "spark.driver.memory": "3g",
            "spark.databricks.delta.snapshotPartitions": "2",
            # This JVM lives as long as its xdist worker (tens of minutes): C2 pays for itself here, unlike in the
            # short JVMs the tests start (spark-conf/spark-defaults.conf stops those at C1). Measured on four
            # pipeline runs in one session: 156, 78, 64, 61 CPU-seconds against 123, 92, 98, 103 with C1 only.
            "spark.driver.defaultJavaOptions": "-XX:+TieredCompilation",
            # Adaptive execution re-plans every query at each shuffle, which on the suite's tables of a few
            # thousand rows is all cost (four runs: 12% fewer CPU-seconds without it). Results do not depend on
            # it; the processes the tests start (the CLI, spark-submit, Airflow's tasks) keep sparkrec's setting.
            "spark.sql.adaptive.enabled": "false",
        },
    )
    # With pytest-xdist each worker starts its own session: one at a time resolves the jars from Maven
    # Central (Ivy's cache is not safe for two resolvers at once); the next loads the files it remembered.
    lock = Path.home() / ".cache" / "sparkrec" / "session-start.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        session = build_session(cfg)
    yield session
    session.stop()


@pytest.fixture
def make_config(tmp_path):
    """Config from a conf/ file with the warehouse under tmp_path and extra overrides."""

    def _make(*overrides: str, base: str = "local.yaml", warehouse: Path | None = None) -> Config:
        wh = warehouse or tmp_path / "warehouse"
        return load_config(ROOT / "conf" / base, [f"warehouse={wh}", *overrides])

    return _make


# A small shop's batch run, trained and published: the live path's and the server's tests start from it.
FAST = ["train.als.rank=8", "train.als.max_iter=6", "recommend.n=10", "tune.enabled=false", "evaluate.enabled=false",
        "recommend.min_history=3", "stream.clean_seconds=3600"]


@pytest.fixture(scope="session")
def small_shop(tmp_path_factory):
    from sparkrec.dev.generate import GenerateParams, generate

    out = tmp_path_factory.mktemp("smallshop")
    generate(GenerateParams(events=6_000, seed=5), str(out))
    return out


@pytest.fixture(scope="session")
def published(spark, small_shop, tmp_path_factory, worker_id):
    """A warehouse as the daily batch leaves it (trained, lists published), and the overrides that built it.

    Built once per test run: the first xdist worker that needs it builds it in the directory the workers share,
    under a lock, and the others (the stream's and the server's files run on different workers) read the same
    one. Read-only: copy it before writing.
    """
    import json

    from sparkrec.cli import main

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    wh, done = shared / "published-warehouse", shared / "published.json"
    with (shared / "published.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not done.exists():
            overrides = [f"warehouse={wh}", f"source.path={small_shop}/events", f"items.path={small_shop}/items", *FAST]
            args = ["run", "--config", str(ROOT / "conf" / "local.yaml"), *[a for o in overrides for a in ("--set", o)]]
            assert main(args, spark=spark) == 0
            done.write_text(json.dumps(overrides))
    return wh, json.loads(done.read_text())


@pytest.fixture(scope="session")
def retail_path() -> Path:
    if not SHARED_RETAIL.exists():
        pytest.skip(f"shared data set not found at {SHARED_RETAIL} (see ../shared/data/README.md)")
    return SHARED_RETAIL


def pytest_configure(config):
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    # The stream's tests talk to a broker on 127.0.0.1; Spark's driver stays on the same address.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Every JVM the tests start reads tests/spark-conf/spark-defaults.conf (why: see that file).
    os.environ.setdefault("SPARK_CONF_DIR", str(ROOT / "tests" / "spark-conf"))
    # Training the ranker costs an ALS fit per training cut in every evaluation: the tests that are about
    # something else run without it (through every command they start); the ranker's own tests turn it on.
    os.environ.setdefault("SPARKREC_SET", "ranker.enabled=false")


# The heaviest files first (their tests' seconds in the full suite of 2026-12-07, about: e2e 1200, faults 990,
# stream 850, cluster 620, Airflow 590, incremental 450, privacy 340, real data 320, hardening 200, ranking 145;
# the rest less). With --dist loadfile a worker takes the next file in collection order when it is free, so the
# long files start at once and the short ones fill the end, instead of one long file running alone after the
# others have finished (the Airflow file did, last, in the run before this order).
HEAVY_FIRST = ("test_e2e.py", "test_faults.py", "test_stream.py", "test_cluster.py", "test_airflow.py", "test_incremental.py",
               "test_privacy.py", "test_realdata.py", "test_hardening.py", "test_ranking.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order

"""The one place a SparkSession is built.

Under spark-submit the submitter owns master, packages and resources, so
`spark.master: null` leaves them alone. In local mode the builder adds Delta
(its jars resolved from Maven Central by `configure_spark_with_delta_pip` and
cached in ~/.ivy2*) and the settings that make a 2-core laptop fast.
"""

from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

from sparkrec.config import SparkConfig

log = logging.getLogger(__name__)

DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}

# Settings every sparkrec session gets: UTC everywhere (timestamps are stored
# in UTC and parsed from the source zone explicitly), and Delta's snapshot
# state read with few partitions (the default 50 makes small tables slow).
BASE_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.databricks.delta.snapshotPartitions": "2",
    "spark.sql.adaptive.enabled": "true",
    # A MERGE whose source is recomputed must see the same rows each time.
    "spark.databricks.delta.merge.materializeSource": "auto",
}


def build_session(cfg: SparkConfig) -> SparkSession:
    """Create (or reuse) the session described by `cfg`.

    Example:
        spark = build_session(load_config("conf/local.yaml").spark)
    """
    builder = SparkSession.builder.appName(cfg.app_name)
    local = cfg.master is not None
    if local:
        # Workers must run the driver's interpreter, or pandas UDFs fail with
        # ModuleNotFoundError when the venv is not the system Python.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        # Spark's progress bar helps a person at a terminal and garbles a log file.
        progress = "true" if sys.stderr.isatty() else "false"
        builder = builder.master(cfg.master).config("spark.ui.showConsoleProgress", progress)
        if cfg.driver_memory:
            builder = builder.config("spark.driver.memory", cfg.driver_memory)
    settings = {**DELTA_CONF, **BASE_CONF, "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions)}
    settings.update(cfg.conf)
    for k, v in settings.items():
        builder = builder.config(k, v)
    if cfg.jars:
        builder = builder.config("spark.jars", ",".join(cfg.jars))
    elif cfg.delta_packages and local:
        from delta import configure_spark_with_delta_pip

        builder = configure_spark_with_delta_pip(builder)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    log.info("spark %s, master %s", spark.version, spark.sparkContext.master)
    return spark

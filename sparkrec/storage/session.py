"""The one place a SparkSession is built.

Under spark-submit the submitter owns master, packages and resources, so
`spark.master: null` leaves them alone. In local mode the builder adds Delta
(its jars resolved from Maven Central by `configure_spark_with_delta_pip` and
cached in ~/.ivy2*) and the settings that make a 2-core laptop fast.

Resolving the packages costs seconds at every start even when every jar is
cached, so the first session remembers the jar files Ivy resolved (in
~/.cache/sparkrec, keyed by the pyspark and delta-spark versions) and later
sessions load exactly those files, as long as all of them still exist.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from sparkrec.core.config import SparkConfig
from sparkrec.core.errors import SparkrecError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

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


# Local mode only (under spark-submit the cluster's own settings rule):
# - the throughput collector: a batch job on a laptop wants the most work per
#   core, not short pauses (measured 10-15% off a whole run on 2 cores);
# - shuffle partitions of about 16 MB after adaptive coalescing, not 64 MB:
#   on 2 cores a 100 MB shuffle then runs as 6-7 even tasks instead of 2-3
#   uneven ones, one of which would run alone at the end.
LOCAL_CONF = {
    "spark.driver.extraJavaOptions": "-XX:+UseParallelGC",
    "spark.sql.adaptive.advisoryPartitionSizeInBytes": "16m",
}


def build_session(cfg: SparkConfig) -> SparkSession:
    """Create (or reuse) the session described by `cfg`.

    A session that cannot start (most often a Delta jar that a flaky download
    left damaged in Ivy's cache) is retried once after the damaged files are
    removed, and otherwise reported in one line with what to do.

    Example:
        spark = build_session(load_config("conf/local.yaml").spark)
    """
    try:
        return _build(cfg)
    except Exception as exc:
        if not _is_start_failure(exc):
            raise
        removed = remove_damaged_jars(ivy_dirs())
        if removed:
            log.warning("Spark could not start; removed %d damaged cached jar(s) (%s) and trying once more",
                        len(removed), ", ".join(str(p) for p in removed))
            try:
                return _build(cfg)
            except Exception as again:
                if not _is_start_failure(again):
                    raise
                exc = again
        raise SessionError(start_failure_message(exc, removed)) from exc


class SessionError(SparkrecError):
    """Spark could not start (its JVM exited): said in one line, with what to try."""


def _is_start_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "JAVA_GATEWAY_EXITED" in text or "Java gateway process exited" in text


def ivy_dirs() -> list[Path]:
    """Where Spark's Ivy resolver caches downloaded jars (~/.ivy2, ~/.ivy2.5.2, ...)."""
    home = Path.home()
    return sorted(p for p in home.glob(".ivy2*") if p.is_dir())


def remove_damaged_jars(roots: list[Path]) -> list[Path]:
    """Delete empty or truncated .jar files under the Ivy caches (a jar is a zip: it must open as one)."""
    import zipfile

    removed = []
    for root in roots:
        for jar in root.rglob("*.jar"):
            try:
                damaged = jar.stat().st_size == 0 or not zipfile.is_zipfile(jar)
            except OSError:
                continue
            if damaged:
                try:
                    jar.unlink()
                    removed.append(jar)
                except OSError as exc:
                    log.debug("could not remove %s: %s", jar, exc)
    cache = _jar_cache_file()
    if removed and cache is not None:
        for remembered in cache.parent.glob("delta-jars-*.txt"):  # a remembered list may name a removed file
            remembered.unlink(missing_ok=True)
    return removed


def start_failure_message(exc: BaseException, removed: list[Path]) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    tried = (f"damaged cached jars were removed and the start retried once ({', '.join(p.name for p in removed)}); "
             if removed else "")
    caches = ", ".join(str(p) for p in ivy_dirs()) or "~/.ivy2*"
    return (
        f"Spark could not start ({first}); {tried}the usual cause is a Delta jar "
        "(io.delta:delta-spark_4.2_2.13) that could not be downloaded from Maven Central or is damaged in the cache. "
        f"Check the network, delete the cache ({caches} and ~/.cache/sparkrec) and try again, or run `make jars`; "
        + (f"Spark's own output in {_diverted_to} names the artifact" if _diverted_to else "the lines above from Spark name the artifact")
    )


def _build(cfg: SparkConfig) -> SparkSession:
    from pyspark.sql import SparkSession

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
    settings = {**DELTA_CONF, **BASE_CONF, **(LOCAL_CONF if local else {}), "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions)}
    settings.update(cfg.conf)
    for k, v in settings.items():
        builder = builder.config(k, v)
    if cfg.jars:
        builder = builder.config("spark.jars", ",".join(cfg.jars))
    remember = False
    if not cfg.jars and cfg.delta_packages and local:
        cached = _cached_delta_jars(cfg.packages)
        if cached:
            builder = builder.config("spark.jars", ",".join(cached))
        else:
            from delta import configure_spark_with_delta_pip

            builder = configure_spark_with_delta_pip(builder, extra_packages=list(cfg.packages))
            remember = True
    spark = builder.getOrCreate()
    if remember:
        _remember_delta_jars(spark, cfg.packages)
    spark.sparkContext.setLogLevel(cfg.log_level)
    log.info("spark %s, master %s", spark.version, spark.sparkContext.master)
    return spark


def divert_jvm_output(path: Path) -> Path:
    """Send what the JVM and its Python workers print to `path`, keeping this process's own lines on the terminal.

    In local mode the JVM inherits file descriptor 2 from this process, and
    prints its own block of warnings at every start (incubator modules, the
    loopback address, native Hadoop, the UI port, netlib BLAS, truncated
    plans). Descriptor 2 is pointed at `path` before the JVM starts; Python's
    `sys.stderr` and the logging handlers move to a copy of the terminal's
    descriptor. Spark's errors still reach the user through sparkrec's
    one-line messages, and the whole text is in the file (`-v` leaves all of it on the terminal).
    """
    global _diverted_to
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    old = sys.stderr
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8", errors="backslashreplace")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is old:
            handler.setStream(sys.stderr)
    _diverted_to = path
    return path


_diverted_to: Path | None = None


def spark_log_path(run_id: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "sparkrec" / "logs" / f"spark-{run_id}.log"


def _jar_cache_file(packages: list[str] | tuple[str, ...] = ()) -> Path | None:
    """Where the resolved jar list is remembered, one file per pyspark, delta-spark and extra packages."""
    try:
        key = f"pyspark-{version('pyspark')}-delta-{version('delta-spark')}"
    except PackageNotFoundError:
        return None
    if packages:
        import hashlib

        key += "-" + hashlib.sha256(",".join(sorted(packages)).encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "sparkrec" / f"delta-jars-{key}.txt"


def _cached_delta_jars(packages: list[str] | tuple[str, ...] = ()) -> list[str] | None:
    """The jar files a previous session resolved for these versions, or None to resolve again."""
    path = _jar_cache_file(packages)
    if path is None or not path.is_file():
        return None
    jars = [line for line in path.read_text().splitlines() if line.strip()]
    if not jars or not all(Path(j).is_file() and Path(j).stat().st_size > 0 for j in jars):
        return None
    return jars


def _remember_delta_jars(spark: SparkSession, packages: list[str] | tuple[str, ...] = ()) -> None:
    """Write the jar files Ivy resolved for this session, for the next one to load directly."""
    path = _jar_cache_file(packages)
    try:
        listed = spark.sparkContext.getConf().get("spark.jars") or ""
        jars = [unquote(urlparse(u).path) if u.startswith("file:") else u for u in listed.split(",") if u]
        if path is None or not jars or not all(Path(j).is_file() for j in jars):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n".join(jars) + "\n")
        tmp.replace(path)
    except OSError as exc:  # a cache only: resolving again next time is fine
        log.debug("could not remember the Delta jars: %s", exc)

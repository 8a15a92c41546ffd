"""Files of the warehouse that are not tables: a stage's saved working rows (`_work/`), checkpoints,
saved models, and small text records, all through Hadoop's file system so remote paths work alike."""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkrec.core import columns as C
from sparkrec.core.config import Config


def hadoop_path(spark: SparkSession, path: str):
    """(file system, Hadoop path) for `path`, so local and remote paths are handled alike."""
    hpath = spark.sparkContext._jvm.org.apache.hadoop.fs.Path(path)
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath


def scratch_path(cfg: Config, name: str) -> str:
    """A working table of the warehouse that no reader uses (`_work/<name>`)."""
    return f"{cfg.warehouse.rstrip('/')}/_work/{name}"


def write_scratch(df: DataFrame, cfg: Config, name: str) -> None:
    """Overwrite the working files `name` with `df` (Parquet: no reader but the stage itself, which
    records elsewhere, once they are all written, that they are complete)."""
    df.write.mode("overwrite").parquet(scratch_path(cfg, name))


def read_scratch(spark: SparkSession, cfg: Config, name: str) -> DataFrame:
    return spark.read.parquet(scratch_path(cfg, name))


def remove_dir(spark: SparkSession, path: str) -> None:
    """Delete a directory through Hadoop's file system, so remote paths work too."""
    fs, hpath = hadoop_path(spark, path)
    if fs.exists(hpath):
        fs.delete(hpath, True)


def checkpointed_rdds(spark: SparkSession, path: str) -> int:
    """RDD checkpoints present under a checkpoint directory (Spark writes <dir>/<uuid>/rdd-N)."""
    fs, hpath = hadoop_path(spark, path)
    if not fs.exists(hpath):
        return 0
    count = 0
    for top in fs.listStatus(hpath):
        if top.isDirectory():
            count += sum(1 for s in fs.listStatus(top.getPath()) if s.getPath().getName().startswith("rdd-"))
    return count


def checkpoint_dir(cfg: Config, run_id: str) -> str:
    return f"{cfg.checkpoint_root.rstrip('/')}/{run_id}"


def model_path(cfg: Config, model_version: str) -> str:
    return f"{cfg.warehouse.rstrip('/')}/_models/{model_version}"


RANKER_FILE = C.RANKER_FILE


def ranker_path(cfg: Config, run_id: str) -> str:
    """Where a run keeps the ranker its evaluation chose (outside `_models`: it holds no customer, and
    `sparkrec forget` rewrites what is under `_models`)."""
    return f"{cfg.warehouse.rstrip('/')}/_rankers/{run_id}"


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write a small text file through Hadoop's file system (local or remote alike), replacing it."""
    fs, hpath = hadoop_path(spark, path)
    stream = fs.create(hpath, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


def read_texts(spark: SparkSession, directory: str) -> dict[str, str]:
    """{file name: text} of the small files directly under `directory` (empty when it does not exist)."""
    fs, hdir = hadoop_path(spark, directory)
    if not fs.exists(hdir):
        return {}
    io_utils = spark.sparkContext._jvm.org.apache.commons.io.IOUtils
    out = {}
    for status in fs.listStatus(hdir):
        if status.isDirectory():
            continue
        stream = fs.open(status.getPath())
        try:
            out[status.getPath().getName()] = str(io_utils.toString(stream, "UTF-8"))
        finally:
            stream.close()
    return out


def remove_file(spark: SparkSession, path: str) -> None:
    fs, hpath = hadoop_path(spark, path)
    if fs.exists(hpath):
        fs.delete(hpath, False)


def model_dirs(spark: SparkSession, cfg: Config) -> list[str]:
    """The saved models under the warehouse's `_models/`."""
    fs, hpath = hadoop_path(spark, f"{cfg.warehouse.rstrip('/')}/_models")
    if not fs.exists(hpath):
        return []
    return sorted(str(s.getPath().toString()) for s in fs.listStatus(hpath) if s.isDirectory())


def drop_model_users(spark: SparkSession, model_dir: str, user_idx: DataFrame) -> int:
    """Rewrite a saved ALS model's user factors without the given users (`id` is the user index MLlib saved);
    returns the factor rows removed. The new files are written beside the old ones and swapped in, so a
    crash leaves either the old or the new factors, and a re-run finishes the job."""
    factors = f"{model_dir.rstrip('/')}/userFactors"
    tmp = f"{factors}.forget-tmp"
    fs, hpath = hadoop_path(spark, factors)
    _, htmp = hadoop_path(spark, tmp)
    if not fs.exists(hpath) and fs.exists(htmp):  # an earlier run stopped between the delete and the rename
        fs.rename(htmp, hpath)
    if not fs.exists(hpath):
        return 0
    old = spark.read.parquet(factors)
    ids = user_idx.select(F.col(C.USER_IDX).alias("id"))
    removed = old.join(F.broadcast(ids), "id", "left_semi").count()
    if not removed:
        return 0
    old.join(F.broadcast(ids), "id", "left_anti").write.mode("overwrite").parquet(tmp)
    fs.delete(hpath, True)
    fs.rename(htmp, hpath)
    return removed

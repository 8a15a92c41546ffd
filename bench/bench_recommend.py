"""The recommend stage against MLlib's recommendForAllUsers and the implicit library, same factors, one run.

Builds a warehouse of generated factors (users x items, given rank), purchase
histories and an item table, then times side by side in one process:

- sparkrec's whole recommend stage (`pipeline.run_recommend`: bought-item
  exclusion, rules, fallbacks, explanations, write to Delta), with
  `similar_items` off so it does the same job as the others (timed separately);
- MLlib `ALSModel.recommendForAllUsers(N)` on the same factors (a model saved
  from a tiny fit, its factor tables swapped for the generated ones), forced
  with the `noop` sink; it does not exclude bought items;
- the `implicit` library's single-process `recommend` for all users with
  `filter_already_liked_items=True`;
- faiss's exact single-process top-N alone (no filtering);
- and the floor under any Spark + Delta stage: the finished recommendations,
  cached in memory, written to a new Delta table.

    python bench/bench_recommend.py                          # 50,000 x 20,000, rank 32, N 50
    python bench/bench_recommend.py --scale                  # adds 1,000,000 x 100,000, rank 64, N 20 (sparkrec only)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "recommend"
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from sparkrec import columns as C  # noqa: E402
from sparkrec import pipeline, tables  # noqa: E402
from sparkrec.config import load_config  # noqa: E402
from sparkrec.runs import RunContext  # noqa: E402
from sparkrec.session import build_session  # noqa: E402

log = logging.getLogger("bench")


def _uniform(seed: int, *cols) -> F.Column:
    """Deterministic uniform [0, 1) from a hash: the same whatever the partitioning."""
    return F.pmod(F.xxhash64(F.lit(seed), *cols), F.lit(1 << 24)) / float(1 << 24)


def _factors(spark: SparkSession, n: int, rank: int, seed: int, clusters: int = 20) -> F.DataFrame:
    """Factors with taste clusters: a shared direction per cluster plus noise."""
    ids = spark.range(n).withColumnRenamed("id", "_id")
    cluster = (F.xxhash64(F.lit(seed + 1), F.col("_id")) % clusters + clusters) % clusters
    feats = F.transform(
        F.sequence(F.lit(0), F.lit(rank - 1)),
        lambda j: (F.when(j % clusters == cluster, F.lit(0.6)).otherwise(F.lit(0.0)) + _uniform(seed, F.col("_id"), j) * 0.4 - 0.1).cast("float"),
    )
    return ids.select(F.col("_id").cast("int").alias("_id"), feats.alias(C.FEATURES))


def build_warehouse(spark: SparkSession, cfg, users: int, items: int, rank: int, per_user: int) -> None:
    """user_ids, item_ids, items, interactions (purchases), user_factors, item_factors."""
    uf = _factors(spark, users, rank, 11)
    itf = _factors(spark, items, rank, 23)
    tables.overwrite_table(uf.select(F.col("_id").alias(C.USER_IDX), F.concat(F.lit("u"), F.col("_id")).alias(C.USER_ID)), cfg, C.USER_IDS)
    tables.overwrite_table(itf.select(F.col("_id").alias(C.ITEM_IDX), F.concat(F.lit("i"), F.col("_id")).alias(C.ITEM_ID)), cfg, C.ITEM_IDS)
    tables.overwrite_table(
        spark.range(items).select(
            F.concat(F.lit("i"), F.col("id")).alias(C.ITEM_ID),
            F.concat(F.lit("cat"), (F.col("id") % 50).cast("string")).alias(C.CATEGORY),
            F.lit(9.99).alias(C.PRICE),
            (_uniform(5, F.col("id")) >= 0.05).alias(C.AVAILABLE),
        ),
        cfg,
        C.ITEMS,
    )
    stamp = F.lit("bench-model").alias(C.MODEL_VERSION)
    tables.overwrite_table(uf.select(F.col("_id").alias(C.USER_IDX), C.FEATURES, stamp), cfg, C.USER_FACTORS)
    tables.overwrite_table(itf.select(F.col("_id").alias(C.ITEM_IDX), C.FEATURES, stamp), cfg, C.ITEM_FACTORS)
    # 1..2*per_user purchases per user, skewed to popular items (squared uniform).
    k = (F.xxhash64(F.lit(3), F.col("id")) % per_user + per_user).cast("int") % (2 * per_user) + 1
    hist = spark.range(users).select(F.col("id").alias("u"), F.explode(F.sequence(F.lit(1), k)).alias("j"))
    item = (F.pow(_uniform(7, F.col("u"), F.col("j")), 2) * items).cast("int")
    tables.overwrite_table(
        hist.select(
            F.concat(F.lit("u"), F.col("u")).alias(C.USER_ID),
            F.concat(F.lit("i"), item).alias(C.ITEM_ID),
            F.lit(C.PURCHASE).alias(C.EVENT_TYPE),
            (F.lit("2025-06-01").cast("timestamp") + F.make_dt_interval(F.lit(0), F.lit(0), F.lit(0), F.col("j").cast("double"))).alias(C.EVENT_TS),
        ).distinct(),
        cfg,
        C.INTERACTIONS,
    )


class PeakMemory:
    """Peak resident memory of this process and all its children (JVM, Python workers), sampled."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _total(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> PeakMemory:
        def loop() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self._total())
                time.sleep(self.every)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def time_sparkrec(spark: SparkSession, cfg) -> dict:
    ctx = RunContext(spark, cfg)
    with PeakMemory() as mem:
        t0 = time.monotonic()
        pipeline.run_recommend(ctx)
        secs = time.monotonic() - t0
    rows = tables.read_table(spark, cfg, C.RECOMMENDATIONS).df
    per_user = rows.groupBy(C.USER_ID).count()
    stats = per_user.agg(F.min("count"), F.max("count"), F.count("*")).first()
    return {"seconds": secs, "peak_rss_gb": mem.peak / 2**30, "rows": rows.count(), "users": stats[2], "min_n": stats[0], "max_n": stats[1]}


def time_mllib(spark: SparkSession, cfg, n: int, rank: int) -> float:
    """recommendForAllUsers on the warehouse's factors, through a saved model with swapped factor tables."""
    from pyspark.ml.recommendation import ALS, ALSModel

    path = OUT / "mllib_model"
    shutil.rmtree(path, ignore_errors=True)
    tiny = spark.createDataFrame([(0, 0, 1.0), (1, 1, 1.0)], "user int, item int, rating float")
    ALS(rank=rank, maxIter=1, implicitPrefs=True).fit(tiny).save(str(path))
    for name, key in (("userFactors", C.USER_FACTORS), ("itemFactors", C.ITEM_FACTORS)):
        shutil.rmtree(path / name)
        f = tables.read_table(spark, cfg, key).df
        idx = C.USER_IDX if key == C.USER_FACTORS else C.ITEM_IDX
        f.select(F.col(idx).alias("id"), C.FEATURES).write.parquet(str(path / name))
    model = ALSModel.load(str(path))
    t0 = time.monotonic()
    model.recommendForAllUsers(n).write.format("noop").mode("overwrite").save()
    return time.monotonic() - t0


def time_delta_write(spark: SparkSession, cfg) -> float:
    """The floor under any Spark + Delta recommend stage: writing the finished table, already in memory, again."""
    rows = tables.read_table(spark, cfg, C.RECOMMENDATIONS).df.persist()
    rows.count()
    target = OUT / "write_floor"
    shutil.rmtree(target, ignore_errors=True)
    t0 = time.monotonic()
    rows.write.format("delta").mode("overwrite").save(str(target))
    secs = time.monotonic() - t0
    rows.unpersist()
    return secs


def local_factors(spark: SparkSession, cfg):
    """Factors and the purchase matrix as numpy/scipy, for the single-process references."""
    import scipy.sparse as sp

    def mat(key: str, idx: str) -> np.ndarray:
        pdf = tables.read_table(spark, cfg, key).df.select(idx, C.FEATURES).orderBy(idx).toPandas()
        return np.stack(pdf[C.FEATURES].to_numpy()).astype(np.float32)

    U, I = mat(C.USER_FACTORS, C.USER_IDX), mat(C.ITEM_FACTORS, C.ITEM_IDX)
    h = (
        tables.read_table(spark, cfg, C.INTERACTIONS).df.join(tables.read_table(spark, cfg, C.USER_IDS).df, C.USER_ID)
        .join(tables.read_table(spark, cfg, C.ITEM_IDS).df, C.ITEM_ID).select(C.USER_IDX, C.ITEM_IDX).toPandas()
    )
    csr = sp.csr_matrix((np.ones(len(h), np.float32), (h[C.USER_IDX], h[C.ITEM_IDX])), shape=(len(U), len(I)))
    return U, I, csr


def time_implicit(U: np.ndarray, I: np.ndarray, csr, n: int) -> float:
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=U.shape[1])
    model.user_factors, model.item_factors = U, I
    t0 = time.monotonic()
    model.recommend(np.arange(len(U)), csr, N=n, filter_already_liked_items=True)
    return time.monotonic() - t0


def time_faiss(U: np.ndarray, I: np.ndarray, n: int) -> float:
    import faiss

    index = faiss.IndexFlatIP(I.shape[1])
    index.add(I)
    t0 = time.monotonic()
    index.search(U, n)
    return time.monotonic() - t0


def run_case(spark, base_overrides, users, items, rank, n, per_user, compare: bool) -> dict:
    wh = OUT / f"wh_{users}x{items}_r{rank}"
    shutil.rmtree(wh, ignore_errors=True)
    cfg = load_config(
        ROOT / "conf" / "local.yaml",
        [f"warehouse={wh}", f"recommend.n={n}", "recommend.similar_items.enabled=false", "recommend.rules.max_per_category=10", *base_overrides],
    )
    t0 = time.monotonic()
    build_warehouse(spark, cfg, users, items, rank, per_user)
    res = {"users": users, "items": items, "rank": rank, "n": n, "build_s": time.monotonic() - t0}
    res["sparkrec"] = time_sparkrec(spark, cfg)
    log.info("sparkrec: %s", res["sparkrec"])
    if compare:
        res["delta_write_only_s"] = time_delta_write(spark, cfg)
        log.info("writing the finished table to Delta again: %.1fs", res["delta_write_only_s"])
        res["mllib_s"] = time_mllib(spark, cfg, n, rank)
        log.info("mllib recommendForAllUsers: %.1fs", res["mllib_s"])
        U, I, csr = local_factors(spark, cfg)
        res["implicit_s"] = time_implicit(U, I, csr, n)
        res["faiss_s"] = time_faiss(U, I, n)
        log.info("implicit %.1fs, faiss %.1fs", res["implicit_s"], res["faiss_s"])
        sim_cfg = cfg.model_copy(update={"recommend": cfg.recommend.model_copy(update={"similar_items": cfg.recommend.similar_items.model_copy(update={"enabled": True})})})
        res["with_similar_items_s"] = time_sparkrec(spark, sim_cfg)["seconds"]
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", action="store_true", help="also 1,000,000 users x 100,000 items, rank 64, N 20")
    p.add_argument("--no-compare", action="store_true", help="skip the 50k x 20k comparison case")
    p.add_argument("--json", default=str(OUT / "results.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    spark = build_session(load_config(ROOT / "conf" / "local.yaml").spark)
    results = []
    if not args.no_compare:
        results.append(run_case(spark, [], 50_000, 20_000, 32, 50, 5, compare=True))
    if args.scale:
        results.append(run_case(spark, [], 1_000_000, 100_000, 64, 20, 5, compare=False))
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

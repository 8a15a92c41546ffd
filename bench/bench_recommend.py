"""The recommend stage against MLlib's recommendForAllUsers and the implicit library, same factors, one run.

Builds a warehouse of generated factors (users x items, given rank), purchase
histories and an item table, then times side by side in one process:

- sparkrec's whole recommend stage (`pipeline.run_recommend`: bought-item
  exclusion, rules, fallbacks, explanations, write to Delta), with
  `similar_items`, the category cap and the blend off so it does the same job
  as the stock pipeline (each timed separately as well);
- the stock pipeline a Spark user writes for the same table (see `time_stock`),
  its lists checked equal to sparkrec's;
- MLlib `ALSModel.recommendForAllUsers(N)` on the same factors (a model saved
  from a tiny fit, its factor tables swapped for the generated ones), forced
  with the `noop` sink; it does not exclude bought items;
- the `implicit` library's single-process `recommend` for all users with
  `filter_already_liked_items=True`;
- faiss's exact single-process top-N alone (no filtering);
- and the floor under any Spark + Delta stage: the finished recommendations,
  cached in memory, written to a new Delta table.

    python bench/bench_recommend.py                          # 50,000 x 20,000, rank 32, N 50
    python bench/bench_recommend.py --scale                  # adds 50k..1M users x 100,000 items, rank 64, N 20 (sparkrec only)
    python bench/bench_recommend.py --stage-only 4           # the 50k x 20k stage alone, 4 timed runs after a warm-up

One timed run swings by a third on a shared 2-core machine: to compare two
trees, run `--stage-only` from a worktree of each, in turns, and compare medians.
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

from sparkrec.batch import pipeline  # noqa: E402
from sparkrec.core import columns as C  # noqa: E402
from sparkrec.core.config import load_config  # noqa: E402
from sparkrec.storage import tables  # noqa: E402
from sparkrec.storage.runs import RunContext  # noqa: E402
from sparkrec.storage.session import build_session  # noqa: E402

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


def _name(i):
    """A name from `sparkrec.dev.generate`'s words: colour, style, and a thing of the item's category."""
    from sparkrec.dev.generate import COLOURS, STYLES, THINGS

    def pick(words, salt):
        return F.element_at(F.array(*[F.lit(w) for w in words]), (F.abs(F.xxhash64(F.lit(salt), i)) % len(words) + 1).cast("int"))

    thing = F.element_at(F.array(*[F.lit(w) for group in THINGS for w in group]),
                         ((i % len(THINGS)) * len(THINGS[0]) + F.abs(F.xxhash64(F.lit(3), i)) % len(THINGS[0]) + 1).cast("int"))
    return F.initcap(F.concat_ws(" ", pick(COLOURS, 1), pick(STYLES, 2), thing)).alias(C.ITEM_NAME)


def build_warehouse(spark: SparkSession, cfg, users: int, items: int, rank: int, per_user: int, named: bool = False) -> None:
    """user_ids, item_ids, items, interactions (purchases), user_factors, item_factors.

    `named`: items get names in the generator's vocabulary (for search: `bench_serve.py`)."""
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
            *([_name(F.col("id"))] if named else []),
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


_probes = iter(range(10**9))


def job_id_now(spark: SparkSession) -> int:
    """The id of a tiny probe job: Spark numbers jobs in order, so two probes bracket the jobs between them.

    (A job group would miss the jobs the stage runs from its own threads: groups are per thread.)
    """
    sc = spark.sparkContext
    group = f"probe-{next(_probes)}"
    sc.setJobGroup(group, "job counter")
    sc.parallelize([0], 1).count()
    sc.setJobGroup("bench", "bench")
    return sc.statusTracker().getJobIdsForGroup(group)[0]


def time_sparkrec(spark: SparkSession, cfg) -> dict:
    ctx = RunContext(spark, cfg)
    first = job_id_now(spark)
    with PeakMemory() as mem:
        t0 = time.monotonic()
        pipeline.run_recommend(ctx)
        secs = time.monotonic() - t0
    jobs = job_id_now(spark) - first - 1
    rows = tables.read_table(spark, cfg, C.RECOMMENDATIONS).df
    per_user = rows.groupBy(C.USER_ID).count()
    stats = per_user.agg(F.min("count"), F.max("count"), F.count("*")).first()
    return {"seconds": secs, "jobs": jobs, "peak_rss_gb": mem.peak / 2**30, "rows": rows.count(),
            "users": stats[2], "min_n": stats[0], "max_n": stats[1]}


def stock_model(spark: SparkSession, cfg, rank: int):
    """An MLlib ALSModel holding the warehouse's factors (a tiny fit saved, its factor tables swapped).

    The item factors are only the available items': the stock pipeline then never
    has to over-fetch past unavailable items (the strongest version of it).
    """
    from pyspark.ml.recommendation import ALS, ALSModel

    path = OUT / "stock_model"
    shutil.rmtree(path, ignore_errors=True)
    tiny = spark.createDataFrame([(0, 0, 1.0), (1, 1, 1.0)], "user int, item int, rating float")
    ALS(rank=rank, maxIter=1, implicitPrefs=True).fit(tiny).save(str(path))
    available = tables.read_table(spark, cfg, C.ITEMS).df.where(C.AVAILABLE).join(tables.read_table(spark, cfg, C.ITEM_IDS).df, C.ITEM_ID)
    for name, f in (
        ("userFactors", tables.read_table(spark, cfg, C.USER_FACTORS).df.select(F.col(C.USER_IDX).alias("id"), C.FEATURES)),
        ("itemFactors", tables.read_table(spark, cfg, C.ITEM_FACTORS).df.join(available, C.ITEM_IDX).select(F.col(C.ITEM_IDX).alias("id"), C.FEATURES)),
    ):
        shutil.rmtree(path / name)
        f.write.parquet(str(path / name))
    return ALSModel.load(str(path))


def time_stock(spark: SparkSession, cfg, model, n: int) -> dict:
    """What a Spark user writes for the same table: recommendForAllUsers deep enough, explode, anti-join the
    bought items, rank, keep n, join the keys, write to Delta (as Spark's docs and public ALS examples do)."""
    from pyspark.sql import Window

    first = job_id_now(spark)
    t0 = time.monotonic()
    uids, iids = tables.read_table(spark, cfg, C.USER_IDS).df, tables.read_table(spark, cfg, C.ITEM_IDS).df
    bought = (
        tables.read_table(spark, cfg, C.INTERACTIONS).df.where(F.col(C.EVENT_TYPE) == C.PURCHASE)
        .join(uids, C.USER_ID).join(iids, C.ITEM_ID).select(F.col(C.USER_IDX).alias("user"), F.col(C.ITEM_IDX).alias("item")).distinct()
    )
    longest = bought.groupBy("user").count().agg(F.max("count")).first()[0] or 0
    recs = model.recommendForAllUsers(n + longest)
    exploded = recs.select("user", F.explode("recommendations").alias("r")).select("user", F.col("r.item").alias("item"), F.col("r.rating").alias(C.SCORE))
    kept = exploded.join(bought, ["user", "item"], "left_anti")
    w = Window.partitionBy("user").orderBy(F.col(C.SCORE).desc(), F.col("item"))
    ranked = kept.withColumn(C.RANK, F.row_number().over(w)).where(F.col(C.RANK) <= n)
    out = (
        ranked.join(uids.withColumnRenamed(C.USER_IDX, "user"), "user").join(iids.withColumnRenamed(C.ITEM_IDX, "item"), "item")
        .select(C.USER_ID, C.ITEM_ID, F.col(C.RANK).cast("int"), C.SCORE)
    )
    target = OUT / "stock_table"
    shutil.rmtree(target, ignore_errors=True)
    out.write.format("delta").mode("overwrite").save(str(target))
    secs = time.monotonic() - t0
    return {"seconds": secs, "jobs": job_id_now(spark) - first - 1, "depth": n + longest, "path": str(target)}


def same_lists(spark: SparkSession, cfg, stock_path: str, n: int) -> dict:
    """Do both tables hold the same items per user? Ties aside: a differing item must score within 1e-5 of the
    user's n-th score in the other table (float32 sums in another order)."""
    ours = tables.read_table(spark, cfg, C.RECOMMENDATIONS).df.select(C.USER_ID, C.ITEM_ID, F.col(C.SCORE).alias("a"))
    theirs = spark.read.format("delta").load(stock_path).select(C.USER_ID, C.ITEM_ID, F.col(C.SCORE).alias("b"))
    both = ours.join(theirs, [C.USER_ID, C.ITEM_ID], "full_outer")
    last = theirs.groupBy(C.USER_ID).agg(F.min("b").alias("nth"))
    only = both.where(F.col("a").isNull() | F.col("b").isNull()).join(last, C.USER_ID)
    row = both.agg(F.count("*").alias("pairs"), F.sum(F.when(F.col("a").isNotNull() & F.col("b").isNotNull(), 1).otherwise(0)).alias("shared"),
                   F.max(F.abs(F.col("a") - F.col("b"))).alias("max_score_diff")).first()
    untied = only.where(F.abs(F.coalesce(F.col("a"), F.col("b")) - F.col("nth")) > 1e-5).count()
    return {"pairs": row["pairs"], "shared": row["shared"], "max_score_diff": row["max_score_diff"], "differing_not_tied": untied}


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
    # With the published table's own setting (statistics on `rank` only), so the floor writes what the stage writes.
    rows.write.format("delta").mode("overwrite").option("delta.dataSkippingStatsColumns", C.RANK).save(str(target))
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
    # The stock pipeline's contract: exclusions and availability, no category cap, no popularity blend.
    cfg = load_config(
        ROOT / "conf" / "local.yaml",
        [f"warehouse={wh}", f"recommend.n={n}", "recommend.similar_items.enabled=false", "recommend.blend.weight=0", *base_overrides],
    )
    t0 = time.monotonic()
    build_warehouse(spark, cfg, users, items, rank, per_user)
    res = {"users": users, "items": items, "rank": rank, "n": n, "build_s": time.monotonic() - t0}
    if compare:  # each side gets one untimed run first: the JVM's and the Python workers' warm-up
        model = stock_model(spark, cfg, rank)
        time_stock(spark, cfg, model, n)
        time_sparkrec(spark, cfg)
    res["sparkrec"] = time_sparkrec(spark, cfg)
    log.info("sparkrec: %s", res["sparkrec"])
    if compare:
        res["stock"] = time_stock(spark, cfg, model, n)
        log.info("stock pipeline: %s", res["stock"])
        res["same_lists"] = same_lists(spark, cfg, res["stock"]["path"], n)
        log.info("same lists: %s", res["same_lists"])
        res["delta_write_only_s"] = time_delta_write(spark, cfg)
        log.info("writing the finished table to Delta again: %.1fs", res["delta_write_only_s"])
        res["mllib_s"] = time_mllib(spark, cfg, n, rank)
        log.info("mllib recommendForAllUsers: %.1fs", res["mllib_s"])
        U, I, csr = local_factors(spark, cfg)
        res["implicit_s"] = time_implicit(U, I, csr, n)
        res["faiss_s"] = time_faiss(U, I, n)
        log.info("implicit %.1fs, faiss %.1fs", res["implicit_s"], res["faiss_s"])
        capped = cfg.model_copy(update={"recommend": cfg.recommend.model_copy(update={
            "rules": cfg.recommend.rules.model_copy(update={"max_per_category": 10}),
            "blend": cfg.recommend.blend.model_copy(update={"weight": 0.2})})})
        res["with_cap_and_blend_s"] = time_sparkrec(spark, capped)["seconds"]
        sim_cfg = cfg.model_copy(update={"recommend": cfg.recommend.model_copy(update={"similar_items": cfg.recommend.similar_items.model_copy(update={"enabled": True})})})
        res["with_similar_items_s"] = time_sparkrec(spark, sim_cfg)["seconds"]
        log.info("with a category cap and the blend %.1fs, with similar items %.1fs", res["with_cap_and_blend_s"], res["with_similar_items_s"])
    return res


def plot_growth(results: list[dict], path: Path) -> None:
    """The stage's seconds and peak memory against users, same 100,000 items."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [r for r in results if r["items"] == 100_000]
    if not series:
        return
    users = [r["users"] for r in series]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(users, [r["sparkrec"]["seconds"] for r in series], "o-", label="recommend stage (s)")
    ax.set_xlabel("users (100,000 items, rank 64, N = 20, 2 cores)")
    ax.set_ylabel("seconds")
    ax2 = ax.twinx()
    ax2.plot(users, [r["sparkrec"]["peak_rss_gb"] for r in series], "s--", color="tab:orange", label="peak memory (GB)")
    ax2.set_ylabel("peak resident memory, GB")
    ax.set_title("sparkrec recommend stage: time and memory by users")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", action="store_true", help="also 1,000,000 users x 100,000 items, rank 64, N 20")
    p.add_argument("--no-compare", action="store_true", help="skip the 50k x 20k comparison case")
    p.add_argument("--growth", type=int, nargs="+", default=[50_000, 200_000, 500_000, 1_000_000],
                   help="users of the --scale series (100,000 items, rank 64, N 20)")
    p.add_argument("--stage-only", type=int, default=0, metavar="K",
                   help="only sparkrec's stage on the 50k x 20k case: a warm-up, then K timed runs (no other side)")
    p.add_argument("--json", default=str(OUT / "results.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    spark = build_session(load_config(ROOT / "conf" / "local.yaml").spark)
    results = []
    if args.stage_only:
        wh = OUT / "wh_stage_only"
        shutil.rmtree(wh, ignore_errors=True)
        cfg = load_config(ROOT / "conf" / "local.yaml", [f"warehouse={wh}", "recommend.n=50", "recommend.similar_items.enabled=false",
                                                         "recommend.blend.weight=0"])
        build_warehouse(spark, cfg, 50_000, 20_000, 32, 5)
        time_sparkrec(spark, cfg)
        runs = [time_sparkrec(spark, cfg) for _ in range(args.stage_only)]
        log.info("stage alone: %s s", [round(r["seconds"], 2) for r in runs])
        results.append({"users": 50_000, "items": 20_000, "rank": 32, "n": 50, "stage_runs": runs})
    elif not args.no_compare:
        results.append(run_case(spark, [], 50_000, 20_000, 32, 50, 5, compare=True))
    if args.scale:  # the same 100,000 items, more and more users (the category cap on, as in the first scale run)
        for users in args.growth:
            results.append(run_case(spark, ["recommend.rules.max_per_category=10"], users, 100_000, 64, 20, 5, compare=False))
            log.info("scale %s users: %s", f"{users:,}", results[-1]["sparkrec"])
            shutil.rmtree(OUT / f"wh_{users}x100000_r64", ignore_errors=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    if args.scale:
        plot_growth(results, ROOT / "bench" / "recommend_growth.png")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

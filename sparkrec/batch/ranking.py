"""The ranker in Spark: its inputs aggregated from the history, its training rows at past cuts, its fit.

The candidates and their features are computed by the list kernel itself (`core.block.candidate_frames`,
`core.ranker`) in a `mapInPandas` pass, so the rows the ranker learns from are the rows it later ranks.
What Spark adds is what only a pass over the whole history gives: each customer's items and activity
(`user_inputs`), each item's popularity, age, price and co-purchase neighbours (`item_stats`, bounded by
the catalogue and collected to be broadcast), and the labels.

Training, as the prototype measured it (`bench/bench_ranker_ceiling.py`, bench/RESULTS.md): at each of
`ranker.training_cuts` past moments, `label_days` apart and newest first, an ALS model is fitted on the
history before the cut (so no feature has seen the labels), the candidates of a bounded sample of the
customers who bought something new in the `label_days` after it are labelled, and the cuts' rows go to
the driver, where LightGBM fits lambdarank (`fit_frames`, `core.ranker.fit`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from sparkrec.batch import evaluate, train
from sparkrec.batch.recommend import catalogue, lists
from sparkrec.core import block, ranker
from sparkrec.core import columns as C
from sparkrec.core.config import Config, EvaluateConfig, RankerConfig, RecommendConfig, TrainConfig
from sparkrec.core.errors import StageError
from sparkrec.core.recnames import EXCLUDED, RK_AGE, RK_ITEMS, RK_USER
from sparkrec.storage import files

log = logging.getLogger(__name__)

LABEL = "label"
GROUP = "group"
PARALLEL_CUTS = 3


def priced_history(interactions: DataFrame, user_ids: DataFrame, item_ids: DataFrame) -> DataFrame:
    """(user_idx, item_idx, event_ts, price): the history the ranker's inputs are aggregated from."""
    price = F.col(C.PRICE) if C.PRICE in interactions.columns else F.lit(None).cast("double")
    return (interactions.select(C.USER_ID, C.ITEM_ID, C.EVENT_TS, price.cast("double").alias(C.PRICE))
            .join(user_ids, C.USER_ID).join(item_ids, C.ITEM_ID)
            .select(C.USER_IDX, C.ITEM_IDX, C.EVENT_TS, C.PRICE))


def days_before(reference: datetime | Column) -> Column:
    """Days from an event to `reference` (fractional; the moment the inputs describe: a time, or a column)."""
    ref = reference if isinstance(reference, Column) else F.lit(reference)
    return (ref.cast("timestamp").cast("double") - F.col(C.EVENT_TS).cast("double")) / 86400.0


def user_inputs(history: DataFrame, reference: datetime | Column) -> DataFrame:
    """(user_idx, _rk_items, _rk_age, _rk_user): each customer's items with the days since they last touched
    each, and their activity in `ranker.USER_FEATURES` order. One aggregation, one row per customer.
    `reference` may be a column of `history` (each customer's own moment: `live_reference`)."""
    h = history.withColumn("_age", days_before(reference))
    per_item = h.groupBy(C.USER_IDX, C.ITEM_IDX).agg(F.min("_age").alias("_age"))
    items = per_item.groupBy(C.USER_IDX).agg(F.collect_list(F.struct(C.ITEM_IDX, "_age")).alias("_l"))
    items = items.select(C.USER_IDX, F.transform("_l", lambda x: x[C.ITEM_IDX]).alias(RK_ITEMS),
                         F.transform("_l", lambda x: x["_age"]).alias(RK_AGE))
    activity = h.groupBy(C.USER_IDX).agg(F.array(
        F.countDistinct(C.ITEM_IDX).cast("double"), F.countDistinct(F.to_date(C.EVENT_TS)).cast("double"),
        F.min("_age"), F.max("_age"), F.percentile_approx(C.PRICE, 0.5).cast("double"),
    ).alias(RK_USER))
    return items.join(activity, C.USER_IDX)


def item_inputs(history: DataFrame, reference: datetime, rk: RankerConfig) -> tuple[DataFrame, DataFrame]:
    """Per item: (item_idx, users, users_recent, users_week, age_days, last_days, price); and the co-purchase
    pairs (item_idx, other_idx, weight), at most `max_neighbours` per item.

    Bought together means in one customer's day (the interactions keep no invoice; on Online Retail II a
    day and an invoice gave the prototype the same NDCG@10, 0.1322 and 0.1321). A day counts at most its
    `basket_items` latest items, so a customer who views thousands in a day cannot make pairs quadratic.
    Two items' weight is the days that hold both over the root of the product of the days that hold each.
    """
    h = history.withColumn("_age", days_before(reference))
    # One row per (item, customer) first: three distinct counts in one aggregation would triple the rows.
    bought = h.groupBy(C.ITEM_IDX, C.USER_IDX).agg(F.min("_age").alias("_last"), F.max("_age").alias("_first"))
    per_item = bought.groupBy(C.ITEM_IDX).agg(
        F.count("*").alias("users"),
        F.count(F.when(F.col("_last") < rk.recent_days, True)).alias("users_recent"),
        F.count(F.when(F.col("_last") < ranker.WEEK_DAYS, True)).alias("users_week"),
        F.max("_first").alias("age_days"), F.min("_last").alias("last_days"),
    ).join(h.groupBy(C.ITEM_IDX).agg(F.percentile_approx(C.PRICE, 0.5).cast("double").alias("price")), C.ITEM_IDX)
    day = F.to_date(C.EVENT_TS).alias("_day")
    latest_first = F.sort_array(F.collect_list(F.struct(F.col("_t"), (-F.col(C.ITEM_IDX)).alias("_i"))), asc=False)
    baskets = (h.groupBy(C.USER_IDX, day, C.ITEM_IDX).agg(F.max(C.EVENT_TS).alias("_t"))
               .groupBy(C.USER_IDX, "_day").agg(F.slice(latest_first, 1, rk.basket_items).alias("_l"))
               .select(F.transform("_l", lambda x: (-x["_i"]).cast("int")).alias("_items")))

    baskets = baskets.localCheckpoint()  # read twice: the baskets per item, then the pairs
    # Baskets holding each item: one row per item (bounded by the catalogue), shipped to the pair tasks.
    days = baskets.select(F.explode("_items").alias(C.ITEM_IDX)).groupBy(C.ITEM_IDX).count().toPandas()
    day_ids, day_counts = days[C.ITEM_IDX].to_numpy(dtype="int64"), days["count"].to_numpy(dtype="int64")
    depth = rk.max_neighbours

    def count_pairs(batches):
        for batch in batches:
            i, j, n = ranker.basket_pairs(list(batch["_items"]))
            keep = i != j
            yield pd.DataFrame({C.ITEM_IDX: i[keep].astype("int32"), "other_idx": j[keep].astype("int32"),
                                "_both": n[keep]})

    def strongest(batches):
        # A partition holds every partial count of its items (hash-partitioned by item): all its batches
        # together, at most the partition's pairs in memory.
        part = [b for b in batches if len(b)]
        if part:
            g = pd.concat(part, ignore_index=True)
            yield ranker.strongest_neighbours(g[C.ITEM_IDX].to_numpy(), g["other_idx"].to_numpy(),
                                              g["_both"].to_numpy(), day_ids, day_counts, depth)

    # Each task counts its baskets' pairs with one sparse product; each item's partial counts then meet in
    # one partition, which adds them up and keeps the items' strongest neighbours (no join, no global sort).
    pairs = (baskets.mapInPandas(count_pairs, f"{C.ITEM_IDX} int, other_idx int, _both long")
             .repartition(C.ITEM_IDX)
             .mapInPandas(strongest, f"{C.ITEM_IDX} int, other_idx int, weight double"))
    return per_item, pairs


def item_stats(history: DataFrame, reference: datetime, rk: RankerConfig) -> ranker.ItemStats:
    """`item_inputs` collected (one row per item, and at most `max_neighbours` pairs per item: bounded by the
    catalogue) into what every block gets by broadcast."""
    history = history.persist(StorageLevel.MEMORY_AND_DISK)  # read by the item counts, the prices and the baskets
    try:
        per_item, pairs = item_inputs(history, reference, rk)
        return ranker.item_stats(per_item.toPandas(), pairs.toPandas(), rk.depth)
    finally:
        history.unpersist()


def ranker_settings(rk: RankerConfig, model: str = "") -> ranker.Ranker:
    return ranker.Ranker(model=model, depth=rk.depth, co_half_life_days=rk.co_half_life_days)


def read_ranker(spark, cfg: Config, path: str) -> ranker.Ranker | None:
    """The ranker a run saved under `path` (`storage.files.ranker_path`), or None when its file is gone."""
    text = files.read_texts(spark, path).get(files.RANKER_FILE)
    return None if text is None else ranker_settings(cfg.ranker, text)


def list_settings(rec: RecommendConfig) -> RecommendConfig:
    """The list settings under a ranker: no popularity blend (the ranker weighs popularity itself)."""
    return rec.model_copy(update={"blend": rec.blend.model_copy(update={"weight": 0.0})})


def with_inputs(rows: DataFrame, history: DataFrame, reference: datetime | Column) -> DataFrame:
    """Per-user rows (`lists.user_rows`) with the ranker's inputs of each customer."""
    return rows.join(user_inputs(history, reference), C.USER_IDX, "left")


LIVE_REFERENCE = "_rk_reference"


def live_reference(history: DataFrame, reference: datetime) -> DataFrame:
    """`history` with each customer's own moment (`LIVE_REFERENCE`) for `user_inputs`: the time the item statistics
    describe, or the customer's newest event when that is later (as the server does: `serve.live.ranker_inputs`)."""
    newest = F.max(C.EVENT_TS).over(Window.partitionBy(C.USER_IDX))
    return history.withColumn(LIVE_REFERENCE, F.greatest(F.lit(reference).cast("timestamp"), newest))


def candidate_rows(rows: DataFrame, plan: block.Plan) -> DataFrame:
    """Every customer's candidates with their features, by the list kernel: (user_idx, item_idx, *FEATURES)."""
    spark = rows.sparkSession
    bc = spark.sparkContext.broadcast(plan)
    schema = f"{C.USER_IDX} int, {C.ITEM_IDX} int, " + ", ".join(f"{f} float" for f in ranker.FEATURES)

    def run(batches):
        p = bc.value
        for batch in batches:
            for start in range(0, len(batch), block.BLOCK_ROWS):
                yield block.candidate_frames(batch.iloc[start:start + block.BLOCK_ROWS].reset_index(drop=True), p)

    cols = [C.USER_IDX, C.FEATURES, EXCLUDED, RK_ITEMS, RK_AGE, RK_USER]
    return rows.select(*cols).mapInPandas(run, schema)


@dataclass(frozen=True)
class Cut:
    """One training moment: the history before `at` is known, the `label_days` after it are the labels."""

    at: datetime
    end: datetime


def cuts(latest: datetime, rk: RankerConfig) -> list[Cut]:
    """The training cuts before `latest` (the newest event the ranker may see), newest first."""
    step = timedelta(days=rk.label_days)
    return [Cut(latest - step * (j + 1), latest - step * j) for j in range(rk.training_cuts)]


def sampled(users: DataFrame, limit: int, seed: int) -> DataFrame:
    """At most about `limit` of `users` (user_idx), chosen by a seeded hash: the same customers every run."""
    n = users.count()
    if n <= limit:
        return users
    share = limit / n
    return users.where(F.pmod(F.xxhash64(F.lit(seed), F.col(C.USER_IDX)), F.lit(1 << 20)) < F.lit(int(share * (1 << 20))))


def fitted_at(before: DataFrame, user_ids: DataFrame, item_ids: DataFrame, at: datetime,
              settings: TrainConfig) -> tuple[DataFrame, DataFrame]:
    """ALS fitted on the history before a cut, as the train stage would have then: (user, item factors).
    Needs a checkpoint directory."""
    matrix = train.training_matrix(before, user_ids, item_ids, settings, at).checkpoint(eager=True)
    return train.fit_factors(matrix, settings.als)


def labelled_frame(before: DataFrame, user_ids: DataFrame, item_ids: DataFrame, positives: DataFrame,
                   factors: tuple[DataFrame, DataFrame], at: datetime, rec: RecommendConfig, rk: RankerConfig,
                   group_offset: int, stats: ranker.ItemStats | None = None) -> pd.DataFrame:
    """The candidates at a cut of a bounded sample of the customers in `positives` (user_idx, item_idx: what
    they bought new after it), labelled, on the driver: (group, label, *FEATURES). At most
    `max_training_customers` customers of about 3 x `depth` candidates each."""
    users = sampled(positives.select(C.USER_IDX).distinct(), rk.max_training_customers, rk.seed).localCheckpoint()
    if users.isEmpty():
        return pd.DataFrame(columns=[GROUP, LABEL, *ranker.FEATURES])
    uf, itf = factors
    history = catalogue.indexed_history(before, user_ids, item_ids).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        priced = priced_history(before, user_ids, item_ids)
        r = list_settings(rec).model_copy(update={"explain": False, "exploration_slots": 0})
        meta = catalogue.default_meta(itf, history)
        plan, _, _ = lists.bounded_plan(history, itf, r, meta, keyed=False)
        if not plan.whole:
            raise StageError(f"the ranker needs every item in one broadcast: more than recommend.max_broadcast_items="
                             f"{rec.max_broadcast_items} items have factors (raise it, or set ranker.enabled: false)")
        plan.ranker, plan.stats = ranker_settings(rk), stats or item_stats(priced, at, rk)
        rows = with_inputs(lists.user_rows(history, uf, r, meta, users), priced.join(users, C.USER_IDX, "left_semi"), at)
        labelled = (candidate_rows(rows, plan)
                    .join(positives.withColumn(LABEL, F.lit(1)), [C.USER_IDX, C.ITEM_IDX], "left")
                    .select((F.col(C.USER_IDX).cast("long") + F.lit(group_offset)).alias(GROUP),
                            F.coalesce(F.col(LABEL), F.lit(0)).alias(LABEL), *ranker.FEATURES))
        frame = labelled.toPandas()  # bounded: see above
    finally:
        history.unpersist()
    log.info("ranker: at %s: %s candidates of %s customers, %s of them bought in the %g days after", at.isoformat(),
             f"{len(frame):,}", f"{frame[GROUP].nunique():,}", f"{int(frame[LABEL].sum()):,}", rk.label_days)
    return frame


def cut_frame(interactions: DataFrame, user_ids: DataFrame, item_ids: DataFrame, cut: Cut, settings: TrainConfig,
              rec: RecommendConfig, rk: RankerConfig, ev: EvaluateConfig, group_offset: int) -> pd.DataFrame:
    """One training cut's labelled candidates (`labelled_frame`), with an ALS model fitted at the cut so that no
    feature has seen the labels. Needs a checkpoint directory."""
    ts = F.col(C.EVENT_TS)
    before = interactions.where(ts < F.lit(cut.at)).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        window = interactions.where((ts >= F.lit(cut.at)) & (ts < F.lit(cut.end)))
        positives = indexed_pairs(evaluate.relevant_items(before, window, ev.relevant_event_types, ev.repeat_relevant,
                                                          rec.exclude_event_types),
                                  user_ids, item_ids).localCheckpoint()
        if positives.isEmpty():
            log.info("ranker: at %s: no customer bought anything new in the %g days after", cut.at.isoformat(), rk.label_days)
            return pd.DataFrame(columns=[GROUP, LABEL, *ranker.FEATURES])
        factors = fitted_at(before, user_ids, item_ids, cut.at, settings)
        return labelled_frame(before, user_ids, item_ids, positives, factors, cut.at, rec, rk, group_offset)
    finally:
        before.unpersist()


def indexed_pairs(pairs: DataFrame, user_ids: DataFrame, item_ids: DataFrame) -> DataFrame:
    """(user_id, item_id) pairs as (user_idx, item_idx)."""
    return pairs.join(user_ids, C.USER_ID).join(item_ids, C.ITEM_ID).select(C.USER_IDX, C.ITEM_IDX)


def cut_frames(interactions: DataFrame, user_ids: DataFrame, item_ids: DataFrame, settings: TrainConfig,
               rec: RecommendConfig, rk: RankerConfig, ev: EvaluateConfig) -> tuple[list[pd.DataFrame], list[Cut]]:
    """The labelled candidates of every training cut before the end of `interactions`, newest first."""
    latest = interactions.agg(F.max(C.EVENT_TS)).first()[0]
    if latest is None:
        raise ValueError("no interactions to train the ranker on")
    found = cuts(latest, rk)
    # The cuts are independent, and each is many small Spark jobs whose cost is mostly latency: run side by
    # side they keep the cores busy (Online Retail II, 3 cuts on 2 cores: 126 s one after another, 102 s together).
    with ThreadPoolExecutor(min(PARALLEL_CUTS, len(found))) as pool:
        frames = list(pool.map(lambda jc: cut_frame(interactions, user_ids, item_ids, jc[1], settings, rec, rk, ev,
                                                     group_offset=(jc[0] + 1) << 32), enumerate(found)))
    return frames, found


def driver_threads(spark) -> int:
    """Threads LightGBM may use on the driver. It fits while no Spark job runs, so in local mode every core the
    session has (Online Retail II: three models in 12 s on two threads against 19 s on one); on a cluster,
    the driver's own `spark.driver.cores`."""
    master = spark.sparkContext.master or ""
    if master.startswith("local"):
        return max(1, spark.sparkContext.defaultParallelism)
    return max(1, int(spark.conf.get("spark.driver.cores", "1") or 1))


def fit_frames(frames: list[pd.DataFrame], rk: RankerConfig, threads: int = 1) -> tuple[ranker.Ranker, dict]:
    """LightGBM on labelled cut frames (newest first) on the driver: (the ranker, what its training did: rows,
    customers and positives per cut, rounds, each feature's share of the gain)."""
    model, info = ranker.fit(frames, seed=rk.seed, threads=threads, max_rounds=rk.max_rounds, models=rk.models,
                             patience=rk.patience,
                             learning_rate=rk.learning_rate, num_leaves=rk.num_leaves)
    out = ranker_settings(rk, model)
    info["gains"] = out.gains()
    return out, info

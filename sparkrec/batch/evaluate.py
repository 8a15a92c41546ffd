"""Offline evaluation: splits, ranking metrics computed in Spark, and honest baselines.

Every list (model or baseline) is judged by the same protocol: the same
evaluated users, the same relevant items, the same "already bought"
exclusions, the same k. Metrics are aggregated in Spark from (user, item,
rank) rows, so no per-user list ever comes to the driver; only the final
averages do.

Definitions, per evaluated user, then averaged over evaluated users (a user
with no list scores 0):
- precision@k = hits in the top k / k
- recall@k = hits in the top k / relevant items
- ndcg@k = sum over hits of 1/log2(rank+1), divided by the same sum for the
  ideal list (min(k, relevant) hits at the top)
- map@k = sum over hits at rank r of (hits up to r)/r, divided by min(k, relevant)
- hit_rate@k = 1 if any hit; mrr@k = 1/rank of the first hit
Over all evaluated users' top-k lists:
- coverage@k = distinct items recommended / items in the training catalogue
- novelty@k = mean of -log2(share of training users who had the item), an
  item no training user had counting as one user
- diversity@k = mean over users of the share of item pairs in the list whose
  categories differ (only when items have categories)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from sparkrec.core import columns as C

PER_USER = ("precision", "recall", "ndcg", "map", "hit_rate", "mrr")


@dataclass(frozen=True)
class Split:
    """Interactions before and after the cut, plus what defines the cut."""

    train: DataFrame
    test: DataFrame
    description: str
    cutoff: datetime | None = None


def time_split(interactions: DataFrame, test_days: float, max_share: float = 1.0) -> Split:
    """Train = events before (newest event - test_days), test = the rest: what a shop lives through.

    The test period is at most `max_share` of the history's span, so a short history (a new shop,
    or the training period a tuning search splits again) keeps most of its days to learn from.
    """
    earliest, latest = interactions.agg(F.min(C.EVENT_TS), F.max(C.EVENT_TS)).first()
    if latest is None:
        return Split(interactions, interactions.limit(0), "time split on an empty table")
    span_days = (latest - earliest).total_seconds() / 86400
    days = min(test_days, max_share * span_days)
    cutoff = latest - timedelta(days=days)
    ts = F.col(C.EVENT_TS)
    what = f"time: last {days:g} days" if days == test_days else f"time: last {days:.1f} days ({max_share:g} of a {span_days:.0f}-day history)"
    return Split(interactions.where(ts < F.lit(cutoff)), interactions.where(ts >= F.lit(cutoff)), what, cutoff)


def leave_last_n_split(interactions: DataFrame, n: int) -> Split:
    """Per user, the `n` items touched last go to test (with all their events); ties by item id."""
    last = interactions.groupBy(C.USER_ID, C.ITEM_ID).agg(F.max(C.EVENT_TS).alias("_last"))
    w = Window.partitionBy(C.USER_ID).orderBy(F.col("_last").desc(), F.col(C.ITEM_ID))
    test_pairs = last.withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= n).select(C.USER_ID, C.ITEM_ID)
    return Split(
        interactions.join(test_pairs, [C.USER_ID, C.ITEM_ID], "left_anti"),
        interactions.join(test_pairs, [C.USER_ID, C.ITEM_ID], "left_semi"),
        f"leave last {n} items per user",
    )


def random_split(interactions: DataFrame, test_fraction: float, seed: int) -> Split:
    """Per user, about `test_fraction` of their items go to test, chosen by a seeded hash (stratified by user)."""
    u = F.pmod(F.xxhash64(F.lit(seed), F.col(C.USER_ID), F.col(C.ITEM_ID)), F.lit(1 << 24)) / float(1 << 24)
    return Split(
        interactions.where(u >= test_fraction), interactions.where(u < test_fraction), f"random {test_fraction:g} of items per user (seed {seed})"
    )


def relevant_items(train: DataFrame, test: DataFrame, relevant_types: list[str], repeat_relevant: bool,
                   excluded_types: list[str] | None = None) -> DataFrame:
    """(user_id, item_id) the user acted on in test with a relevant event type, new to them unless repeats count.

    New means no training event of `excluded_types` on it (`recommend.exclude_event_types`: what the lists
    leave out), or none at all when not given. An item a customer viewed and then bought is a hit a list can
    score (the lists show viewed items); counting only never-seen items taught the ranker to rank viewed items
    down, and on a generated clickstream shop its lists won the evaluation and lost the next month's
    purchases (NDCG@10 0.1479 against 0.176 for ALS's, bench/RESULTS.md).

    Only users with training history are kept: the others are cold-start
    users, measured separately.
    """
    rel = test.where(F.col(C.EVENT_TYPE).isin(relevant_types)).select(C.USER_ID, C.ITEM_ID).distinct()
    if not repeat_relevant:
        had = train if excluded_types is None else train.where(F.col(C.EVENT_TYPE).isin(excluded_types))
        rel = rel.join(had.select(C.USER_ID, C.ITEM_ID).distinct(), [C.USER_ID, C.ITEM_ID], "left_anti")
    return rel.join(train.select(C.USER_ID).distinct(), C.USER_ID, "left_semi")


def ranking_metrics(
    recs: DataFrame,
    relevant: DataFrame,
    ks: list[int],
    *,
    train: DataFrame | None = None,
    categories: DataFrame | None = None,
) -> dict[str, float]:
    """Metric@k for lists (user_id, item_id, rank) against relevant (user_id, item_id).

    Args:
        train: training interactions, for coverage (catalogue) and novelty (item shares).
        categories: (item_id, category), for intra-list diversity.
    Returns:
        {"ndcg@10": ..., "precision@10": ..., "users": n}, averages over the users in `relevant`.
    """
    users = relevant.select(C.USER_ID).distinct()
    n_users = users.count()
    out: dict[str, float] = {"users": float(n_users)}
    if n_users == 0:
        return out
    n_rel = relevant.groupBy(C.USER_ID).agg(F.count("*").alias("_nrel"))
    kmax = max(ks)
    top = recs.select(C.USER_ID, C.ITEM_ID, C.RANK).where(F.col(C.RANK) <= kmax).join(users, C.USER_ID, "left_semi")
    hits = top.join(relevant, [C.USER_ID, C.ITEM_ID], "left_semi")
    hits = hits.withColumn("_nth", F.row_number().over(Window.partitionBy(C.USER_ID).orderBy(C.RANK)))
    aggs = []
    for k in ks:
        h = F.col(C.RANK) <= k
        aggs += [
            F.sum(F.when(h, 1).otherwise(0)).alias(f"_hits{k}"),
            F.sum(F.when(h, 1.0 / F.log2(F.col(C.RANK) + 1)).otherwise(0.0)).alias(f"_dcg{k}"),
            F.sum(F.when(h, F.col("_nth") / F.col(C.RANK)).otherwise(0.0)).alias(f"_ap{k}"),
            F.min(F.when(h, F.col(C.RANK))).alias(f"_first{k}"),
        ]
    per_user = n_rel.join(hits.groupBy(C.USER_ID).agg(*aggs), C.USER_ID, "left").fillna(0)
    means = []
    for k in ks:
        ideal = _idcg_expr(F.least(F.col("_nrel"), F.lit(k)), k)
        hits_k = F.col(f"_hits{k}")
        means += [
            F.avg(hits_k / k).alias(f"precision@{k}"),
            F.avg(hits_k / F.col("_nrel")).alias(f"recall@{k}"),
            F.avg(F.col(f"_dcg{k}") / ideal).alias(f"ndcg@{k}"),
            F.avg(F.col(f"_ap{k}") / F.least(F.col("_nrel"), F.lit(k))).alias(f"map@{k}"),
            F.avg(F.when(hits_k > 0, 1.0).otherwise(0.0)).alias(f"hit_rate@{k}"),
            F.avg(F.when(F.col(f"_first{k}") > 0, 1.0 / F.col(f"_first{k}")).otherwise(0.0)).alias(f"mrr@{k}"),
        ]
    row = per_user.agg(*means).first()
    out.update({k: float(v) for k, v in row.asDict().items()})
    if train is not None:
        out.update(_catalogue_metrics(top, train, ks))
    if categories is not None:
        out.update(_diversity(top, categories, ks))
    return out


def _idcg_expr(m: F.Column, k: int) -> F.Column:
    """Ideal DCG for m relevant items in the top k: sum of 1/log2(i+1) for i = 1..m (a lookup, m <= k)."""
    expr = F.lit(0.0)
    total = 0.0
    for i in range(1, k + 1):
        total += 1.0 / math.log2(i + 1)
        expr = F.when(m >= i, F.lit(total)).otherwise(expr)
    return expr


def _catalogue_metrics(top: DataFrame, train: DataFrame, ks: list[int]) -> dict[str, float]:
    n_train_users = train.select(C.USER_ID).distinct().count()
    item_users = train.groupBy(C.ITEM_ID).agg(F.countDistinct(C.USER_ID).alias("_iu"))
    n_items = item_users.count()
    joined = top.join(item_users, C.ITEM_ID, "left")
    info = -F.log2(F.greatest(F.coalesce(F.col("_iu"), F.lit(1)), F.lit(1)) / F.lit(max(n_train_users, 1)))
    aggs = []
    for k in ks:
        h = F.col(C.RANK) <= k
        aggs += [
            F.countDistinct(F.when(h, F.col(C.ITEM_ID))).alias(f"_distinct{k}"),
            F.avg(F.when(h, info)).alias(f"novelty@{k}"),
        ]
    row = joined.agg(*aggs).first()
    out = {}
    for k in ks:
        out[f"coverage@{k}"] = float(row[f"_distinct{k}"]) / n_items if n_items else 0.0
        out[f"novelty@{k}"] = float(row[f"novelty@{k}"] or 0.0)
    return out


def _diversity(top: DataFrame, categories: DataFrame, ks: list[int]) -> dict[str, float]:
    cat = top.join(categories.select(C.ITEM_ID, C.CATEGORY), C.ITEM_ID, "left")
    out = {}
    for k in ks:
        lists = cat.where(F.col(C.RANK) <= k).where(F.col(C.CATEGORY).isNotNull())
        per_cat = lists.groupBy(C.USER_ID, C.CATEGORY).agg(F.count("*").alias("_c"))
        per_user = per_cat.groupBy(C.USER_ID).agg(
            F.sum("_c").alias("_n"), F.sum(F.col("_c") * (F.col("_c") - 1)).alias("_same")
        ).where(F.col("_n") > 1)
        # Ordered pairs: n(n-1) in all, sum c(c-1) within a category.
        row = per_user.agg(F.avg(1.0 - F.col("_same") / (F.col("_n") * (F.col("_n") - 1)))).first()
        if row[0] is not None:
            out[f"diversity@{k}"] = float(row[0])
    return out


# --------------------------------------------------------------------------- baselines


def buy_again_lists(users: DataFrame, train: DataFrame, buy_types: list[str], k: int) -> DataFrame:
    """The user's own most frequent past items (then latest): the baseline for shops with repeat purchase."""
    counts = (
        train.where(F.col(C.EVENT_TYPE).isin(buy_types))
        .join(users, C.USER_ID, "left_semi")
        .groupBy(C.USER_ID, C.ITEM_ID)
        .agg(F.count("*").alias("_n"), F.max(C.EVENT_TS).alias("_last"))
    )
    w = Window.partitionBy(C.USER_ID).orderBy(F.col("_n").desc(), F.col("_last").desc(), F.col(C.ITEM_ID))
    return counts.withColumn(C.RANK, F.row_number().over(w)).where(F.col(C.RANK) <= k).select(C.USER_ID, C.ITEM_ID, C.RANK)

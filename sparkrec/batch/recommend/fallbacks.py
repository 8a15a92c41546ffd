"""The rankings that fill lists the model cannot fill: cold users and lists cut short by exclusions or rules.

Everything that is not a model score comes from the configured fallback
ranking (popular, trending, or popular in the user's categories) and then
from overall popularity, with its `source` saying which. These are computed
here in Spark (one row per item: bounded) and applied per user in the
workers (`topk.fill`); the same rankings build the popularity baselines that
evaluation judges the model against.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from sparkrec.core import columns as C
from sparkrec.core.recnames import ALLOWED, BLEND, BOOST, CAT, PRIO
from sparkrec.core.serving import POPULARITY, RECENT_POPULARITY, SHOWN


def popularity(history: DataFrame, meta: DataFrame, since: Column | None = None) -> DataFrame:
    """Allowed items by distinct users (since a time, if given), boost applied: (item_idx, score, _cat)."""
    h = history if since is None else history.where(F.col(C.EVENT_TS) >= since)
    counts = h.groupBy(C.ITEM_IDX).agg(F.countDistinct(C.USER_IDX).alias("_users"))
    return counts.join(meta.where(F.col(ALLOWED)).select(C.ITEM_IDX, CAT, BOOST), C.ITEM_IDX).select(
        C.ITEM_IDX, (F.col("_users") * F.col(BOOST)).cast("float").alias(C.SCORE), CAT
    )


def fallback_rankings(history: DataFrame, meta: DataFrame, strategy: str, trending_days: float) -> DataFrame:
    """Global rankings a short list is filled from, in priority order: (item_idx, score, _cat, source, _prio)."""
    popular = popularity(history, meta).withColumn(C.REC_SOURCE, F.lit(C.SOURCE_POPULAR))
    if strategy != C.SOURCE_TRENDING:
        return popular.withColumn(PRIO, F.lit(1 if strategy == C.SOURCE_CATEGORY_POPULAR else 0))
    latest = history.agg(F.max(C.EVENT_TS)).first()[0]
    if latest is None:
        return popular.withColumn(PRIO, F.lit(0))
    since = F.lit(latest) - F.expr(f"make_dt_interval(0, 0, 0, {trending_days * 86400})")
    trending = popularity(history, meta, since).withColumn(C.REC_SOURCE, F.lit(C.SOURCE_TRENDING))
    return trending.withColumn(PRIO, F.lit(0)).unionByName(popular.withColumn(PRIO, F.lit(1)))


def recent_popularity(history: DataFrame, days: float) -> DataFrame:
    """(item_idx, _blend): distinct users in the last `days` of history over the most popular item's count (0..1]."""
    latest = history.agg(F.max(C.EVENT_TS)).first()[0]
    if latest is None:
        return history.sparkSession.createDataFrame([], f"{C.ITEM_IDX} int, {BLEND} double")
    since = F.lit(latest) - F.expr(f"make_dt_interval(0, 0, 0, {days * 86400})")
    counts = history.where(F.col(C.EVENT_TS) >= since).groupBy(C.ITEM_IDX).agg(F.countDistinct(C.USER_IDX).alias("_users"))
    top = counts.agg(F.max("_users")).first()[0] or 1
    return counts.select(C.ITEM_IDX, (F.col("_users") / F.lit(float(top))).alias(BLEND))


def item_popularity(history: DataFrame, meta: DataFrame, recent_days: float) -> DataFrame:
    """Per catalogue item: allowed by the rules, distinct users ever and in the last `recent_days` of history.

    What search ranks by besides the text and the model (no boost: a promotion is a list rule, not relevance).
    Returns (item_idx, allowed, popularity, recent_popularity), one row per item of `meta`.
    """
    latest = history.agg(F.max(C.EVENT_TS)).first()[0]
    recent = F.lit(False) if latest is None else (
        F.col(C.EVENT_TS) >= F.lit(latest) - F.expr(f"make_dt_interval(0, 0, 0, {recent_days * 86400})"))
    counts = history.groupBy(C.ITEM_IDX).agg(
        F.countDistinct(C.USER_IDX).alias(POPULARITY),
        F.countDistinct(F.when(recent, F.col(C.USER_IDX))).alias(RECENT_POPULARITY),
    )
    return meta.select(C.ITEM_IDX, F.col(ALLOWED).alias(SHOWN)).join(counts, C.ITEM_IDX, "left").select(
        C.ITEM_IDX, SHOWN, *[F.coalesce(F.col(c), F.lit(0)).cast("float").alias(c) for c in (POPULARITY, RECENT_POPULARITY)],
    )

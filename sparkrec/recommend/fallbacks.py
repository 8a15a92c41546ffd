"""Filling lists that the model cannot fill: cold users and lists cut short by exclusions or rules.

Everything that is not a model score is filled from the configured fallback
ranking (popular, trending, or popular in the user's categories) and then
from overall popularity, with its `source` saying which. The same code builds
the popularity baselines that evaluation judges the model against.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from sparkrec import columns as C
from sparkrec.recommend.catalogue import exclusions
from sparkrec.recommend.names import ALLOWED, BLEND, BOOST, CAT, HAVE, POS, PRIO


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


def _top_per_category(ranking: DataFrame, depth: int) -> DataFrame:
    w = Window.partitionBy(CAT, PRIO).orderBy(F.col(C.SCORE).desc(), F.col(C.ITEM_IDX))
    return ranking.withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= depth).drop("_r")


def _fill_order() -> list[Column]:
    return [F.col(PRIO), F.col(C.SCORE).desc(), F.col(C.ITEM_IDX)]


def _sequence(ranking: DataFrame) -> tuple[DataFrame, int]:
    """The shared rankings as one numbered sequence (priority, score, item id), each item at its first place, and its length.

    Numbered within each priority, then shifted by the sizes of the earlier
    priorities (a handful of rows), so no window spans the whole table.
    """
    first = ranking.withColumn("_d", F.row_number().over(Window.partitionBy(C.ITEM_IDX).orderBy(*_fill_order()))).where("_d = 1").drop("_d")
    first = first.localCheckpoint(eager=True)
    sizes = sorted((r[PRIO], r["count"]) for r in first.groupBy(PRIO).count().collect())
    offset, shift = 0, F.lit(0)
    for prio, size in sizes:
        shift = F.when(F.col(PRIO) == prio, F.lit(offset)).otherwise(shift)
        offset += size
    within = F.row_number().over(Window.partitionBy(PRIO).orderBy(F.col(C.SCORE).desc(), F.col(C.ITEM_IDX)))
    return first.withColumn(POS, within + shift).localCheckpoint(eager=True), offset


def fill_lists(
    short: DataFrame,
    present: DataFrame | None,
    blocked: DataFrame,
    ranking: DataFrame,
    n: int,
    cap: int | None,
    *,
    per_user: DataFrame | None = None,
) -> DataFrame:
    """Fill each short list up to `n` from rankings, in priority, score and item id order.

    Each user reads only as deep into the shared sequence as it needs: its
    missing items plus the number of items it may not get (a user skips at
    most those). So the candidates grow with the users' histories, never with
    users x the longest history. A per-category cap can skip more; the lists
    it leaves short read four times deeper, until the sequence runs out.

    Args:
        short: (user_idx, _have) users whose list has `_have` < n items.
        present: (user_idx, item_idx, _cat) items already in those lists, or None.
        blocked: (user_idx, item_idx) never to recommend.
        ranking: (item_idx, score, _cat, source, _prio) shared by every user.
        per_user: (user_idx, item_idx, score, _cat, source, _prio) user-specific candidates.
    Returns:
        (user_idx, item_idx, rank, score, _cat, source), ranks continuing after `_have`.
    """
    numbered, total = _sequence(ranking)
    seq = F.broadcast(numbered)
    users = short.select(C.USER_IDX)
    gone = blocked
    if present is not None:
        gone = gone.unionByName(present.select(C.USER_IDX, C.ITEM_IDX))
    gone = gone.join(users, C.USER_IDX, "left_semi")
    n_gone = gone.groupBy(C.USER_IDX).agg(F.count("*").alias("_g"))
    todo = short.join(n_gone, C.USER_IDX, "left").select(
        C.USER_IDX, HAVE, (F.lit(n) - F.col(HAVE) + F.coalesce(F.col("_g"), F.lit(0))).alias("_lim")
    )
    used = None
    if cap and present is not None:
        used = present.where(F.col(CAT) >= 0).groupBy(C.USER_IDX, CAT).agg(F.count("*").alias("_used"))
    parts = []
    while True:
        todo = todo.localCheckpoint(eager=True)
        depth = F.explode(F.sequence(F.lit(1), F.least(F.col("_lim"), F.lit(max(total, 1))))).alias(POS)
        cand = todo.select(C.USER_IDX, depth).join(seq, POS).drop(POS)
        if per_user is not None:
            cand = cand.unionByName(per_user.join(todo.select(C.USER_IDX), C.USER_IDX))
        cand = cand.join(gone, [C.USER_IDX, C.ITEM_IDX], "left_anti")
        cand = cand.withColumn("_d", F.row_number().over(Window.partitionBy(C.USER_IDX, C.ITEM_IDX).orderBy(*_fill_order()))).where("_d = 1")
        if cap:
            occ = F.row_number().over(Window.partitionBy(C.USER_IDX, CAT).orderBy(*_fill_order()))
            if used is not None:
                cand = cand.join(used, [C.USER_IDX, CAT], "left")
                occ = occ + F.coalesce(F.col("_used"), F.lit(0))
            cand = cand.withColumn("_occ", occ).where((F.col(CAT) < 0) | (F.col("_occ") <= cap))
        ranked = cand.join(todo.select(C.USER_IDX, HAVE), C.USER_IDX).withColumn(
            C.RANK, (F.col(HAVE) + F.row_number().over(Window.partitionBy(C.USER_IDX).orderBy(*_fill_order()))).cast("int")
        )
        got = ranked.where(F.col(C.RANK) <= n).select(C.USER_IDX, C.ITEM_IDX, C.RANK, C.SCORE, CAT, C.REC_SOURCE)
        if not cap:  # exact for everyone in one pass
            parts.append(got)
            break
        got = got.localCheckpoint(eager=True)
        ends = got.groupBy(C.USER_IDX).agg(F.max(C.RANK).alias("_max"))
        # Short still, and the sequence not yet read to its end: read deeper.
        again = todo.join(ends, C.USER_IDX, "left").where((F.coalesce(F.col("_max"), F.col(HAVE)) < n) & (F.col("_lim") < total))
        again = again.select(C.USER_IDX, HAVE, (F.col("_lim") * 4).alias("_lim")).localCheckpoint(eager=True)
        if again.isEmpty():
            parts.append(got)
            break
        parts.append(got.join(again.select(C.USER_IDX), C.USER_IDX, "left_anti"))
        todo = again
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out


def popular_lists(
    history: DataFrame,
    users: DataFrame,
    meta: DataFrame,
    n: int,
    exclude_types: list[str],
    *,
    since: Column | None = None,
    cap: int | None = None,
) -> DataFrame:
    """The most popular allowed items each user has not bought: the cold-start list, and the baseline it is judged by.

    Args:
        users: (user_idx) to list.
        since: count only events from this time on ("recently popular").
    Returns:
        (user_idx, item_idx, rank, score, _cat, source)
    """
    source = C.SOURCE_POPULAR if since is None else C.SOURCE_TRENDING
    ranking = popularity(history, meta, since).withColumn(C.REC_SOURCE, F.lit(source)).withColumn(PRIO, F.lit(0))
    short = users.select(C.USER_IDX).distinct().withColumn(HAVE, F.lit(0))
    return fill_lists(short, None, exclusions(history, exclude_types), ranking, n, cap)


def category_candidates(history: DataFrame, meta: DataFrame, ranking: DataFrame, depth: int) -> DataFrame:
    """Popular items of the categories each user touched: (user_idx, item_idx, score, _cat, source, _prio)."""
    touched = history.select(C.USER_IDX, C.ITEM_IDX).join(meta.select(C.ITEM_IDX, CAT), C.ITEM_IDX).where(F.col(CAT) >= 0)
    touched = touched.select(C.USER_IDX, CAT).distinct()
    per_cat = _top_per_category(ranking.drop(PRIO, C.REC_SOURCE).withColumn(PRIO, F.lit(0)), depth)
    return touched.join(F.broadcast(per_cat), CAT).withColumn(C.REC_SOURCE, F.lit(C.SOURCE_CATEGORY_POPULAR))


def recent_popularity(history: DataFrame, days: float) -> DataFrame:
    """(item_idx, _blend): distinct users in the last `days` of history over the most popular item's count (0..1]."""
    latest = history.agg(F.max(C.EVENT_TS)).first()[0]
    if latest is None:
        return history.sparkSession.createDataFrame([], f"{C.ITEM_IDX} int, {BLEND} double")
    since = F.lit(latest) - F.expr(f"make_dt_interval(0, 0, 0, {days * 86400})")
    counts = history.where(F.col(C.EVENT_TS) >= since).groupBy(C.ITEM_IDX).agg(F.countDistinct(C.USER_IDX).alias("_users"))
    top = counts.agg(F.max("_users")).first()[0] or 1
    return counts.select(C.ITEM_IDX, (F.col("_users") / F.lit(float(top))).alias(BLEND))

"""Top-N per user and similar items: shop rules, cold start, exactly N, explanations.

Model scores come from `topk` (faiss + numpy) inside `mapInPandas` over
partitions of user factors: each Python worker scores a block of users against
the broadcast item matrix, with the user's bought items and the per-category
cap applied inside the top-k, so a list is only short when too few valid
items exist. No user factors come to the driver; item factors are broadcast
only up to `recommend.max_broadcast_items` per chunk, and a larger catalogue
is scored in item chunks whose candidates are merged.

Shop rules are applied once, to the item catalogue (`item_meta`): unavailable,
excluded or out-of-scope items never enter the candidate matrix or a fallback
ranking, and a boost scales an item's vector, which scales its score.
Everything that is not a model score (cold users, short lists) is filled from
the configured fallback ranking and then from overall popularity, with its
`source` saying which.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from sparkrec import columns as C
from sparkrec import topk
from sparkrec.config import RecommendConfig, RulesConfig
from sparkrec.errors import StageError

log = logging.getLogger(__name__)

EXCLUDED = "_excluded"
HIST = "_hist"
HIST_TYPE = "_hist_type"
CAT = "_cat"
BOOST = "_boost"
ALLOWED = "_allowed"
PRIO = "_prio"
HAVE = "_have"
POS = "_pos"
BECAUSE_IDX = "_because_idx"
BECAUSE_TYPE = "_because_type"
SCORED_SCHEMA = (
    f"{C.USER_IDX} int, {C.ITEM_IDX} int, {C.RANK} int, {C.SCORE} float, {CAT} int, {BECAUSE_IDX} int, {BECAUSE_TYPE} int"
)
# Strength of an event type, to say "bought" rather than "viewed" when a user did both.
TYPE_STRENGTH = {C.PURCHASE: 3, C.CART: 2, C.RATING_EVENT: 1, C.VIEW: 0}
VERBS = {3: "bought", 2: "added to your cart", 1: "rated", 0: "viewed"}
# History items per user considered for an explanation (strongest and latest first).
EXPLAIN_HISTORY = 50
# Users scored per pandas batch: bounds the Python worker's memory (batch x items floats).
_BATCH_CELLS = 50_000_000


# --------------------------------------------------------------------------- inputs


def indexed_history(interactions: DataFrame, user_ids: DataFrame, item_ids: DataFrame) -> DataFrame:
    """Interactions with their integer user and item ids."""
    return (
        interactions.select(C.USER_ID, C.ITEM_ID, C.EVENT_TYPE, C.EVENT_TS)
        .join(user_ids, C.USER_ID)
        .join(item_ids, C.ITEM_ID)
        .select(C.USER_IDX, C.ITEM_IDX, C.EVENT_TYPE, C.EVENT_TS)
    )


def exclusions(history: DataFrame, exclude_types: list[str]) -> DataFrame:
    """(user_idx, item_idx) pairs that must not be recommended: already bought."""
    return history.where(F.col(C.EVENT_TYPE).isin(exclude_types)).select(C.USER_IDX, C.ITEM_IDX).distinct()


def history_sizes(history: DataFrame) -> DataFrame:
    return history.groupBy(C.USER_IDX).agg(F.countDistinct(C.ITEM_IDX).alias("_n_items"))


def _strength() -> Column:
    expr = F.lit(0)
    for t, s in TYPE_STRENGTH.items():
        expr = F.when(F.col(C.EVENT_TYPE) == t, F.lit(s)).otherwise(expr)
    return expr


def history_lists(history: DataFrame, limit: int = EXPLAIN_HISTORY) -> DataFrame:
    """(user_idx, _hist, _hist_type): each user's items, strongest and latest first, at most `limit`."""
    per_item = history.groupBy(C.USER_IDX, C.ITEM_IDX).agg(
        F.max(_strength()).alias("_s"), F.max(C.EVENT_TS).alias("_t")
    )
    lists = per_item.groupBy(C.USER_IDX).agg(
        F.slice(
            F.sort_array(F.collect_list(F.struct(F.col("_s"), F.col("_t"), (-F.col(C.ITEM_IDX)).alias("_i"))), asc=False),
            1,
            limit,
        ).alias("_l")
    )
    return lists.select(
        C.USER_IDX,
        F.transform("_l", lambda x: (-x["_i"]).cast("int")).alias(HIST),
        F.transform("_l", lambda x: x["_s"].cast("int")).alias(HIST_TYPE),
    )


def allowed_by(rules: RulesConfig) -> Column:
    """Whether an item (item_id, category, available) passes the shop's rules."""
    allowed = F.lit(True)
    if rules.exclude_unavailable:
        allowed &= F.coalesce(F.col(C.AVAILABLE), F.lit(True))
    if rules.exclude_items:
        allowed &= ~F.col(C.ITEM_ID).isin(rules.exclude_items)
    if rules.include_categories:
        allowed &= F.coalesce(F.col(C.CATEGORY).isin(rules.include_categories), F.lit(False))
    if rules.exclude_categories:
        allowed &= ~F.coalesce(F.col(C.CATEGORY).isin(rules.exclude_categories), F.lit(False))
    return allowed


def item_meta(item_ids: DataFrame, items: DataFrame | None, history: DataFrame, rules: RulesConfig) -> DataFrame:
    """Per known item: its category (and a code for it), whether rules allow it, its boost.

    Returns:
        (item_idx, item_id, category, _cat, _allowed, _boost); `_cat` is -1 for no category.
    """
    if items is not None:
        meta = item_ids.join(items.select(C.ITEM_ID, C.CATEGORY, C.AVAILABLE), C.ITEM_ID, "left")
    else:
        meta = item_ids.select(C.ITEM_ID, C.ITEM_IDX, F.lit(None).cast("string").alias(C.CATEGORY), F.lit(True).alias(C.AVAILABLE))
    allowed = allowed_by(rules)
    b = rules.boost
    boosted = F.lit(False)
    if b.items:
        boosted |= F.col(C.ITEM_ID).isin(b.items)
    if b.categories:
        boosted |= F.coalesce(F.col(C.CATEGORY).isin(b.categories), F.lit(False))
    if b.new_item_days is not None:
        first_seen = history.groupBy(C.ITEM_IDX).agg(F.min(C.EVENT_TS).alias("_first"))
        latest = history.agg(F.max(C.EVENT_TS)).first()[0]
        meta = meta.join(first_seen, C.ITEM_IDX, "left")
        if latest is not None:
            boosted |= F.coalesce(
                F.col("_first") >= F.lit(latest) - F.expr(f"make_dt_interval(0, 0, 0, {b.new_item_days * 86400})"),
                F.lit(False),
            )
    # Dense codes 0..k-1 for the top-k kernel's per-category counters. The
    # categories are collected (bounded by the catalogue, which is broadcast
    # anyway) rather than ranked by a window, which would run unpartitioned.
    names = [] if items is None else sorted(
        r[0] for r in items.select(C.CATEGORY).where(F.col(C.CATEGORY).isNotNull()).distinct().collect()
    )
    codes = item_ids.sparkSession.createDataFrame(list(zip(names, range(len(names)))), f"{C.CATEGORY} string, {CAT} int")
    return meta.join(F.broadcast(codes), C.CATEGORY, "left").select(
        F.col(C.ITEM_IDX).cast("int"),
        C.ITEM_ID,
        C.CATEGORY,
        F.coalesce(F.col(CAT), F.lit(-1)).alias(CAT),
        allowed.alias(ALLOWED),
        F.when(boosted, F.lit(float(b.factor))).otherwise(F.lit(1.0)).alias(BOOST),
    )


def default_meta(item_factors: DataFrame, history: DataFrame) -> DataFrame:
    """Catalogue with no rules: every item allowed, no category, no boost (for callers without an item table)."""
    ids = item_factors.select(C.ITEM_IDX).unionByName(history.select(C.ITEM_IDX)).distinct()
    return ids.select(
        F.col(C.ITEM_IDX).cast("int"),
        F.col(C.ITEM_IDX).cast("string").alias(C.ITEM_ID),
        F.lit(None).cast("string").alias(C.CATEGORY),
        F.lit(-1).alias(CAT),
        F.lit(True).alias(ALLOWED),
        F.lit(1.0).alias(BOOST),
    )


# --------------------------------------------------------------------------- model scores


def _collect_items(df: DataFrame, with_category: bool) -> topk.ItemMatrix:
    """Bring one bounded chunk of item vectors to the driver, sorted by item id."""
    cols = [C.ITEM_IDX, C.FEATURES] + ([CAT] if with_category else [])
    pdf = df.select(*cols).orderBy(C.ITEM_IDX).toPandas()
    vectors = np.stack(pdf[C.FEATURES].to_numpy()).astype(np.float32) if len(pdf) else np.zeros((0, 1), np.float32)
    return topk.ItemMatrix(pdf[C.ITEM_IDX].to_numpy(), vectors, pdf[CAT].to_numpy() if with_category else None)


def score_top_n(
    queries: DataFrame,
    candidates: DataFrame,
    n: int,
    *,
    cap: int | None = None,
    max_items: int = 500_000,
    explain_items: DataFrame | None = None,
) -> DataFrame:
    """Exact top-`n` candidates per query row, never an excluded one, at most `cap` per category.

    Args:
        queries: (user_idx, features, _excluded array<int> or null[, _hist array<int>]).
        candidates: (item_idx, features, _cat): the items allowed, boosts applied.
        cap: per-category limit (`_cat` -1 is never capped).
        max_items: items broadcast at once; a larger catalogue is scored in chunks and merged.
        explain_items: (item_idx, features) of every item with factors; when given (and
            within `max_items`), each result gets the history item most similar to it.
    Returns:
        (user_idx, item_idx, rank, score, _cat, _because_idx) with ranks 1..n.
    """
    n_items = candidates.count()
    if n_items == 0:
        return queries.sparkSession.createDataFrame([], SCORED_SCHEMA)
    chunks = -(-n_items // max_items)
    unit = None
    if explain_items is not None:
        if explain_items.count() <= max_items and chunks == 1:
            m = _collect_items(explain_items, False)
            unit = topk.ItemMatrix(m.item_idx, topk.normalized(m.vectors))
        else:
            log.warning("explanations skipped: more than recommend.max_broadcast_items=%d items", max_items)
    if chunks == 1:
        return _score_chunk(queries, _collect_items(candidates, True), n, cap, unit)
    # Each chunk's capped top 2n contains every item of the global capped top n
    # (a displaced item needs `cap` better items of its category, at most n of
    # them in all); without a cap, each chunk's top n suffices.
    depth = 2 * n if cap else n
    log.info("scoring %d items in %d chunks of at most %d", n_items, chunks, max_items)
    parts = None
    for c in range(chunks):
        chunk = _collect_items(candidates.where(F.pmod(C.ITEM_IDX, F.lit(chunks)) == c), True)
        part = _score_chunk(queries, chunk, depth, cap, None)
        parts = part if parts is None else parts.unionByName(part)
    assert parts is not None
    order = [F.col(C.SCORE).desc(), F.col(C.ITEM_IDX)]
    merged = parts
    if cap:
        merged = merged.withColumn("_occ", F.row_number().over(Window.partitionBy(C.USER_IDX, CAT).orderBy(*order))).where(
            (F.col(CAT) < 0) | (F.col("_occ") <= cap)
        )
    return (
        merged.withColumn(C.RANK, F.row_number().over(Window.partitionBy(C.USER_IDX).orderBy(*order)).cast("int"))
        .where(F.col(C.RANK) <= n)
        .select(C.USER_IDX, C.ITEM_IDX, C.RANK, C.SCORE, CAT, BECAUSE_IDX, BECAUSE_TYPE)
    )


def _score_chunk(queries: DataFrame, items: topk.ItemMatrix, n: int, cap: int | None, unit: topk.ItemMatrix | None) -> DataFrame:
    spark = queries.sparkSession
    bc = spark.sparkContext.broadcast((items, unit))
    batch_rows = max(1, _BATCH_CELLS // max(1, len(items.item_idx)))
    explain = unit is not None and HIST in queries.columns
    # One Spark task owns spark.task.cpus cores; faiss's OpenMP would otherwise
    # start a thread per machine core in every Python worker and oversubscribe.
    threads = int(spark.conf.get("spark.task.cpus", "1") or 1)

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        topk.set_threads(threads)
        mat, unit_m = bc.value
        for batch in batches:
            for start in range(0, len(batch), batch_rows):
                part = batch.iloc[start : start + batch_rows]
                q = np.stack(part[C.FEATURES].to_numpy()).astype(np.float32)
                ex = [np.asarray(e if e is not None else [], dtype=np.int64) for e in part[EXCLUDED]]
                sel = topk.top_k(q, ex, mat, n, cap)
                item_ids = mat.item_idx[sel.pos]
                because = np.full(len(sel.row), -1, dtype=np.int64)
                because_type = np.full(len(sel.row), -1, dtype=np.int64)
                if explain:
                    hist = [np.asarray(h if h is not None else [], dtype=np.int64) for h in part[HIST]]
                    because = topk.explain(sel.row, item_ids, hist, unit_m)
                    because_type = _type_of(because, sel.row, hist, part[HIST_TYPE])
                cats = mat.category[sel.pos] if mat.category is not None else np.full(len(sel.row), -1)
                yield pd.DataFrame(
                    {
                        C.USER_IDX: part[C.USER_IDX].to_numpy()[sel.row].astype(np.int32),
                        C.ITEM_IDX: item_ids.astype(np.int32),
                        C.RANK: sel.rank,
                        C.SCORE: sel.score,
                        CAT: cats.astype(np.int32),
                        BECAUSE_IDX: because.astype(np.int32),
                        BECAUSE_TYPE: because_type.astype(np.int32),
                    }
                )

    cols = [C.USER_IDX, C.FEATURES, EXCLUDED] + ([HIST, HIST_TYPE] if explain else [])
    return queries.select(*cols).mapInPandas(score, SCORED_SCHEMA)


def _type_of(because: np.ndarray, rows: np.ndarray, hist: list[np.ndarray], types) -> np.ndarray:
    """The event strength the user had on each explaining item, looked up in the row's own history list."""
    width = max((len(h) for h in hist), default=0)
    if width == 0 or not len(because):
        return np.full(len(because), -1, dtype=np.int64)
    lens = np.fromiter((len(h) for h in hist), dtype=np.int64, count=len(hist))
    filled = np.arange(width)[None, :] < lens[:, None]
    ids = np.full((len(hist), width), -2, dtype=np.int64)
    kinds = np.full((len(hist), width), -1, dtype=np.int64)
    ids[filled] = np.concatenate(hist)
    kinds[filled] = np.concatenate([np.asarray(t if t is not None else [], dtype=np.int64) for t in types])
    match = ids[rows] == because[:, None]
    first = np.argmax(match, axis=1)
    found = match[np.arange(len(because)), first]
    return np.where(found, kinds[rows, first], -1)


def candidate_matrix(item_factors: DataFrame, meta: DataFrame) -> DataFrame:
    """Allowed items with factors, each vector scaled by its boost."""
    return (
        item_factors.select(C.ITEM_IDX, C.FEATURES)
        .join(meta.where(F.col(ALLOWED)).select(C.ITEM_IDX, CAT, BOOST), C.ITEM_IDX)
        .select(
            C.ITEM_IDX,
            F.transform(C.FEATURES, lambda x: (x * F.col(BOOST)).cast("float")).alias(C.FEATURES),
            CAT,
        )
    )


# --------------------------------------------------------------------------- fallbacks


def popularity(history: DataFrame, meta: DataFrame, since: Column | None = None) -> DataFrame:
    """Allowed items by distinct users (since a time, if given), boost applied: (item_idx, score, _cat)."""
    h = history if since is None else history.where(F.col(C.EVENT_TS) >= since)
    counts = h.groupBy(C.ITEM_IDX).agg(F.countDistinct(C.USER_IDX).alias("_users"))
    return counts.join(meta.where(F.col(ALLOWED)).select(C.ITEM_IDX, CAT, BOOST), C.ITEM_IDX).select(
        C.ITEM_IDX, (F.col("_users") * F.col(BOOST)).cast("float").alias(C.SCORE), CAT
    )


def fallback_rankings(history: DataFrame, meta: DataFrame, strategy: str, trending_days: float) -> DataFrame:
    """Global rankings a short list is filled from, in priority order: (item_idx, score, _cat, source, _prio)."""
    popular = popularity(history, meta).withColumn(C.SOURCE, F.lit(C.SOURCE_POPULAR))
    if strategy != C.SOURCE_TRENDING:
        return popular.withColumn(PRIO, F.lit(1 if strategy == C.SOURCE_CATEGORY_POPULAR else 0))
    latest = history.agg(F.max(C.EVENT_TS)).first()[0]
    if latest is None:
        return popular.withColumn(PRIO, F.lit(0))
    since = F.lit(latest) - F.expr(f"make_dt_interval(0, 0, 0, {trending_days * 86400})")
    trending = popularity(history, meta, since).withColumn(C.SOURCE, F.lit(C.SOURCE_TRENDING))
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
        got = ranked.where(F.col(C.RANK) <= n).select(C.USER_IDX, C.ITEM_IDX, C.RANK, C.SCORE, CAT, C.SOURCE)
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
    ranking = popularity(history, meta, since).withColumn(C.SOURCE, F.lit(source)).withColumn(PRIO, F.lit(0))
    short = users.select(C.USER_IDX).distinct().withColumn(HAVE, F.lit(0))
    return fill_lists(short, None, exclusions(history, exclude_types), ranking, n, cap)


def _category_candidates(history: DataFrame, meta: DataFrame, ranking: DataFrame, depth: int) -> DataFrame:
    """Popular items of the categories each user touched: (user_idx, item_idx, score, _cat, source, _prio)."""
    touched = history.select(C.USER_IDX, C.ITEM_IDX).join(meta.select(C.ITEM_IDX, CAT), C.ITEM_IDX).where(F.col(CAT) >= 0)
    touched = touched.select(C.USER_IDX, CAT).distinct()
    per_cat = _top_per_category(ranking.drop(PRIO, C.SOURCE).withColumn(PRIO, F.lit(0)), depth)
    return touched.join(F.broadcast(per_cat), CAT).withColumn(C.SOURCE, F.lit(C.SOURCE_CATEGORY_POPULAR))


# --------------------------------------------------------------------------- all together


def recommend_all(
    history: DataFrame,
    user_factors: DataFrame,
    item_factors: DataFrame,
    cfg: RecommendConfig,
    meta: DataFrame | None = None,
    users: DataFrame | None = None,
) -> DataFrame:
    """Exactly `n` items per user with history (whenever `n` allowed items exist), with their source.

    Users with at least `min_history` distinct items and factors get model
    scores; everyone else, and any list cut short by exclusions or rules, is
    filled from the fallback ranking and then from popularity.

    Args:
        users: (user_idx) to list; default every user in `history`.
    Returns:
        (user_idx, item_idx, rank, score, _cat, source, _because_idx)
    """
    if meta is None:
        meta = default_meta(item_factors, history)
    n, cap = cfg.n, cfg.rules.max_per_category
    excluded = exclusions(history, cfg.exclude_event_types)
    sizes = history_sizes(history)
    if users is not None:  # only these users' lists (evaluation); rankings still use all history
        sizes = sizes.join(users.select(C.USER_IDX), C.USER_IDX, "left_semi")
    warm = sizes.where(F.col("_n_items") >= cfg.min_history).select(C.USER_IDX)
    per_user_ex = excluded.groupBy(C.USER_IDX).agg(F.collect_list(C.ITEM_IDX).alias(EXCLUDED))
    queries = user_factors.select(C.USER_IDX, C.FEATURES).join(warm, C.USER_IDX).join(per_user_ex, C.USER_IDX, "left")
    if cfg.explain:
        queries = queries.join(history_lists(history), C.USER_IDX, "left")
    # Scored once and kept: the lists are read three times below, and the
    # scoring is the expensive part.
    als = (
        score_top_n(
            queries,
            candidate_matrix(item_factors, meta),
            n,
            cap=cap,
            max_items=cfg.max_broadcast_items,
            explain_items=item_factors if cfg.explain else None,
        )
        .withColumn(C.SOURCE, F.lit(C.SOURCE_ALS))
        .localCheckpoint(eager=True)
    )
    have = als.groupBy(C.USER_IDX).agg(F.count("*").alias(HAVE))
    short = (
        sizes.select(C.USER_IDX)
        .join(have, C.USER_IDX, "left")
        .select(C.USER_IDX, F.coalesce(F.col(HAVE), F.lit(0)).alias(HAVE))
        .where(F.col(HAVE) < n)
        .localCheckpoint(eager=True)
    )
    present = als.select(C.USER_IDX, C.ITEM_IDX, CAT)
    if short.isEmpty():  # every list is full: no ranking to build, nothing to fill
        return als
    ranking = fallback_rankings(history, meta, cfg.fallback, cfg.trending_days)
    per_user = None
    if cfg.fallback == C.SOURCE_CATEGORY_POPULAR:
        # A user skips at most the items it may not get before its n-th valid
        # one of a category, so each category's top (n + the most any short
        # user may not get) is enough.
        gone = excluded.unionByName(present.select(C.USER_IDX, C.ITEM_IDX)).join(short.select(C.USER_IDX), C.USER_IDX, "left_semi")
        max_gone = gone.groupBy(C.USER_IDX).count().agg(F.max("count")).first()[0] or 0
        per_user = _category_candidates(history, meta, ranking, n + int(max_gone))
    filled = fill_lists(short, present, excluded, ranking, n, cap, per_user=per_user)
    return als.unionByName(filled.withColumn(BECAUSE_IDX, F.lit(-1)).withColumn(BECAUSE_TYPE, F.lit(-1)))


def with_keys(recs: DataFrame, user_ids: DataFrame, meta: DataFrame, trending_days: float) -> DataFrame:
    """Swap integer ids back for the shop's keys and say why each item is there."""
    # The catalogue is bounded (one row per item) and broadcast; users are not.
    because = F.broadcast(meta.select(F.col(C.ITEM_IDX).alias(BECAUSE_IDX), F.col(C.ITEM_ID).alias(C.BECAUSE_ITEM_ID)))
    out = (
        recs.join(F.broadcast(meta.select(C.ITEM_IDX, C.ITEM_ID, C.CATEGORY)), C.ITEM_IDX)
        .join(because, BECAUSE_IDX, "left")
        .join(user_ids, C.USER_IDX)
    )
    return out.withColumn(C.EXPLANATION, explanation(trending_days))


def explanation(trending_days: float) -> Column:
    src = F.col(C.SOURCE)
    verb = F.lit(None).cast("string")
    for strength, text in VERBS.items():
        verb = F.when(F.col(BECAUSE_TYPE) == strength, F.lit(text)).otherwise(verb)
    days = f"{trending_days:g}"
    return (
        F.when((src == C.SOURCE_ALS) & F.col(C.BECAUSE_ITEM_ID).isNotNull(), F.concat(F.lit("because you "), verb, F.lit(" "), F.col(C.BECAUSE_ITEM_ID)))
        .when(src == C.SOURCE_ALS, F.lit("matches your tastes"))
        .when(src == C.SOURCE_TRENDING, F.lit(f"trending in the last {days} days"))
        .when((src == C.SOURCE_CATEGORY_POPULAR) & F.col(C.CATEGORY).isNotNull(), F.concat(F.lit("popular in "), F.col(C.CATEGORY)))
        .when(src == C.SOURCE_EXPLORATION, F.lit("new in the shop"))
        .otherwise(F.lit("popular with other shoppers"))
    )


def exploration_pool(items: DataFrame, history: DataFrame, item_ids: DataFrame, rules: RulesConfig, limit: int) -> list[str]:
    """Allowed items nobody has interacted with (so no list can hold them), up to `limit`, by a stable hash."""
    seen = history.select(C.ITEM_IDX).distinct().join(item_ids, C.ITEM_IDX).select(C.ITEM_ID)
    pool = items.join(seen, C.ITEM_ID, "left_anti")
    rows = pool.where(allowed_by(rules)).orderBy(F.xxhash64(C.ITEM_ID), C.ITEM_ID).limit(limit).select(C.ITEM_ID).collect()
    return [r[0] for r in rows]


def with_exploration(recs: DataFrame, pool: list[str], n: int, slots: int) -> DataFrame:
    """Give each list's last `slots` places to items without factors, spread over users by hash.

    Args:
        recs: keyed recommendations (user_id, item_id, rank, ...).
    """
    slots = min(slots, len(pool))
    if slots == 0:
        return recs
    keep = recs.where(F.col(C.RANK) <= n - slots)
    users = recs.select(C.USER_ID).distinct()
    arr = F.array(*[F.lit(x) for x in pool])
    start = F.pmod(F.xxhash64(C.USER_ID), F.lit(len(pool)))
    explore = users.select(C.USER_ID, F.explode(F.sequence(F.lit(0), F.lit(slots - 1))).alias("_j")).select(
        C.USER_ID,
        F.element_at(arr, (F.pmod(start + F.col("_j"), F.lit(len(pool))) + 1).cast("int")).alias(C.ITEM_ID),
        (F.lit(n - slots + 1) + F.col("_j")).cast("int").alias(C.RANK),
        F.lit(None).cast("float").alias(C.SCORE),
        F.lit(C.SOURCE_EXPLORATION).alias(C.SOURCE),
        F.lit(None).cast("string").alias(C.BECAUSE_ITEM_ID),
        F.lit("new in the shop").alias(C.EXPLANATION),
    )
    cols = explore.columns
    merged = keep.select(*cols).unionByName(explore)
    # A list shorter than n - slots would leave a gap: ranks are renumbered 1..len.
    w = Window.partitionBy(C.USER_ID).orderBy(C.RANK, C.ITEM_ID)
    return merged.withColumn(C.RANK, F.row_number().over(w).cast("int"))


# --------------------------------------------------------------------------- similar items


def similar_items(item_factors: DataFrame, meta: DataFrame, k: int, max_items: int) -> DataFrame:
    """Each item's `k` most similar allowed items by cosine over item factors, never itself.

    Returns:
        (item_idx, similar_idx, rank, score)
    """
    unit = F.transform(
        C.FEATURES,
        lambda x: (x / F.greatest(F.sqrt(F.aggregate(C.FEATURES, F.lit(0.0), lambda acc, y: acc + y * y)), F.lit(1e-12))).cast("float"),
    )
    normed = item_factors.select(C.ITEM_IDX, unit.alias(C.FEATURES))
    candidates = normed.join(meta.where(F.col(ALLOWED)).select(C.ITEM_IDX, CAT), C.ITEM_IDX)
    queries = normed.select(
        F.col(C.ITEM_IDX).alias(C.USER_IDX), C.FEATURES, F.array(F.col(C.ITEM_IDX)).alias(EXCLUDED)
    )
    out = score_top_n(queries, candidates, k, max_items=max_items)
    return out.select(
        F.col(C.USER_IDX).alias(C.ITEM_IDX), F.col(C.ITEM_IDX).alias("_similar_idx"), C.RANK, C.SCORE
    )


def require_factors(df: DataFrame, table: str) -> None:
    if df.isEmpty():
        raise StageError(f"{table} is empty: train a model first")

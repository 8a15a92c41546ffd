"""Top-N per user: ALS scores in blocks with exclusions inside the top-k, popular fallback.

Scoring runs in `mapInPandas` over partitions of user factors: each block of
users is multiplied against the broadcast item-factor matrix with one BLAS
product, already-bought items are masked to -inf before the top-k, and the
top-k is taken with `argpartition` plus an ordered tie-break on item id. No
user factors come to the driver; item factors are broadcast only up to
`recommend.max_broadcast_items`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from sparkrec import columns as C
from sparkrec.errors import StageError

EXCLUDED = "_excluded"
SCORED_SCHEMA = f"{C.USER_IDX} int, {C.ITEM_IDX} int, {C.RANK} int, {C.SCORE} float"
# Scores of one block of users against all items: rows x items floats at most.
_BLOCK_CELLS = 20_000_000


def indexed_history(interactions: DataFrame, user_ids: DataFrame, item_ids: DataFrame) -> DataFrame:
    """Interactions with their integer user and item ids."""
    return (
        interactions.select(C.USER_ID, C.ITEM_ID, C.EVENT_TYPE)
        .join(user_ids, C.USER_ID)
        .join(item_ids, C.ITEM_ID)
        .select(C.USER_IDX, C.ITEM_IDX, C.EVENT_TYPE)
    )


def exclusions(history: DataFrame, exclude_types: list[str]) -> DataFrame:
    """(user_idx, item_idx) pairs that must not be recommended: already bought."""
    return history.where(F.col(C.EVENT_TYPE).isin(exclude_types)).select(C.USER_IDX, C.ITEM_IDX).distinct()


def history_sizes(history: DataFrame) -> DataFrame:
    return history.groupBy(C.USER_IDX).agg(F.countDistinct(C.ITEM_IDX).alias("_n_items"))


def popularity(history: DataFrame) -> DataFrame:
    """Items by distinct users, most popular first; ties broken by item id."""
    return history.groupBy(C.ITEM_IDX).agg(F.countDistinct(C.USER_IDX).cast("float").alias(C.SCORE))


def _top_k_block(
    users: np.ndarray, scores: np.ndarray, excluded: list[np.ndarray], item_idx: np.ndarray, k: int
) -> pd.DataFrame:
    """Exact top-k of one block with exclusions masked; ties go to the lower item id."""
    m = len(item_idx)
    lens = np.fromiter((len(e) for e in excluded), dtype=np.int64, count=len(excluded))
    if lens.sum():
        rows = np.repeat(np.arange(len(excluded)), lens)
        flat = np.concatenate(excluded).astype(np.int64)
        pos = np.searchsorted(item_idx, flat)
        hit = pos < m
        hit[hit] = item_idx[pos[hit]] == flat[hit]
        scores[rows[hit], pos[hit]] = -np.inf
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((item_idx[top], -top_scores), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    top_scores = np.take_along_axis(top_scores, order, axis=1)
    valid = np.isfinite(top_scores)
    ranks = np.tile(np.arange(1, k + 1, dtype=np.int32), (len(users), 1))
    return pd.DataFrame(
        {
            C.USER_IDX: np.repeat(users, k).reshape(len(users), k)[valid].astype(np.int32),
            C.ITEM_IDX: item_idx[top][valid].astype(np.int32),
            C.RANK: ranks[valid],
            C.SCORE: top_scores[valid].astype(np.float32),
        }
    )


def score_top_n(user_factors: DataFrame, item_factors: DataFrame, excluded: DataFrame, n: int, max_items: int) -> DataFrame:
    """Top-`n` ALS items per user, never an excluded one.

    Args:
        user_factors: (user_idx, features) for the users to score.
        item_factors: (item_idx, features); broadcast, so at most `max_items` rows.
        excluded: (user_idx, item_idx) pairs to leave out.
    Returns:
        (user_idx, item_idx, rank, score) with ranks 1..min(n, valid items).
    """
    n_items = item_factors.count()
    if n_items > max_items:
        raise StageError(
            f"{n_items:,} item factors exceed recommend.max_broadcast_items={max_items:,}; "
            "raise the bound if the driver and executors have the memory"
        )
    if n_items == 0:
        raise StageError("item_factors is empty: train a model first")
    pdf = item_factors.select(C.ITEM_IDX, C.FEATURES).orderBy(C.ITEM_IDX).toPandas()
    item_idx = pdf[C.ITEM_IDX].to_numpy(dtype=np.int64)
    matrix = np.ascontiguousarray(np.stack(pdf[C.FEATURES].to_numpy()).astype(np.float32))
    spark = user_factors.sparkSession
    bc = spark.sparkContext.broadcast((item_idx, matrix))
    k = min(n, len(item_idx))
    block = max(1, _BLOCK_CELLS // len(item_idx))

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        idx, mat = bc.value
        for batch in batches:
            for start in range(0, len(batch), block):
                part = batch.iloc[start : start + block]
                u = np.stack(part[C.FEATURES].to_numpy()).astype(np.float32)
                ex = [np.asarray(e if e is not None else [], dtype=np.int64) for e in part[EXCLUDED]]
                yield _top_k_block(part[C.USER_IDX].to_numpy(), u @ mat.T, ex, idx, k)

    per_user = excluded.groupBy(C.USER_IDX).agg(F.collect_list(C.ITEM_IDX).alias(EXCLUDED))
    return (
        user_factors.select(C.USER_IDX, C.FEATURES)
        .join(per_user, C.USER_IDX, "left")
        .mapInPandas(score, SCORED_SCHEMA)
    )


def fallback_top_n(
    users: DataFrame, already: DataFrame, excluded: DataFrame, popular: DataFrame, n: int
) -> DataFrame:
    """Fill each user's list up to `n` from the popularity ranking.

    Args:
        users: (user_idx, _have) users needing items, `_have` items they already have.
        already: (user_idx, item_idx) items already in their list (not repeated).
        excluded: (user_idx, item_idx) pairs never to recommend.
        popular: (item_idx, score) for all items.
    """
    blocked = already.unionByName(excluded).distinct()
    # A user can skip at most (blocked items) entries of the ranking, so the
    # top (n + max blocked) popular items always suffice: a bounded broadcast.
    max_blocked = (
        blocked.join(users.select(C.USER_IDX), C.USER_IDX).groupBy(C.USER_IDX).count().agg(F.max("count")).first()[0]
        or 0
    )
    depth = n + int(max_blocked)
    top = popular.orderBy(F.col(C.SCORE).desc(), F.col(C.ITEM_IDX)).limit(depth)
    cand = users.crossJoin(F.broadcast(top)).join(blocked, [C.USER_IDX, C.ITEM_IDX], "left_anti")
    w = Window.partitionBy(C.USER_IDX).orderBy(F.col(C.SCORE).desc(), F.col(C.ITEM_IDX))
    return (
        cand.withColumn(C.RANK, (F.col("_have") + F.row_number().over(w)).cast("int"))
        .where(F.col(C.RANK) <= n)
        .select(C.USER_IDX, C.ITEM_IDX, C.RANK, C.SCORE)
    )


def recommend_all(
    history: DataFrame,
    user_factors: DataFrame,
    item_factors: DataFrame,
    exclude_types: list[str],
    n: int,
    min_history: int,
    max_items: int,
) -> DataFrame:
    """Exactly `n` items per user with history (when `n` valid items exist), with their source.

    Users with at least `min_history` distinct items and factors get ALS
    scores; everyone else, and any ALS list cut short by exclusions, is
    filled from the popularity ranking.
    """
    excluded = exclusions(history, exclude_types)
    sizes = history_sizes(history)
    warm = sizes.where(F.col("_n_items") >= min_history).select(C.USER_IDX)
    # Scored once and kept: the lists are read three times below, and the
    # scoring is the expensive part.
    als = (
        score_top_n(user_factors.join(warm, C.USER_IDX), item_factors, excluded, n, max_items)
        .withColumn(C.SOURCE, F.lit(C.SOURCE_ALS))
        .localCheckpoint(eager=True)
    )
    have = als.groupBy(C.USER_IDX).agg(F.count("*").alias("_have"))
    short = (
        sizes.select(C.USER_IDX)
        .join(have, C.USER_IDX, "left")
        .select(C.USER_IDX, F.coalesce(F.col("_have"), F.lit(0)).alias("_have"))
        .where(F.col("_have") < n)
    )
    fallback = fallback_top_n(short, als.select(C.USER_IDX, C.ITEM_IDX), excluded, popularity(history), n).withColumn(
        C.SOURCE, F.lit(C.SOURCE_POPULAR)
    )
    return als.unionByName(fallback)


def with_keys(recs: DataFrame, user_ids: DataFrame, item_ids: DataFrame) -> DataFrame:
    """Swap integer ids back for the shop's own keys."""
    return recs.join(user_ids, C.USER_IDX).join(item_ids, C.ITEM_IDX)

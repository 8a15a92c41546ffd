"""Model scores: the candidate matrix, and exact top-N per query in chunks of the catalogue.

The recommend stage scores inside its one pass over the users (`block`)
when the catalogue fits `recommend.max_broadcast_items`. `score_top_n` is for
what does not: a larger catalogue, scored in item chunks whose candidates are
merged, and similar items. Either way the exclusions and the per-category cap
are applied inside the top-k (`topk`), and no user factors come to the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from sparkrec.core import columns as C
from sparkrec.core import topk
from sparkrec.core.block import block_rows
from sparkrec.core.recnames import (
    ALLOWED,
    BECAUSE_IDX,
    BECAUSE_TYPE,
    BLEND,
    BOOST,
    CAT,
    EXCLUDED,
    OWN_TYPE,
    SCORED_SCHEMA,
)

log = logging.getLogger(__name__)


def collect_items(df: DataFrame, with_category: bool) -> topk.ItemMatrix:
    """Bring one bounded chunk of item vectors to the driver, sorted by item id."""
    cols = [C.ITEM_IDX, C.FEATURES] + ([CAT] if with_category else [])
    pdf = df.select(*cols).orderBy(C.ITEM_IDX).toPandas()
    vectors = np.stack(pdf[C.FEATURES].to_numpy()).astype(np.float32) if len(pdf) else np.zeros((0, 1), np.float32)
    return topk.ItemMatrix(pdf[C.ITEM_IDX].to_numpy(), vectors, pdf[CAT].to_numpy() if with_category else None)


def collect_bounded(df: DataFrame, with_category: bool, limit: int) -> topk.ItemMatrix | None:
    """`collect_items` when the items fit one broadcast (at most `limit`), else None, without collecting them.

    Counting first (a pass that stops at `limit` + 1 rows) keeps an over-large
    catalogue off the driver: that is what `recommend.max_broadcast_items` bounds.
    """
    if df.limit(limit + 1).count() > limit:
        return None
    return collect_items(df, with_category)


def score_top_n(
    queries: DataFrame,
    candidates: DataFrame,
    n: int,
    *,
    cap: int | None = None,
    max_items: int = 500_000,
) -> DataFrame:
    """Exact top-`n` candidates per query row, never an excluded one, at most `cap` per category.

    Args:
        queries: (user_idx, features, _excluded array<int> or null[, _hist array<int>]).
        candidates: (item_idx, features, _cat): the items allowed, boosts applied.
        cap: per-category limit (`_cat` -1 is never capped).
        max_items: items broadcast at once; a larger catalogue is scored in chunks and merged.
    Returns:
        (user_idx, item_idx, rank, score, _cat, _because_idx) with ranks 1..n.
    """
    n_items = candidates.count()
    if n_items == 0:
        return queries.sparkSession.createDataFrame([], SCORED_SCHEMA)
    chunks = -(-n_items // max_items)
    if chunks == 1:
        return _score_chunk(queries, collect_items(candidates, True), n, cap)
    # Each chunk's capped top 2n contains every item of the global capped top n
    # (a displaced item needs `cap` better items of its category, at most n of
    # them in all); without a cap, each chunk's top n suffices.
    depth = 2 * n if cap else n
    log.info("scoring %d items in %d chunks of at most %d", n_items, chunks, max_items)
    parts = None
    for c in range(chunks):
        chunk = collect_items(candidates.where(F.pmod(C.ITEM_IDX, F.lit(chunks)) == c), True)
        part = _score_chunk(queries, chunk, depth, cap)
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
        .select(C.USER_IDX, C.ITEM_IDX, C.RANK, C.SCORE, CAT, BECAUSE_IDX, BECAUSE_TYPE, OWN_TYPE)
    )


def _score_chunk(queries: DataFrame, items: topk.ItemMatrix, n: int, cap: int | None) -> DataFrame:
    spark = queries.sparkSession
    bc = spark.sparkContext.broadcast(items)
    batch_rows = block_rows(len(items.item_idx))
    # One Spark task owns spark.task.cpus cores; faiss's OpenMP would otherwise
    # start a thread per machine core in every Python worker and oversubscribe.
    threads = int(spark.conf.get("spark.task.cpus", "1") or 1)

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        topk.set_threads(threads)
        mat = bc.value
        for batch in batches:
            for start in range(0, len(batch), batch_rows):
                part = batch.iloc[start : start + batch_rows]
                q = np.stack(part[C.FEATURES].to_numpy()).astype(np.float32)
                ex = [np.asarray(e if e is not None else [], dtype=np.int64) for e in part[EXCLUDED]]
                sel = topk.top_k(q, ex, mat, n, cap)
                cats = mat.category[sel.pos] if mat.category is not None else np.full(len(sel.row), -1)
                none = np.full(len(sel.row), -1, dtype=np.int32)
                yield pd.DataFrame(
                    {
                        C.USER_IDX: part[C.USER_IDX].to_numpy()[sel.row].astype(np.int32),
                        C.ITEM_IDX: mat.item_idx[sel.pos].astype(np.int32),
                        C.RANK: sel.rank,
                        C.SCORE: sel.score,
                        CAT: cats.astype(np.int32),
                        BECAUSE_IDX: none,
                        BECAUSE_TYPE: none,
                        OWN_TYPE: none,
                    }
                )

    return queries.select(C.USER_IDX, C.FEATURES, EXCLUDED).mapInPandas(score, SCORED_SCHEMA)


def candidate_matrix(item_factors: DataFrame, meta: DataFrame, blend: DataFrame | None = None) -> DataFrame:
    """Allowed items with factors, each vector scaled by its boost.

    Args:
        blend: (item_idx, _blend) per-item additive scores; each vector gets it as one more
            component, which the queries' extra component (the blend weight) multiplies, so
            the same inner-product top-k ranks model score + weight x blend exactly.
    """
    allowed = meta.where(F.col(ALLOWED)).select(C.ITEM_IDX, CAT, BOOST)
    vectors = item_factors.select(C.ITEM_IDX, C.FEATURES).join(allowed, C.ITEM_IDX)
    features = F.col(C.FEATURES)
    if blend is not None:
        vectors = vectors.join(blend, C.ITEM_IDX, "left")
        features = F.concat(features, F.array(F.coalesce(F.col(BLEND), F.lit(0.0)).cast("float")))
    return vectors.select(
        C.ITEM_IDX,
        F.transform(features, lambda x: (x * F.col(BOOST)).cast("float")).alias(C.FEATURES),
        CAT,
    )


def with_blend_weight(queries: DataFrame, weight: float) -> DataFrame:
    """Queries with the blend weight as one more component (see `candidate_matrix`)."""
    return queries.withColumn(C.FEATURES, F.concat(F.col(C.FEATURES), F.array(F.lit(float(weight)).cast("float"))))

"""Similar items: each item's nearest allowed items by cosine over the item factors."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkrec.batch.recommend.scoring import score_top_n
from sparkrec.core import columns as C
from sparkrec.core.recnames import ALLOWED, CAT, EXCLUDED


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


def with_item_keys(similar: DataFrame, meta: DataFrame) -> DataFrame:
    """`similar_items` output with the shop's item keys: (item_id, similar_item_id, rank, score)."""
    ids = F.broadcast(meta.select(C.ITEM_IDX, C.ITEM_ID))  # one row per item: bounded
    other = ids.select(F.col(C.ITEM_IDX).alias("_similar_idx"), F.col(C.ITEM_ID).alias(C.SIMILAR_ITEM_ID))
    return similar.join(ids, C.ITEM_IDX).join(other, "_similar_idx").select(C.ITEM_ID, C.SIMILAR_ITEM_ID, C.RANK, C.SCORE)

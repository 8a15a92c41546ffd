"""What the lists are built from: each user's indexed history and the item catalogue under the shop's rules.

Rules are applied once, here (`item_meta`): unavailable, excluded or
out-of-scope items never enter the candidate matrix or a fallback ranking, and
a boost becomes a per-item factor that scoring multiplies in.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from sparkrec.core import columns as C
from sparkrec.core.config import RulesConfig
from sparkrec.core.recnames import ALLOWED, BOOST, CAT, TYPE_STRENGTH


def indexed_history(interactions: DataFrame, user_ids: DataFrame, item_ids: DataFrame) -> DataFrame:
    """Interactions with their integer user and item ids."""
    return (
        interactions.select(C.USER_ID, C.ITEM_ID, C.EVENT_TYPE, C.EVENT_TS)
        .join(user_ids, C.USER_ID)
        .join(item_ids, C.ITEM_ID)
        .select(C.USER_IDX, C.ITEM_IDX, C.EVENT_TYPE, C.EVENT_TS)
    )


def strength() -> Column:
    """An event's strength (`TYPE_STRENGTH`), to say "bought" rather than "viewed" when a user did both."""
    expr = F.lit(0)
    for t, s in TYPE_STRENGTH.items():
        expr = F.when(F.col(C.EVENT_TYPE) == t, F.lit(s)).otherwise(expr)
    return expr


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
        (item_idx, item_id, category, name, _cat, _allowed, _boost); `_cat` is -1 for no category,
        `name` null when the shop gave none.
    """
    if items is not None:
        name = F.col(C.ITEM_NAME) if C.ITEM_NAME in items.columns else F.lit(None).cast("string")
        meta = item_ids.join(items.select(C.ITEM_ID, C.CATEGORY, C.AVAILABLE, name.alias(C.ITEM_NAME)), C.ITEM_ID, "left")
    else:
        meta = item_ids.select(C.ITEM_ID, C.ITEM_IDX, F.lit(None).cast("string").alias(C.CATEGORY), F.lit(True).alias(C.AVAILABLE),
                               F.lit(None).cast("string").alias(C.ITEM_NAME))
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
        C.ITEM_NAME,
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
        F.lit(None).cast("string").alias(C.ITEM_NAME),
        F.lit(-1).alias(CAT),
        F.lit(True).alias(ALLOWED),
        F.lit(1.0).alias(BOOST),
    )

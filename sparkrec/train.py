"""Implicit feedback and ALS training.

Each event contributes a weight from its type (and a rating's value), decayed
by age when a half-life is configured; a user-item pair's confidence is the
sum. MLlib ALS with `implicitPrefs=True` then turns confidence into factors.
"""

from __future__ import annotations

import logging
from datetime import datetime

from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from sparkrec import columns as C
from sparkrec.config import AlsConfig, TrainConfig
from sparkrec.errors import StageError

log = logging.getLogger(__name__)


def event_weight(weights: dict[str, float]) -> Column:
    """Weight of one event from its type; a rating event scales by the rating value."""
    expr: Column | None = None
    for etype, w in sorted(weights.items()):
        value = F.lit(w) * F.coalesce(F.col(C.RATING), F.lit(0.0)) if etype == C.RATING_EVENT else F.lit(w)
        cond = F.col(C.EVENT_TYPE) == etype
        expr = F.when(cond, value) if expr is None else expr.when(cond, value)
    assert expr is not None
    return expr.otherwise(F.lit(0.0))


def with_recency_decay(df: DataFrame, half_life_days: float | None, reference: datetime | None) -> DataFrame:
    """Multiply `weight` by 0.5 ** (age in days / half-life), age measured from `reference`.

    The reference is the newest event of the data, not the wall clock, so
    retraining on the same data gives the same matrix.
    """
    if half_life_days is None or reference is None:
        return df
    age_days = (F.lit(reference).cast("timestamp").cast("double") - F.col(C.EVENT_TS).cast("double")) / 86400.0
    return df.withColumn(C.WEIGHT, F.col(C.WEIGHT) * F.pow(F.lit(0.5), F.greatest(age_days, F.lit(0.0)) / half_life_days))


def training_matrix(
    interactions: DataFrame,
    user_ids: DataFrame,
    item_ids: DataFrame,
    train: TrainConfig,
    reference: datetime | None = None,
) -> DataFrame:
    """(user_idx, item_idx, weight) with one row per pair and a positive weight."""
    events = interactions.withColumn(C.WEIGHT, event_weight(train.event_weights)).where(F.col(C.WEIGHT) > 0)
    events = with_recency_decay(events, train.recency_half_life_days, reference)
    return (
        events.join(user_ids, C.USER_ID)
        .join(item_ids, C.ITEM_ID)
        .groupBy(C.USER_IDX, C.ITEM_IDX)
        .agg(F.sum(C.WEIGHT).cast("float").alias(C.WEIGHT))
        .where(F.col(C.WEIGHT) > 0)
    )


def make_als(als: AlsConfig) -> ALS:
    """ALS with our column names, so MLlib's defaults never leak in."""
    est = ALS(
        rank=als.rank,
        maxIter=als.max_iter,
        regParam=als.reg_param,
        alpha=als.alpha,
        implicitPrefs=True,
        nonnegative=als.nonnegative,
        seed=als.seed,
        checkpointInterval=als.checkpoint_interval,
        userCol=C.USER_IDX,
        itemCol=C.ITEM_IDX,
        ratingCol=C.WEIGHT,
        coldStartStrategy="drop",
    )
    if als.num_blocks:
        est = est.setNumUserBlocks(als.num_blocks).setNumItemBlocks(als.num_blocks)
    return est


def fit_als(matrix: DataFrame, als: AlsConfig) -> ALSModel:
    """Fit on a materialised matrix (the caller checkpoints it: ALS needs deterministic input)."""
    return make_als(als).fit(matrix)


def factors(model: ALSModel, model_version: str) -> tuple[DataFrame, DataFrame]:
    users = model.userFactors.select(
        F.col("id").alias(C.USER_IDX), F.col("features").alias(C.FEATURES), F.lit(model_version).alias(C.MODEL_VERSION)
    )
    items = model.itemFactors.select(
        F.col("id").alias(C.ITEM_IDX), F.col("features").alias(C.FEATURES), F.lit(model_version).alias(C.MODEL_VERSION)
    )
    return users, items


# A single user with more than this share of the training weight is worth a warning:
# a bot that slipped through clean.bots, a shop's own test account, a feed importer.
SKEW_WARN_SHARE = 0.01


def largest_user_share(matrix: DataFrame) -> tuple[int | None, float]:
    """(user_idx, share of all training weight) of the heaviest user: a one-row aggregate, for the skew warning."""
    per_user = matrix.groupBy(C.USER_IDX).agg(F.sum(C.WEIGHT).alias("_w"))
    row = per_user.agg(F.max_by(C.USER_IDX, "_w").alias("_u"), F.max("_w").alias("_max"), F.sum("_w").alias("_all")).first()
    if row is None or not row["_all"]:
        return None, 0.0
    return row["_u"], float(row["_max"]) / float(row["_all"])


def decay_reference(interactions: DataFrame, train: TrainConfig) -> datetime | None:
    """The newest event time, which recency decay measures age from; None when there is no decay to apply."""
    if train.recency_half_life_days is None:
        return None
    return interactions.agg(F.max(C.EVENT_TS)).first()[0]


def require_pairs(pairs: int, train: TrainConfig) -> int:
    """`pairs` when the matrix has any; an error naming the weights when it has none."""
    if pairs == 0:
        raise StageError(
            "the training matrix is empty: no interaction has a positive weight "
            f"(train.event_weights = {train.event_weights})"
        )
    return pairs


def warn_skew(user_ids: DataFrame, heavy: int | None, share: float, run_id: str) -> None:
    """Log the heaviest user by key (one row looked up), so an operator can find it in the shop's data."""
    who = user_ids.where(F.col(C.USER_IDX) == heavy).select(C.USER_ID).first()
    log.warning("run %s: user %s holds %.1f%% of all training weight (more than %.0f%%): a bot or a test account? "
                "see clean.bots", run_id, who[0] if who else heavy, 100 * share, 100 * SKEW_WARN_SHARE)

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

from sparkrec.core import columns as C
from sparkrec.core.config import AlsConfig, TrainConfig
from sparkrec.core.errors import StageError

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


def fit_factors(matrix: DataFrame, als: AlsConfig) -> tuple[DataFrame, DataFrame]:
    """ALS fitted on a materialised matrix, its factors as the list code reads them: (user, item factors).
    What evaluation, tuning and the ranker's training cuts score with (nothing saved, no model version)."""
    model = fit_als(matrix, als)
    return (model.userFactors.select(F.col("id").alias(C.USER_IDX), F.col("features").alias(C.FEATURES)),
            model.itemFactors.select(F.col("id").alias(C.ITEM_IDX), F.col("features").alias(C.FEATURES)))


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


# --------------------------------------------------------------------------- the maintained weight table
#
# `user_item_weights` holds per (user, item, event type) the sums the matrix is made of, so a day's run
# adds the day's events to it instead of aggregating every event again. Recency decay stays exact: an
# event at time t contributes base * 2^(t / h) (t in days since 1970), stored as log2 of the sum so it
# never overflows; at training time 2^(log2_decayed - t_ref / h) is the sum of base * 2^(-(t_ref - t) / h),
# the same numbers as decaying each event from t_ref.

_NEG = -1.0e300  # log2 of an empty sum


def event_base() -> Column:
    """An event's type-independent value: a rating's value for rating events, else 1 (the type's weight multiplies it)."""
    return F.when(F.col(C.EVENT_TYPE) == C.RATING_EVENT, F.coalesce(F.col(C.RATING), F.lit(0.0))).otherwise(F.lit(1.0))


def _log2_term(half_life_days: float | None) -> Column:
    if half_life_days is None:
        return F.lit(_NEG)
    return F.log2(event_base()) + F.col(C.EVENT_TS).cast("double") / 86400.0 / half_life_days


def weight_sums(events: DataFrame, half_life_days: float | None) -> DataFrame:
    """(user_id, item_id, event_type, events, value, log2_decayed) sums of interaction rows.

    Events whose base value is not positive (a rating of 0) are left out: no
    positive type weight can make them count, which is what training keeps.
    """
    rows = events.where(event_base() > 0).select(
        C.USER_ID, C.ITEM_ID, C.EVENT_TYPE, event_base().alias("_b"), _log2_term(half_life_days).alias("_l")
    )
    m = rows.groupBy(C.USER_ID, C.ITEM_ID, C.EVENT_TYPE).agg(F.max("_l").alias("_m"))
    return (
        rows.join(m, [C.USER_ID, C.ITEM_ID, C.EVENT_TYPE])
        .groupBy(C.USER_ID, C.ITEM_ID, C.EVENT_TYPE)
        .agg(
            F.count(F.lit(1)).cast("long").alias(C.EVENTS),
            F.sum("_b").alias(C.VALUE),
            (F.first("_m") + F.log2(F.sum(F.pow(F.lit(2.0), F.col("_l") - F.col("_m"))))).alias(C.LOG2_DECAYED),
        )
    )


def weight_deltas(added: DataFrame, removed: DataFrame, run_id: str) -> DataFrame:
    """What one batch changes in `user_item_weights`: per key the sums entering (a_) and leaving (r_) the table.

    `added` and `removed` are `weight_sums` of the rows entering and leaving `interactions`. The deltas
    are applied by `apply_weight_deltas` inside the MERGE, so a day never reads the table's old rows
    itself; `run_id` stamps the rows it changes, which makes applying the same deltas twice a no-op.
    """
    keys = [C.USER_ID, C.ITEM_ID, C.EVENT_TYPE]
    sums = (C.EVENTS, C.VALUE, C.LOG2_DECAYED)
    zero = {C.EVENTS: F.lit(0).cast("long"), C.VALUE: F.lit(0.0), C.LOG2_DECAYED: F.lit(_NEG)}
    a = added.select(*keys, *[F.col(c).alias(f"a_{c}") for c in sums])
    r = removed.select(*keys, *[F.col(c).alias(f"r_{c}") for c in sums])
    return a.join(r, keys, "full_outer").select(
        *keys,
        *[F.coalesce(F.col(f"{p}_{c}"), zero[c]).alias(f"{p}_{c}") for p in ("a", "r") for c in sums],
        F.lit(run_id).alias(C.RUN_ID),
    )


def _log2_combined(old: Column, added: Column, removed: Column) -> Column:
    """log2(2^old + 2^added - 2^removed) without overflow; an empty sum is `_NEG`."""
    top = F.greatest(old, added)
    total = F.pow(F.lit(2.0), old - top) + F.pow(F.lit(2.0), added - top) - F.pow(F.lit(2.0), removed - top)
    return F.when(top <= _NEG / 2, F.lit(_NEG)).otherwise(top + F.log2(F.greatest(total, F.lit(1e-300))))


def apply_weight_deltas() -> tuple[dict[str, Column], Column, Column, dict[str, Column]]:
    """The MERGE of `weight_deltas` (source `s`) into `user_item_weights` (target `t`):
    (matched updates, matched delete condition, not-matched insert condition, inserted values).

    A key that loses its last event is deleted. A source key that is absent from the table is inserted
    only when the batch removes nothing from it: removals are of rows the table already counted, so an
    absent key with removals was deleted by an earlier application of this same batch.
    """
    def t(c: str) -> Column:
        return F.col(f"t.{c}")

    def s(c: str) -> Column:
        return F.col(f"s.{c}")

    events = t(C.EVENTS) + s(f"a_{C.EVENTS}") - s(f"r_{C.EVENTS}")
    updates = {
        C.EVENTS: events,
        C.VALUE: t(C.VALUE) + s(f"a_{C.VALUE}") - s(f"r_{C.VALUE}"),
        C.LOG2_DECAYED: _log2_combined(t(C.LOG2_DECAYED), s(f"a_{C.LOG2_DECAYED}"), s(f"r_{C.LOG2_DECAYED}")),
        C.RUN_ID: s(C.RUN_ID),
    }
    inserts = {C.USER_ID: s(C.USER_ID), C.ITEM_ID: s(C.ITEM_ID), C.EVENT_TYPE: s(C.EVENT_TYPE),
               C.EVENTS: s(f"a_{C.EVENTS}"), C.VALUE: s(f"a_{C.VALUE}"), C.LOG2_DECAYED: s(f"a_{C.LOG2_DECAYED}"),
               C.RUN_ID: s(C.RUN_ID)}
    return updates, events <= 0, (s(f"r_{C.EVENTS}") == 0) & (s(f"a_{C.EVENTS}") > 0), inserts


def weights_usable(train: TrainConfig, table_half_life: float | None) -> str | None:
    """None when the weight table can give this training's matrix; else why it cannot."""
    if any(w < 0 for w in train.event_weights.values()):
        return "train.event_weights has a negative weight (the table keeps only positive sums)"
    h = train.recency_half_life_days
    if h is not None and h != table_half_life:
        return (f"train.recency_half_life_days={h:g} but the weight table was built with "
                f"{'no decay' if table_half_life is None else f'{table_half_life:g}'} (`sparkrec clean --full` rebuilds it)")
    return None


def matrix_from_weights(
    weights: DataFrame, user_ids: DataFrame, item_ids: DataFrame, train: TrainConfig, reference: datetime | None
) -> DataFrame:
    """(user_idx, item_idx, weight) from `user_item_weights`: the same matrix as `training_matrix` on the interactions."""
    h = train.recency_half_life_days
    pairs = [F.lit(x) for etype, w in sorted(train.event_weights.items()) if w > 0 for x in (etype, w)]
    if not pairs:
        return weights.sparkSession.createDataFrame([], f"{C.USER_IDX} int, {C.ITEM_IDX} int, {C.WEIGHT} float")
    type_weight = F.try_element_at(F.create_map(*pairs), F.col(C.EVENT_TYPE))
    if h is None or reference is None:
        amount = F.col(C.VALUE)
    else:
        ref_days = F.lit(reference).cast("timestamp").cast("double") / 86400.0
        amount = F.pow(F.lit(2.0), F.col(C.LOG2_DECAYED) - ref_days / h)
    return (
        weights.where(type_weight.isNotNull() & (F.col(C.EVENTS) > 0))
        .withColumn(C.WEIGHT, type_weight * amount)
        .join(user_ids, C.USER_ID)
        .join(item_ids, C.ITEM_ID)
        .groupBy(C.USER_IDX, C.ITEM_IDX)
        .agg(F.sum(C.WEIGHT).cast("float").alias(C.WEIGHT))
        .where(F.col(C.WEIGHT) > 0)
    )
